package avatarforcing

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultChunk is the audio chunk duration StreamWAV uses, and StreamPCM when given 0.
const DefaultChunk = 20 * time.Millisecond

// MaxChunk is the longest audio one message may carry (the server's limit). SendAudio splits
// longer buffers into chunks of this length.
const MaxChunk = time.Second

// closeSendWait bounds how long Close waits for the send goroutine to half-close the stream
// (it may be blocked in a Send that flow control holds back) before cancelling it.
const closeSendWait = time.Second

// minKeepAliveInterval bounds how often automatic KeepAlives may go out, whatever the
// server's idle timeout.
const minKeepAliveInterval = 10 * time.Millisecond

// Event is one response of a started session. Exactly one field is set.
type Event struct {
	// Frame is a video frame; its Data is in the session's video encoding.
	Frame *pb.VideoFrame
	// Audio is the re-timed audio (PCM16LE mono at SessionStarted.AudioSampleRateHz) that
	// plays with one block of frames, silence the server inserted included; the samples that
	// came from the client are Data[2*RealOffset : 2*(RealOffset+RealSamples)] (bytes).
	Audio *pb.AudioOut
	// StreamStartSample, with Audio: where the stream that delivered it starts in the session's
	// audio (samples from the first sent; 0 until a resume), so StreamStartSample +
	// Audio.SourceEndSample is a position that holds across resumes, comparable with the samples
	// sent over the whole session.
	StreamStartSample int64
	// Stats are the session's periodic counters.
	Stats *pb.Stats
	// End is the last event: why the session ended.
	End *pb.End
}

// Session is one avatar session: one Stream call, or several when it resumes on another
// replica after its stream broke. Create it with Client.StartSession. Its methods are safe for
// concurrent use; Events should be read by one goroutine. Always call Close when done (it is
// idempotent).
type Session struct {
	client *Client
	opts   SessionOptions
	base   *pb.SessionConfig // the config every stream starts with (ids and resume block set per stream)

	ctx    context.Context // the session's context; cancelled when the session ends
	cancel context.CancelFunc

	resumeTimeout time.Duration // 0: the session does not resume
	stallTimeout  time.Duration // 0: no frame-stall watchdog

	sendq      chan sendItem
	closing    chan struct{} // closed by Close
	senderDone chan struct{}
	recvDone   chan struct{}
	events     chan Event
	kick       chan struct{} // wakes the send goroutine after a resume

	closeOnce sync.Once
	closed    atomic.Bool
	resumes   atomic.Int64

	// Automatic KeepAlive: keepAliveEvery (0: off) is a third of the server's idle timeout;
	// lastSend is when a message was last queued or sent, in nanoseconds since t0.
	t0             time.Time
	keepAliveEvery time.Duration
	lastSend       atomic.Int64

	// sendMu serialises writing on the stream: the send goroutine holds it to record and send a
	// message, the receive goroutine to swap in a resumed stream.
	sendMu        sync.Mutex
	replay        []*pb.StreamRequest // what a resumed stream gets before anything else
	replayPending bool
	halfClosed    bool // CloseSend went out

	mu         sync.Mutex
	cur        *attachment // the current stream; swapped with sendMu and mu held
	started    *pb.SessionStarted
	sessionID  string
	token      string
	routed     bool   // placed through CreateSession: the session can resume
	avatarID   string // the avatar the streams name (SessionOptions.AvatarID, or its re-registered id)
	sendClosed bool   // CloseSend was called
	sendErr    error  // why the send goroutine stopped
	end        *pb.End
	done       bool  // the receive side has finished (err is final)
	err        error // the terminal error

	// Resume bookkeeping (mu).
	tracking bool        // the session can resume: keep audio, drop duplicates
	rs       resumeState // what the session sent and received, for a resume
}

type sendItem struct {
	req       *pb.StreamRequest
	closeSend bool
}

