package avatarforcing

import (
	"errors"
	"math"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

var (
	// ErrInvalidArgument is wrapped by every error that rejects a caller's argument before
	// anything is sent (bad SessionOptions, an odd-length PCM buffer, a WAV file in the wrong
	// format, ...). The error's text says what to fix.
	ErrInvalidArgument = errors.New("avatarforcing: invalid argument")

	// ErrClosed is returned by sends on a session after Close, and by Err when the session was
	// closed with Close before the server sent End.
	ErrClosed = errors.New("avatarforcing: session closed")

	// ErrSessionEnded is returned by sends once the session's stream has finished (End was
	// received, the stream failed, or the context given to StartSession ended). Read Events
	// until it closes; Err then holds the reason.
	ErrSessionEnded = errors.New("avatarforcing: session has ended")

	// ErrSendClosed is returned by sends after CloseSend.
	ErrSendClosed = errors.New("avatarforcing: send side closed (CloseSend was called)")

	// ErrProtocol is wrapped when the server's responses do not follow the protocol (for
	// example a first response that is not SessionStarted).
	ErrProtocol = errors.New("avatarforcing: protocol error")
)

// StartError is the error Client.StartSession returns when the server refuses the session
// with a gRPC status: it keeps the status error and the stream's trailer. It satisfies
// status.FromError and status.Code (its GRPCStatus is the server's status) and unwraps to the
// status error; RetryAfter reads the retry hint from its trailer.
type StartError struct {
	// Err is the server's gRPC status error.
	Err error
	// Trailer is the trailing metadata the server sent with the status (may be empty).
	Trailer metadata.MD
}

func (e *StartError) Error() string {
	if e.Err == nil {
		return "avatarforcing: the server refused the session"
	}
	return e.Err.Error()
}

// Unwrap returns the gRPC status error.
func (e *StartError) Unwrap() error { return e.Err }

// GRPCStatus returns the server's status, so that status.FromError and status.Code see
// through the wrapper.
func (e *StartError) GRPCStatus() *status.Status { return status.Convert(e.Err) }

// RetryAfter returns how long the server asked the client to wait before trying again, and
// whether it said so. The server sends the hint with RESOURCE_EXHAUSTED (no free session
// slot), in the trailers "retry-after-ms" and "grpc-retry-pushback-ms"; err is the error
// Client.StartSession returned (or one wrapping it). A negative or malformed value counts as
// no hint. Without a hint, back off as you see fit (or try another replica).
func RetryAfter(err error) (time.Duration, bool) {
	var se *StartError
	if !errors.As(err, &se) {
		return 0, false
	}
	for _, key := range []string{retryAfterKey, grpcPushbackKey} {
		v := se.Trailer.Get(key)
		if len(v) == 0 {
			continue
		}
		ms, perr := strconv.ParseInt(strings.TrimSpace(v[0]), 10, 64)
		if perr != nil || ms < 0 || ms > int64(math.MaxInt64/time.Millisecond) {
			continue
		}
		return time.Duration(ms) * time.Millisecond, true
	}
	return 0, false
}
