package avatarforcing

import "errors"

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