// StartSession validates opts, places the session, opens a Stream, sends the SessionConfig
// and waits for SessionStarted.
//
// Invalid options are rejected before any RPC with an error wrapping ErrInvalidArgument. When
// the server refuses the session, the error is its gRPC status error (see status.Code):
// INVALID_ARGUMENT (bad image or config), NOT_FOUND (unknown AvatarID), RESOURCE_EXHAUSTED (no
// free slot), UNAVAILABLE (the replica is shutting down). That error is a *StartError, which
// keeps the trailer and still satisfies status.Code and status.FromError; with
// RESOURCE_EXHAUSTED, RetryAfter(err) returns how long the server asks you to wait.
//
// Placement (a server with CreateSession, no Router) is retried while replicas are full
// (RESOURCE_EXHAUSTED, waiting what the server's retry-after-ms asks), unreachable or draining
// (UNAVAILABLE), ABORTED or do not answer in time (DEADLINE_EXCEEDED), with a jittered backoff,
// for up to the placement timeout (WithPlacementTimeout, default 10 s); each attempt is bounded
// by the attach timeout (WithAttachTimeout, default 3 s), so that StartSession returns within
// the placement timeout even when a replica accepts connections and never answers. Then the
// last error is returned.
//
// When SessionStarted announces an idle timeout, the session sends KeepAlive by itself
// whenever nothing was sent for a third of it (unless SessionOptions.DisableAutoKeepAlive),
// so a session that only listens stays open.
//
// ctx governs the whole session, not only its start: when it is cancelled or its deadline
// passes the stream is cancelled, the server frees the session's slot, Events closes and Err
// reports the cancellation. Use a context that lives as long as the session.
func (c *Client) StartSession(ctx context.Context, opts SessionOptions) (*Session, error) {
	o, err := opts.normalized()
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s := c.newSession(ctx, o)
	att, err := s.attach(false, "")
	if err != nil {
		s.cancel()
		return nil, err
	}
	s.cur, s.started = att, att.started
	s.tracking = s.routed && s.resumeTimeout > 0
	if o.Pacing == pb.Pacing_PACING_ASAP || !s.tracking {
		s.stallTimeout = 0 // the server may pause an ASAP session; a stall that cannot resume is waited out
	}
	s.t0 = time.Now()
	// (An absurd timeout, over ~30 years or infinite, counts as none.)
	if idle := att.started.GetIdleTimeoutMs(); !o.DisableAutoKeepAlive && idle > 0 && idle < 1e12 {
		s.keepAliveEvery = max(minKeepAliveInterval, time.Duration(idle*float64(time.Millisecond)/3))
	}
	go s.sendLoop()
	go s.recvLoop()
	return s, nil
}

func (c *Client) newSession(ctx context.Context, o SessionOptions) *Session {
	sctx, cancel := context.WithCancel(ctx)
	s := &Session{
		client:     c,
		opts:       o,
		base:       o.config(),
		ctx:        sctx,
		cancel:     cancel,
		sendq:      make(chan sendItem, o.SendBuffer),
		closing:    make(chan struct{}),
		senderDone: make(chan struct{}),
		recvDone:   make(chan struct{}),
		events:     make(chan Event, o.EventBuffer),
		kick:       make(chan struct{}, 1),
		avatarID:   o.AvatarID,
	}
	switch {
	case o.ResumeTimeout > 0:
		s.resumeTimeout = o.ResumeTimeout
	case o.ResumeTimeout == 0 && c.timeouts.resume > 0:
		s.resumeTimeout = c.timeouts.resume
	}
	switch {
	case o.StallTimeout > 0:
		s.stallTimeout = o.StallTimeout
	case o.StallTimeout == 0 && c.timeouts.stall > 0:
		s.stallTimeout = c.timeouts.stall
	}
	buffer := o.ResumeBuffer
	if buffer == 0 {
		buffer = c.timeouts.resumeBuffer
	}
	s.rs = newResumeState(int64(buffer.Seconds() * float64(o.SampleRate)))
	return s
}

// Started returns the server's SessionStarted message (session id, fps, size, latency, ...).
// After a resume it is the resumed stream's (NodeId names the replica the session runs on now,
// FirstFrameIndex where that stream started).
func (s *Session) Started() *pb.SessionStarted {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.started
}

// Resumes returns how many times the session resumed after its stream broke.
func (s *Session) Resumes() int { return int(s.resumes.Load()) }

// StreamStartSample is where the current stream's audio starts in the session's audio (samples
// from the first sent; 0 until a resume). Event.StreamStartSample is the same, as it was when that
// event's stream delivered it.
func (s *Session) StreamStartSample() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rs.streamBase
}

