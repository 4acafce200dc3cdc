package avatarforcing

// Placement, attaching and resuming (docs/routing.md): StartSession asks CreateSession where a
// new session runs and opens its Stream there; when that stream breaks, the session asks
// CreateSession where it resumes (the same replica, or another one when its owner is gone) and
// opens a Stream there with the first block not fully received, then sends again the audio not
// covered by the frames received (resumeState, resume_state.go). The Python SDK (clients/python,
// Session._place_and_open and _resume, and resume.py) does the same.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"time"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const (
	// firstRetryDelay and maxRetryDelay bound the backoff between placement attempts (each
	// wait is jittered to 0.5..1.5 times the delay).
	firstRetryDelay = 50 * time.Millisecond
	maxRetryDelay   = 500 * time.Millisecond
)

var (
	// errStalled cancels a stream that delivered nothing for the stall timeout.
	errStalled = errors.New("avatarforcing: the stream delivered nothing for the stall timeout")
	// errReplaced cancels a stream that a resume replaces.
	errReplaced = errors.New("avatarforcing: the stream was replaced by a resumed one")
	// errAttachTimeout cancels a stream that did not send SessionStarted in time.
	errAttachTimeout = errors.New("avatarforcing: no SessionStarted within the attach timeout")
)

// attachment is one Stream call of a session, from its SessionStarted on.
type attachment struct {
	stream   pb.AvatarForcing_StreamClient
	ctx      context.Context // the stream's; a child of the session's
	cancel   context.CancelCauseFunc
	started  *pb.SessionStarted
	address  string      // the replica ("" when the session streams over the Client's own connection unrouted)
	watchdog *time.Timer // the frame-stall watchdog (receive goroutine only)
}

// retryPlacement are the statuses after which placement is asked again.
func retryPlacement(c codes.Code) bool {
	switch c {
	case codes.ResourceExhausted, codes.Unavailable, codes.Aborted, codes.DeadlineExceeded:
		return true
	}
	return false
}

// attach places the session (resume: finds where it resumes) and opens its stream there,
// retrying until the placement timeout (resume: the resume timeout) has passed. avoid is a
// replica CreateSession should go to last (the one whose stream just broke or stalled).
func (s *Session) attach(resume bool, avoid string) (*attachment, error) {
	c := s.client
	limit := c.timeouts.placement
	if resume {
		limit = s.resumeTimeout
	}
	deadline := time.Now().Add(limit)
	if d, ok := s.ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	ctx, cancel := context.WithDeadline(s.ctx, deadline)
	defer cancel()
	switch {
	case !resume && c.router != nil:
		cc, err := c.router.Route(ctx, s.opts, c.conn)
		if err != nil {
			return nil, fmt.Errorf("avatarforcing: routing the session: %w", err)
		}
		att, _, err := s.openWithAvatar(ctx, cc, "", 0, time.Until(deadline))
		return att, err
	case !resume && c.noRoute.Load(): // a server without routing, as seen before
		att, _, err := s.openWithAvatar(ctx, c.conn, "", 0, time.Until(deadline))
		return att, err
	}
	var resumeBlock uint64
	if resume {
		resumeBlock = s.resumeBlock()
	}
	var (
		delay       = firstRetryDelay
		attachLimit = c.timeouts.attach
		address     string
		haveAddress bool
	)
	for {
		var err error
		if !haveAddress {
			req := &pb.CreateSessionRequest{}
			if resume {
				s.mu.Lock()
				req.ResumeSessionId, req.SessionToken = s.sessionID, s.token
				s.mu.Unlock()
			}
			placed, noRoute, perr := c.createSession(ctx, req, min(c.timeouts.attach, time.Until(deadline)), avoid)
			switch {
			case perr != nil:
				err = perr
			case noRoute: // a server without routing: one attempt over the Client's own connection
				att, _, err := s.openWithAvatar(ctx, c.conn, "", 0, time.Until(deadline))
				return att, err
			default:
				s.mu.Lock()
				if !resume {
					s.sessionID, s.token = placed.GetSessionId(), placed.GetSessionToken()
				}
				s.routed = true
				s.mu.Unlock()
				address, haveAddress = placed.GetAddress(), true
			}
		}
		if err == nil {
			cc, derr := c.connFor(address)
			if derr != nil {
				return nil, derr
			}
			att, timedOut, oerr := s.openWithAvatar(ctx, cc, address, resumeBlock, min(attachLimit, time.Until(deadline)))
			if oerr == nil {
				return att, nil
			}
			if timedOut {
				attachLimit *= 2 // a slow replica (a big image to encode?) gets longer next time
			}
			err = oerr
		}
		if cerr := s.ctx.Err(); cerr != nil {
			return nil, status.FromContextError(cerr).Err()
		}
		code := status.Code(err)
		owner := ""
		if code == codes.FailedPrecondition {
			owner = ownerAddress(err)
		}
		if owner == "" && !retryPlacement(code) {
			return nil, err
		}
		wait := delay
		if code == codes.ResourceExhausted {
			if hint, ok := RetryAfter(err); ok {
				wait = hint
			}
		}
		wait = time.Duration(float64(wait) * (0.5 + rand.Float64()))
		if time.Now().Add(wait).After(deadline) {
			return nil, err
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			if cerr := s.ctx.Err(); cerr != nil {
				return nil, status.FromContextError(cerr).Err()
			}
			return nil, err
		}
		// Stream on the owner next; otherwise ask for placement again.
		address, haveAddress = owner, owner != ""
		delay = min(2*delay, maxRetryDelay)
	}
}

