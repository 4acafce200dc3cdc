// Package avatarforcing is the Go client for AvatarForcing Serve, a real-time talking-avatar
// service: speech audio streams in over one bidirectional gRPC stream per session and
// lip-synced video frames, with the re-timed audio that plays with them, stream out.
//
// The wire API is proto/avatarforcing/v1/avatarforcing.proto; its generated Go code is the
// package [github.com/avatarforcing/serve/clients/go/avatarforcingv1] (imported here as pb),
// whose message types this package passes through unchanged.
//
// # Use
//
//	client, err := avatarforcing.Dial(ctx, "localhost:50051")
//	...
//	defer client.Close()
//	s, err := client.StartSession(ctx, avatarforcing.SessionOptions{Image: png, Pacing: pb.Pacing_PACING_ASAP})
//	...
//	defer s.Close()
//	go func() {
//		if _, err := s.StreamWAV(ctx, "speech_16k.wav", false); err == nil {
//			s.EndOfAudio(ctx)
//		}
//	}()
//	for ev := range s.Events() {
//		if ev.Frame != nil { ... }
//	}
//	if err := s.Err(); err != nil { ... } // a gRPC status error; nil after a clean End
//
// # Sessions and goroutines
//
// [Client.StartSession] validates its options before any RPC, opens the Stream, sends the
// SessionConfig and waits for SessionStarted; a refused session returns the server's gRPC
// status error (use [google.golang.org/grpc/status.Code] on it: INVALID_ARGUMENT for a bad
// image, NOT_FOUND for an unknown avatar id, RESOURCE_EXHAUSTED when the replica is full, ...),
// wrapped in a [StartError] that keeps the stream's trailer: [RetryAfter] returns the wait the
// server asks for before trying again.
//
// A started [Session] runs two goroutines. The send goroutine writes the messages queued by
// [Session.SendAudio], [Session.Interrupt], [Session.EndOfAudio] and [Session.KeepAlive], in
// the order they were queued; the queue is bounded, so a sender that outpaces the network (or
// a server that stops reading) blocks in those calls — that is the backpressure — until there
// is room or the call's context ends. The receive goroutine reads the server's responses and
// delivers them on [Session.Events] in order.
//
// Idle timeout: the server ends a session that sends nothing for SessionStarted.IdleTimeoutMs
// (END_REASON_IDLE_TIMEOUT). The send goroutine therefore sends a KeepAlive whenever nothing
// was queued or sent for a third of that time, so a session that only listens stays open;
// SessionOptions.DisableAutoKeepAlive turns that off.
//
// Slow readers: the receive goroutine never drops an event. When the caller stops reading
// Events and the channel's buffer is full, the goroutine blocks, stops reading the stream, and
// gRPC flow control pushes back to the server. That is intended: with PACING_ASAP the server
// then stops rendering the session until the client catches up; with PACING_REALTIME the
// server applies its slow-client policy (it drops whole blocks, keyframe-restarts H.264). It
// never deadlocks the client: [Session.Close] and the cancellation of the context given to
// StartSession always end both goroutines, whether or not anyone reads Events.
//
// The session ends when the server sends End (Events closes, Err returns nil), when the
// stream fails (Events closes, Err returns the gRPC status error), when the context given to
// StartSession is cancelled (the server frees the slot), or on [Session.Close].
//
// # Routing and resume
//
// A fleet of replicas routes sessions through the CreateSession RPC (docs/routing.md):
// StartSession asks the server it is connected to (for example a load-balanced address) where
// the session runs, dials that replica (with the Client's credentials, metadata and keepalive;
// the connection is kept until Client.Close) and streams there, following a
// FAILED_PRECONDITION redirect to the owner. Against a server without CreateSession it streams
// over the Client's own connection, in one attempt.
//
// Placement is retried while it fails for a reason that passes (RESOURCE_EXHAUSTED, waiting
// what the server's retry-after-ms asks; UNAVAILABLE; ABORTED; DEADLINE_EXCEEDED), with a
// jittered backoff, for up to the placement timeout ([WithPlacementTimeout], 10 s); then the
// last error is returned (RESOURCE_EXHAUSTED with its [RetryAfter] hint when every replica
// stayed full). Every attempt has a deadline ([WithAttachTimeout], 3 s, bounded by the time
// left): one CreateSession call, or a Stream until its SessionStarted. A stream attempt that
// times out is cancelled and placement is asked again, so a replica that accepts connections
// and never answers cannot hold StartSession past the placement timeout. CreateSession goes to
// the Dial target, then to the [WithFallbackTargets] addresses and the replicas sessions were
// placed on, while one does not answer.
//
// A placed session resumes by itself when its stream breaks: a status UNAVAILABLE, UNKNOWN or
// INTERNAL (a replica killed, a connection lost), End with END_REASON_SERVER_SHUTDOWN (a
// replica draining), or the frame-stall watchdog. It asks CreateSession where the session
// resumes (going last to the replica whose stream broke, when it knows another target), opens
// a Stream there with the same session id and token and the first block it has not fully
// received, sends again the audio sent but not covered by the frames received (the AudioOut of
// each complete block says how far the client's audio got; at most [WithResumeBuffer], 10 s, of
// it is kept), then EndOfAudio if it had been sent, and goes on. Events goes on too: frame
// indices continue, frames and AudioOut blocks already delivered are not delivered again, and
// [Session.Resumes] counts the resumes. The video after a resume starts from the avatar's
// anchor (the model's window starts fresh). A caveat for H.264 and fMP4: the resumed stream
// is encoded afresh from the start of its first block, whose first frame is a keyframe; when
// the break fell inside a block, that keyframe is one of the frames already delivered and is
// dropped as a duplicate, so the frames after it reference a picture the caller never got and
// a decoder shows artifacts until the next keyframe (the server's GOP, 2 s by default). RAW
// and JPEG frames are unaffected. Placement retries apply, with the resume timeout ([WithResumeTimeout],
// 15 s; 0 turns resuming off; SessionOptions.ResumeTimeout per session) in place of the
// placement timeout; NOT_FOUND (the session expired), PERMISSION_DENIED and other refusals
// end the session at once. A session that does not resume ends with an error (Err) that wraps
// the resume's last error and says why the stream broke.
//
// Frame-stall watchdog: in PACING_REALTIME the server sends frames continuously, idle ones
// included, so a placed REALTIME session whose stream delivers nothing for the stall timeout
// ([WithStallTimeout], 1 s; the first frame of a stream may take SessionStarted.LatencyMs
// longer) while the session waits on it treats the stream as broken and resumes. Only time
// spent waiting on the stream counts: a caller that is slow to read Events does not trigger
// it. PACING_ASAP sessions (which the server may pause) and sessions that cannot resume have
// no watchdog.
//
// Avatars: [Client.RegisterAvatar] keeps the image of the last 64 avatars it registered. When
// a Stream naming one of them is refused NOT_FOUND for the avatar (a replica that restarted,
// or one that never saw it), the session registers the image on that replica (the same image
// gives the same id) and opens the stream once more.
//
// Connections: every connection the Client dials sends gRPC keepalive pings
// ([DefaultKeepalive]: after 10 s without traffic, declared dead after 5 s more without an
// answer, also while no call is open), so a replica that vanished without closing its
// connections (a cut network, a frozen host) is noticed; [WithKeepalive] changes it.
//
// The extension point is [Router]: set one with [WithRouter] and StartSession asks it for the
// connection that carries each new session instead of asking for placement; such sessions do
// not resume.
package avatarforcing