// SampleRate is the sample rate of the audio the session takes (SessionOptions.SampleRate).
func (s *Session) SampleRate() int { return s.opts.SampleRate }

// Events returns the session's responses in order: frames, audio, stats, and finally End.
// The channel closes after End or when the session ends for any other reason; Err then says
// why. When the session resumes on another replica the channel goes on: frame indices
// continue and no frame or AudioOut block is delivered twice (an End with
// END_REASON_SERVER_SHUTDOWN that the session resumes from is not delivered). If nobody reads
// it, the session stalls rather than losing events (see the package documentation), until
// Close or the StartSession context ends it.
func (s *Session) Events() <-chan Event { return s.events }

// Err returns the terminal error once Events has closed (nil while the session runs): nil
// after the server's End, the server's gRPC status error when the stream failed (for example
// INVALID_ARGUMENT for a malformed message, or codes.Canceled when the StartSession context was
// cancelled), ErrClosed when Close ended the session before End, or an error wrapping
// ErrProtocol. When a broken stream could not be resumed, it wraps the last error of the
// resume (status.Code sees it: NOT_FOUND when the session is gone, DEADLINE_EXCEEDED or
// UNAVAILABLE when the resume timeout passed) and says why the stream broke.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// End returns the End message once it was received, else nil.
func (s *Session) End() *pb.End {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.end
}

// Done is closed when the session has finished: Events is closed, Err is final and both
// goroutines have exited, or are about to.
func (s *Session) Done() <-chan struct{} { return s.recvDone }

// SendAudio queues PCM16LE mono audio at the session's sample rate. pcm must hold a whole
// number of samples (an even number of bytes); buffers over MaxChunk are split. The data is
// copied, so the caller may reuse pcm at once.
//
// SendAudio returns once the audio is queued, not when it is on the wire: when the queue
// (SessionOptions.SendBuffer messages) is full it blocks until there is room or ctx ends;
// that is the backpressure. A failed send shows up as an error from a later send (wrapping
// ErrSessionEnded) and as Err.
func (s *Session) SendAudio(ctx context.Context, pcm []byte) error {
	if len(pcm)%2 != 0 {
		return invalid("PCM16 audio must have an even number of bytes (whole 16-bit samples), got %d", len(pcm))
	}
	if len(pcm) == 0 {
		return s.sendState()
	}
	maxBytes := 2 * s.opts.SampleRate * int(MaxChunk/time.Second)
	for len(pcm) > 0 {
		n := min(len(pcm), maxBytes)
		req := &pb.StreamRequest{Message: &pb.StreamRequest_Audio{Audio: &pb.AudioChunk{Data: bytes.Clone(pcm[:n])}}}
		if err := s.enqueue(ctx, sendItem{req: req}); err != nil {
			return err
		}
		pcm = pcm[n:]
	}
	return nil
}

// Interrupt queues an Interrupt: the server drops the audio it has buffered and not yet
// rendered (including audio queued here before the call) and the avatar goes back to idle.
// Stop any goroutine still streaming audio first, or its audio follows the interrupt.
func (s *Session) Interrupt(ctx context.Context) error {
	return s.enqueue(ctx, sendItem{req: &pb.StreamRequest{Message: &pb.StreamRequest_Interrupt{Interrupt: &pb.Interrupt{}}}})
}

// EndOfAudio queues an EndOfAudio: the server renders every sample received. With PACING_ASAP
// the stream then ends (End reason END_OF_AUDIO, and more audio is an error); with
// PACING_REALTIME idle frames follow and more audio may still be sent.
func (s *Session) EndOfAudio(ctx context.Context) error {
	return s.enqueue(ctx, sendItem{req: &pb.StreamRequest{Message: &pb.StreamRequest_EndOfAudio{EndOfAudio: &pb.EndOfAudio{}}}})
}