// ownerAddress is the owner named by a FAILED_PRECONDITION redirect, or "".
func ownerAddress(err error) string {
	var se *StartError
	if errors.As(err, &se) {
		if v := se.Trailer.Get(ownerAddressKey); len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// missingAvatar reports whether a stream was refused because the replica does not know the
// avatar it names.
func missingAvatar(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.NotFound && strings.Contains(strings.ToLower(st.Message()), "avatar")
}

// openWithAvatar opens the stream; when the replica does not know the session's avatar and
// the Client registered that avatar's image, it registers the image there and tries once more.
func (s *Session) openWithAvatar(ctx context.Context, cc grpc.ClientConnInterface, address string,
	resumeBlock uint64, limit time.Duration) (*attachment, bool, error) {
	att, timedOut, err := s.open(cc, address, s.config(resumeBlock), limit)
	if err == nil || !missingAvatar(err) {
		return att, timedOut, err
	}
	s.mu.Lock()
	id := s.avatarID
	s.mu.Unlock()
	image, name, ok := s.client.avatars.get(id)
	if id == "" || !ok {
		return nil, false, err
	}
	resp, rerr := pb.NewAvatarForcingClient(cc).RegisterAvatar(ctx, &pb.RegisterAvatarRequest{Image: image, Name: name})
	if rerr != nil {
		return nil, false, fmt.Errorf("%w (registering the avatar again failed: %v)", err, rerr)
	}
	if newID := resp.GetAvatarId(); newID != "" && newID != id {
		s.client.avatars.put(newID, image, name)
		s.mu.Lock()
		s.avatarID = newID
		s.mu.Unlock()
	}
	if d, ok := ctx.Deadline(); ok {
		limit = min(limit, time.Until(d))
	}
	return s.open(cc, address, s.config(resumeBlock), limit)
}

// config is the SessionConfig of the session's next stream.
func (s *Session) config(resumeBlock uint64) *pb.SessionConfig {
	cfg := proto.Clone(s.base).(*pb.SessionConfig)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.routed {
		cfg.SessionId, cfg.SessionToken, cfg.ResumeBlock = s.sessionID, s.token, resumeBlock
	}
	if s.avatarID != "" {
		cfg.Reference = &pb.SessionConfig_AvatarId{AvatarId: s.avatarID}
	}
	return cfg
}

// open is one Stream attempt: the config, then SessionStarted within limit. timedOut reports
// that the limit passed (the attempt was cancelled; its error is DEADLINE_EXCEEDED).
func (s *Session) open(cc grpc.ClientConnInterface, address string, cfg *pb.SessionConfig,
	limit time.Duration) (att *attachment, timedOut bool, err error) {
	sctx, cancel := context.WithCancelCause(s.ctx)
	timer := time.AfterFunc(max(limit, 0), func() { cancel(errAttachTimeout) })
	defer func() {
		if err == nil {
			return
		}
		timer.Stop()
		if errors.Is(context.Cause(sctx), errAttachTimeout) && s.ctx.Err() == nil {
			where := address
			if where == "" {
				where = "the server"
			}
			timedOut = true
			err = &StartError{Err: status.Errorf(codes.DeadlineExceeded,
				"no SessionStarted from %s within %v (the attempt was cancelled)", where, limit.Round(time.Millisecond))}
		}
		cancel(err)
	}()
	stream, err := pb.NewAvatarForcingClient(cc).Stream(sctx)
	if err != nil {
		return nil, false, err
	}
	// io.EOF from Send means the stream already failed; Recv returns the real status.
	if err := stream.Send(&pb.StreamRequest{Message: &pb.StreamRequest_Config{Config: cfg}}); err != nil && err != io.EOF {
		return nil, false, err
	}
	resp, err := stream.Recv()
	if err != nil {
		if err == io.EOF {
			return nil, false, fmt.Errorf("%w: the server closed the stream without sending SessionStarted", ErrProtocol)
		}
		if _, ok := status.FromError(err); !ok {
			return nil, false, err
		}
		// The stream has finished: its trailer holds the server's retry hint or the owner's address.
		return nil, false, &StartError{Err: err, Trailer: stream.Trailer()}
	}
	if !timer.Stop() {
		return nil, false, errAttachTimeout // it fired as the answer came: the stream is cancelled
	}
	started := resp.GetStarted()
	if started == nil {
		return nil, false, fmt.Errorf("%w: the first response is %T, expected SessionStarted", ErrProtocol, resp.GetMessage())
	}
	return &attachment{stream: stream, ctx: sctx, cancel: cancel, started: started, address: address}, false, nil
}

// canResume reports whether the session may resume when its stream breaks.
func (s *Session) canResume() bool {
	if s.resumeTimeout <= 0 || s.closed.Load() {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.routed && s.token != ""
}

// shouldResume reports whether att's stream failing with err is a break the session resumes
// from: the replica is gone or failed (UNAVAILABLE, UNKNOWN, INTERNAL, a transport error) or
// the stream stalled.
func (s *Session) shouldResume(att *attachment, err error) bool {
	if err == io.EOF || s.ctx.Err() != nil || !s.canResume() {
		return false
	}
	if errors.Is(context.Cause(att.ctx), errStalled) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.Unknown, codes.Internal:
		return true
	}
	return false
}

// breakCause describes why att's stream broke, for the error of a resume that fails.
func (s *Session) breakCause(att *attachment, err error) error {
	if errors.Is(context.Cause(att.ctx), errStalled) {
		return fmt.Errorf("the stream from %s delivered nothing for %v", att.address, s.stallTimeout)
	}
	return err
}

// resume moves the session to a new stream (on another replica when its own is gone) and
// hands the send goroutine what the new stream needs first. It returns the new stream, or the
// error that ends the session.
func (s *Session) resume(old *attachment, cause error) (*attachment, error) {
	old.cancel(errReplaced) // unblocks a send stuck on the old stream
	att, err := s.attach(true, old.address)
	if err != nil {
		if cerr := s.ctx.Err(); cerr != nil {
			return nil, status.FromContextError(cerr).Err()
		}
		s.mu.Lock()
		id := s.sessionID
		s.mu.Unlock()
		return nil, fmt.Errorf("avatarforcing: session %s broke (%v) and did not resume within %v: %w",
			id, cause, s.resumeTimeout, err)
	}
	s.sendMu.Lock()
	s.mu.Lock()
	s.cur, s.started = att, att.started
	s.replay = s.replayLocked()
	s.mu.Unlock()
	s.replayPending = true
	s.sendMu.Unlock()
	s.resumes.Add(1)
	select {
	case s.kick <- struct{}{}:
	default:
	}
	return att, nil
}

// resumeBlock is the first block not fully received: the resumed stream starts there.
func (s *Session) resumeBlock() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rs.resumeBlock(int64(s.started.GetFramesPerBlock()))
}

// replayLocked returns the messages a resumed stream gets first: the audio not covered by
// frames received (from the resume buffer), then EndOfAudio if it had been sent. The new
// stream's audio starts there. mu is held.
func (s *Session) replayLocked() []*pb.StreamRequest {
	audio, eoa := s.rs.beginStream()
	out := make([]*pb.StreamRequest, 0, len(audio)+1)
	for _, ch := range audio {
		out = append(out, &pb.StreamRequest{Message: &pb.StreamRequest_Audio{Audio: &pb.AudioChunk{Data: ch.pcm}}})
	}
	if eoa {
		out = append(out, &pb.StreamRequest{Message: &pb.StreamRequest_EndOfAudio{EndOfAudio: &pb.EndOfAudio{}}})
	}
	return out
}

// track records a message about to be sent, for a resume.
func (s *Session) track(req *pb.StreamRequest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.tracking {
		return
	}
	switch m := req.GetMessage().(type) {
	case *pb.StreamRequest_Audio:
		s.rs.onAudioSent(m.Audio.GetData())
	case *pb.StreamRequest_EndOfAudio:
		s.rs.onEndOfAudioSent()
	case *pb.StreamRequest_Interrupt:
		s.rs.onInterruptSent()
	}
}

// onFrame does the resume bookkeeping of a frame; false: a duplicate of a frame delivered
// before a resume.
func (s *Session) onFrame(f *pb.VideoFrame) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.tracking || s.rs.onFrame(int64(f.GetIndex()), int64(s.started.GetFramesPerBlock()))
}

// onAudio does the resume bookkeeping of an AudioOut: false, a duplicate; and where its stream's
// audio starts in the session's audio.
func (s *Session) onAudio(a *pb.AudioOut) (bool, int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.tracking || s.rs.onAudioOut(a.GetBlockIndex(), int64(a.GetSourceEndSample())), s.rs.streamBase
}
