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
// # Routing
//
// A fleet of replicas routes sessions through the CreateSession RPC (docs/routing.md):
// StartSession asks the server it is connected to (for example a load-balanced address) where
// the session runs, dials that replica (with the Client's credentials and metadata; the
// connection is kept until Client.Close) and streams there, following a FAILED_PRECONDITION
// redirect to the owner. When every replica is full it returns RESOURCE_EXHAUSTED with a
// RetryAfter hint. Against a server without CreateSession it streams over the Client's own
// connection. This package does not resume a session on another replica when its stream
// fails; the Python SDK does. The extension point is [Router]: set
// one with [WithRouter] and StartSession asks it for the connection that carries each new
// session; without one, every session streams over the Client's own connection.
package avatarforcing