// KeepAlive queues a KeepAlive, which resets the server's idle timer for the session (a
// session that sends nothing for the server's idle timeout, SessionStarted.IdleTimeoutMs, ends
// with END_REASON_IDLE_TIMEOUT). The session already sends KeepAlives by itself unless
// SessionOptions.DisableAutoKeepAlive is set.
func (s *Session) KeepAlive(ctx context.Context) error {
	return s.enqueue(ctx, sendItem{req: &pb.StreamRequest{Message: &pb.StreamRequest_KeepAlive{KeepAlive: &pb.KeepAlive{}}}})
}

// CloseSend queues a half-close after the messages already queued: the server renders the
// audio it has and ends the session (End reason END_OF_AUDIO after an EndOfAudio, else
// CLIENT_CLOSED). Later sends return ErrSendClosed; keep reading Events until it closes.
func (s *Session) CloseSend(ctx context.Context) error {
	if err := s.sendState(); err != nil {
		return err
	}
	// Refuse later sends first, so that none is queued behind the half-close.
	s.mu.Lock()
	s.sendClosed = true
	s.mu.Unlock()
	select {
	case s.sendq <- sendItem{closeSend: true}:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		s.sendClosed = false
		s.mu.Unlock()
		return ctx.Err()
	case <-s.senderDone:
		return ErrSessionEnded
	}
}

// StreamPCM sends PCM16LE mono audio read from r, at the session's sample rate, in chunks of
// the given duration (0: DefaultChunk; at most MaxChunk), until r returns io.EOF. It returns
// the number of samples sent. With realtime set, audio goes out no faster than real time:
// each chunk leaves when the clock, started at the first chunk, reaches the duration of the
// audio sent before it. StreamPCM does not send EndOfAudio; call EndOfAudio afterwards when
// the utterance is complete. A dangling byte at the end of r is an error.
func (s *Session) StreamPCM(ctx context.Context, r io.Reader, realtime bool, chunk time.Duration) (int64, error) {
	if chunk == 0 {
		chunk = DefaultChunk
	}
	if chunk < 0 || chunk > MaxChunk {
		return 0, invalid("chunk duration %v is out of range; use up to %v (0: %v)", chunk, MaxChunk, DefaultChunk)
	}
	rate := int64(s.opts.SampleRate)
	n := max(1, int(rate*int64(chunk)/int64(time.Second)))
	buf := make([]byte, 2*n)
	var (
		sent  int64
		t0    time.Time
		timer *time.Timer
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		k, err := io.ReadFull(r, buf)
		if k%2 != 0 {
			return sent, invalid("PCM16 audio ended with a dangling byte (odd total length)")
		}
		if k > 0 {
			if realtime {
				if sent == 0 {
					t0 = time.Now()
				} else if wait := time.Until(t0.Add(samplesDuration(sent, rate))); wait > 0 {
					if timer == nil {
						timer = time.NewTimer(wait)
					} else {
						timer.Reset(wait)
					}
					select {
					case <-timer.C:
					case <-ctx.Done():
						return sent, ctx.Err()
					}
				}
			}
			if err := s.SendAudio(ctx, buf[:k]); err != nil {
				return sent, err
			}
			sent += int64(k / 2)
		}
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			return sent, nil
		case err != nil:
			return sent, err
		}
	}
}

func samplesDuration(n, rate int64) time.Duration {
	return time.Duration(n/rate)*time.Second + time.Duration(n%rate)*time.Second/time.Duration(rate)
}

// StreamWAV sends a mono 16-bit PCM WAV file whose sample rate is the session's, in
// DefaultChunk chunks, as StreamPCM does (realtime paces it; no EndOfAudio is sent). Other
// formats are rejected with an error that says what the file holds; nothing is resampled.
func (s *Session) StreamWAV(ctx context.Context, path string, realtime bool) (int64, error) {
	w, err := ReadWAV(path)
	if err != nil {
		return 0, err
	}
	if w.SampleRate != s.opts.SampleRate {
		return 0, invalid("%s is sampled at %d Hz but the session takes %d Hz; resample the file or start the session with SampleRate %d",
			path, w.SampleRate, s.opts.SampleRate, w.SampleRate)
	}
	return s.StreamPCM(ctx, bytes.NewReader(w.PCM), realtime, DefaultChunk)
}

// Close ends the session now: it half-closes the stream, cancels it (the server frees the
// slot), discards messages still queued, and waits for both goroutines to exit. It is
// idempotent and safe to call from any goroutine. To let the server finish rendering first,
// call EndOfAudio (PACING_ASAP) or CloseSend and read Events until it closes before Close.
//
// Close returns Err, except that it returns nil when Close itself ended the session.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		close(s.closing)
		t := time.NewTimer(closeSendWait)
		select {
		case <-s.senderDone:
		case <-t.C:
		}
		t.Stop()
		s.cancel()
		<-s.senderDone
		<-s.recvDone
	})
	if err := s.Err(); !errors.Is(err, ErrClosed) {
		return err
	}
	return nil
}

// enqueue hands one item to the send goroutine, blocking while the queue is full.
func (s *Session) enqueue(ctx context.Context, it sendItem) error {
	if err := s.sendState(); err != nil {
		return err
	}
	select {
	case s.sendq <- it:
		s.touch()
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.senderDone:
		if err := s.sendState(); err != nil {
			return err
		}
		return ErrSessionEnded
	}
}

// sendState returns why sends are no longer possible, or nil.
func (s *Session) sendState() error {
	if s.closed.Load() {
		return ErrClosed
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sendClosed {
		return ErrSendClosed
	}
	if s.done || s.end != nil {
		if s.err != nil {
			return fmt.Errorf("%w: %w", ErrSessionEnded, s.err)
		}
		return ErrSessionEnded
	}
	select {
	case <-s.senderDone:
		if s.sendErr != nil && s.sendErr != io.EOF {
			return fmt.Errorf("%w: %w", ErrSessionEnded, s.sendErr)
		}
		return ErrSessionEnded
	default:
	}
	return nil
}

// touch records that a message was queued or sent now.
func (s *Session) touch() { s.lastSend.Store(int64(time.Since(s.t0))) }

// sinceLastSend is how long ago a message was last queued or sent.
func (s *Session) sinceLastSend() time.Duration {
	return time.Since(s.t0) - time.Duration(s.lastSend.Load())
}

func (s *Session) sendLoop() {
	defer close(s.senderDone)
	// The automatic KeepAlive runs here, not in a goroutine of its own: it stops with the
	// send side, and it never races the queued messages on the stream.
	var (
		timer     *time.Timer
		keepAlive <-chan time.Time // nil (never ready) when automatic KeepAlive is off
	)
	if s.keepAliveEvery > 0 {
		timer = time.NewTimer(s.keepAliveEvery - s.sinceLastSend())
		defer timer.Stop()
		keepAlive = timer.C
	}
	for {
		select {
		case <-s.closing:
			s.sendMu.Lock()
			_ = s.cur.stream.CloseSend()
			s.sendMu.Unlock()
			return
		case <-s.ctx.Done():
			return
		case <-s.kick:
			s.sendMu.Lock()
			s.flushReplayLocked()
			s.sendMu.Unlock()
		case <-keepAlive:
			if s.sinceLastSend() >= s.keepAliveEvery {
				if !s.write(&pb.StreamRequest{Message: &pb.StreamRequest_KeepAlive{KeepAlive: &pb.KeepAlive{}}}) {
					return
				}
			}
			timer.Reset(s.keepAliveEvery - s.sinceLastSend())
		case it := <-s.sendq:
			if it.closeSend {
				s.sendMu.Lock()
				s.flushReplayLocked()
				s.halfClosed = true
				_ = s.cur.stream.CloseSend()
				s.sendMu.Unlock()
				if !s.canResume() {
					return
				}
				// Stay to half-close a resumed stream after its replay; nothing else goes out.
				keepAlive = nil
				continue
			}
			if !s.write(it.req) {
				return
			}
		}
	}
}

// write records one message for a resume and sends it on the current stream; false when the
// stream is broken for good.
func (s *Session) write(req *pb.StreamRequest) bool {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.flushReplayLocked()
	s.track(req)
	att := s.cur
	// io.EOF: the stream has finished; the receive goroutine gets its status.
	if err := att.stream.Send(req); err != nil {
		if (err == io.EOF || att.ctx.Err() != nil) && s.canResume() {
			// The receive goroutine resumes the session, whose replay carries this message
			// when it matters (audio, EndOfAudio), or it ends the session.
			return true
		}
		s.mu.Lock()
		s.sendErr = err
		s.mu.Unlock()
		return false
	}
	s.touch()
	return true
}

// flushReplayLocked sends what a resumed stream gets first: the audio not covered by frames
// received, EndOfAudio if it had been sent, and the half-close if it had happened. sendMu is
// held. When the stream breaks again meanwhile, the next resume computes a new replay.
func (s *Session) flushReplayLocked() {
	if !s.replayPending {
		return
	}
	s.replayPending = false
	replay := s.replay
	s.replay = nil
	for _, req := range replay {
		if err := s.cur.stream.Send(req); err != nil {
			return
		}
	}
	if s.halfClosed {
		_ = s.cur.stream.CloseSend()
	}
	s.touch()
}

func (s *Session) recvLoop() {
	defer close(s.recvDone)
	defer s.cancel()
	att := s.cur // only this goroutine swaps it
	first := true
	for {
		resp, err := s.recv(att, first)
		first = false
		if err != nil {
			if s.shouldResume(att, err) {
				if att, err = s.resume(att, s.breakCause(att, err)); err == nil {
					first = true
					continue
				}
			}
			s.finish(err)
			return
		}
		var ev Event
		switch m := resp.GetMessage().(type) {
		case *pb.StreamResponse_Frame:
			if !s.onFrame(m.Frame) {
				continue // a frame delivered before a resume
			}
			ev.Frame = m.Frame
		case *pb.StreamResponse_Audio:
			ok, base := s.onAudio(m.Audio)
			if !ok {
				continue
			}
			ev.Audio, ev.StreamStartSample = m.Audio, base
		case *pb.StreamResponse_Stats:
			ev.Stats = m.Stats
		case *pb.StreamResponse_End:
			if m.End.GetReason() == pb.EndReason_END_REASON_SERVER_SHUTDOWN && s.canResume() && s.ctx.Err() == nil {
				// The replica drains or stops: go on on another one.
				cause := fmt.Errorf("the replica ended the stream (END_REASON_SERVER_SHUTDOWN: %s)", m.End.GetMessage())
				if att, err = s.resume(att, cause); err == nil {
					first = true
					continue
				}
				s.finish(err)
				return
			}
			ev.End = m.End
			s.mu.Lock()
			s.end = m.End
			s.mu.Unlock()
		case *pb.StreamResponse_Started:
			s.finish(fmt.Errorf("%w: a second SessionStarted", ErrProtocol))
			return
		default:
			continue // a response type newer than this client
		}
		select {
		case s.events <- ev:
		case <-s.ctx.Done():
			s.finish(status.FromContextError(s.ctx.Err()).Err())
			return
		}
		if ev.End != nil {
			s.finish(nil)
			// The server closes the stream right after End: read its status without cancelling
			// the call, so the server's handler finishes cleanly.
			for {
				if _, err := att.stream.Recv(); err != nil {
					return
				}
			}
		}
	}
}

// recv reads the next response of att's stream. With the frame-stall watchdog on, a stream
// that delivers nothing for the stall timeout (the first response after SessionStarted may
// take SessionStarted.LatencyMs longer) is cancelled with errStalled. Only the time spent
// waiting here counts: a reader that is slow to take Events does not trigger it.
func (s *Session) recv(att *attachment, first bool) (*pb.StreamResponse, error) {
	if s.stallTimeout <= 0 {
		return att.stream.Recv()
	}
	d := s.stallTimeout
	if first {
		d += time.Duration(att.started.GetLatencyMs() * float64(time.Millisecond))
	}
	if att.watchdog == nil {
		att.watchdog = time.AfterFunc(d, func() { att.cancel(errStalled) })
	} else {
		att.watchdog.Reset(d)
	}
	resp, err := att.stream.Recv()
	att.watchdog.Stop()
	return resp, err
}

// finish records the terminal error (once) and closes Events.
func (s *Session) finish(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.done = true
	switch {
	case s.end != nil:
		s.err = nil
	case err == io.EOF:
		s.err = fmt.Errorf("%w: the server closed the stream without sending End", ErrProtocol)
	case s.closed.Load() && (status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled)):
		s.err = ErrClosed
	default:
		s.err = err
	}
	close(s.events)
}
