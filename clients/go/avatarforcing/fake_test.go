package avatarforcing_test

// Session mechanics against an in-process fake server (no Python): ordering, splitting,
// metadata, backpressure, a reader that stops reading, Close, protocol errors.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
)

type fakeServer struct {
	pb.UnimplementedAvatarForcingServer
	mu sync.Mutex
	md []metadata.MD // metadata of every call
}

func (f *fakeServer) record(ctx context.Context) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.md = append(f.md, md)
	f.mu.Unlock()
}

func (f *fakeServer) GetServerInfo(ctx context.Context, _ *pb.GetServerInfoRequest) (*pb.ServerInfo, error) {
	f.record(ctx)
	return &pb.ServerInfo{CapacitySessions: 1, FreeSlots: 1}, nil
}

func (f *fakeServer) RegisterAvatar(ctx context.Context, r *pb.RegisterAvatarRequest) (*pb.RegisterAvatarResponse, error) {
	f.record(ctx)
	return &pb.RegisterAvatarResponse{AvatarId: "av_" + r.Name}, nil
}

func frameResp(i uint64) *pb.StreamResponse {
	return &pb.StreamResponse{Message: &pb.StreamResponse_Frame{Frame: &pb.VideoFrame{Index: i, Data: make([]byte, 1024)}}}
}

func endResp(r pb.EndReason) *pb.StreamResponse {
	return &pb.StreamResponse{Message: &pb.StreamResponse_End{End: &pb.End{Reason: r}}}
}

// Stream behaves according to SessionConfig.utterance_id.
func (f *fakeServer) Stream(st grpc.BidiStreamingServer[pb.StreamRequest, pb.StreamResponse]) error {
	f.record(st.Context())
	first, err := st.Recv()
	if err != nil {
		return err
	}
	cfg := first.GetConfig()
	mode := cfg.GetUtteranceId()
	switch mode {
	case "refuse":
		st.SetTrailer(metadata.Pairs("grpc-retry-pushback-ms", "250", "retry-after-ms", "250"))
		return status.Error(codes.ResourceExhausted, "all 1 session slots of this replica are in use")
	case "refuse-pushback":
		st.SetTrailer(metadata.Pairs("grpc-retry-pushback-ms", "1500"))
		return status.Error(codes.ResourceExhausted, "full")
	case "refuse-bare":
		return status.Error(codes.ResourceExhausted, "full")
	}
	started := &pb.StreamResponse{Message: &pb.StreamResponse_Started{Started: &pb.SessionStarted{
		SessionId: "s_fake", Fps: 25, FramesPerBlock: 4, AudioSampleRateHz: cfg.GetAudioFormat().GetSampleRateHz()}}}
	if mode == "idle" { // echo, with an idle timeout of 300 ms
		started.GetStarted().IdleTimeoutMs = 300
	}
	if err := st.Send(started); err != nil {
		return err
	}
	switch mode {
	case "flood":
		for i := uint64(0); ; i++ {
			if err := st.Send(frameResp(i)); err != nil {
				return err
			}
		}
	case "stall":
		<-st.Context().Done()
		return nil
	case "twostarted":
		return st.Send(started)
	case "eof":
		return nil
	}
	// "echo": audio comes back as AudioOut, control messages as Stats naming them.
	for {
		req, err := st.Recv()
		if err == io.EOF {
			return st.Send(endResp(pb.EndReason_END_REASON_CLIENT_CLOSED))
		}
		if err != nil {
			return err
		}
		var resp *pb.StreamResponse
		switch m := req.Message.(type) {
		case *pb.StreamRequest_Audio:
			resp = &pb.StreamResponse{Message: &pb.StreamResponse_Audio{Audio: &pb.AudioOut{Data: m.Audio.Data}}}
		case *pb.StreamRequest_Interrupt:
			resp = &pb.StreamResponse{Message: &pb.StreamResponse_Stats{Stats: &pb.Stats{UtteranceId: "interrupt"}}}
		case *pb.StreamRequest_KeepAlive:
			resp = &pb.StreamResponse{Message: &pb.StreamResponse_Stats{Stats: &pb.Stats{UtteranceId: "keepalive"}}}
		case *pb.StreamRequest_EndOfAudio:
			return st.Send(endResp(pb.EndReason_END_REASON_END_OF_AUDIO))
		default:
			return status.Error(codes.FailedPrecondition, "unexpected message")
		}
		if err := st.Send(resp); err != nil {
			return err
		}
	}
}

// startFake serves a fakeServer over an in-memory connection and returns a Client for it.
func startFake(t *testing.T, opts ...avatarforcing.Option) (*avatarforcing.Client, *fakeServer) {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	// A fixed 64 KiB window (no BDP growth) so that a server that stops reading blocks sends.
	gs := grpc.NewServer(grpc.InitialWindowSize(64<<10), grpc.InitialConnWindowSize(64<<10))
	fs := &fakeServer{}
	pb.RegisterAvatarForcingServer(gs, fs)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	opts = append([]avatarforcing.Option{avatarforcing.WithDialOptions(
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10),
	)}, opts...)
	c, err := avatarforcing.Dial(context.Background(), "passthrough:///bufnet", opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, fs
}

// checkNoSessionGoroutines fails when a session goroutine is still running after a while.
func checkNoSessionGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "avatarforcing.(*Session).sendLoop") &&
			!strings.Contains(stacks, "avatarforcing.(*Session).recvLoop") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("session goroutines still running:\n%s", stacks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestFakeMetadataOnEveryRPC(t *testing.T) {
	c, fs := startFake(t, avatarforcing.WithBearerToken("s3cret"), avatarforcing.WithMetadata("x-tenant", "acme"))
	ctx := testCtx(t, 5*time.Second)
	if _, err := c.ServerInfo(ctx); err != nil {
		t.Fatal(err)
	}
	if id, err := c.RegisterAvatar(ctx, []byte("png"), "bob"); err != nil || id != "av_bob" {
		t.Fatalf("RegisterAvatar = %q, %v", id, err)
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if len(fs.md) != 3 {
		t.Fatalf("%d calls recorded, want 3", len(fs.md))
	}
	for i, md := range fs.md {
		if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer s3cret" {
			t.Errorf("call %d: authorization = %q", i, got)
		}
		if got := md.Get("x-tenant"); len(got) != 1 || got[0] != "acme" {
			t.Errorf("call %d: x-tenant = %q", i, got)
		}
	}
}

func TestFakeOrderSplitAndEnd(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 5*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_x", SampleRate: 8000, UtteranceID: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Started().SessionId != "s_fake" || s.SampleRate() != 8000 {
		t.Fatalf("Started = %v, SampleRate = %d", s.Started(), s.SampleRate())
	}
	pcm := make([]byte, 2*8000*5/2) // 2.5 s at 8 kHz: split into 1 s + 1 s + 0.5 s
	for i := range pcm {
		pcm[i] = byte(i)
	}
	if err := s.SendAudio(ctx, pcm); err != nil {
		t.Fatal(err)
	}
	if err := s.SendAudio(ctx, pcm[:3]); !errors.Is(err, avatarforcing.ErrInvalidArgument) {
		t.Fatalf("odd-length SendAudio = %v, want ErrInvalidArgument", err)
	}
	if err := s.SendAudio(ctx, nil); err != nil {
		t.Fatalf("empty SendAudio = %v", err)
	}
	for _, f := range []func(context.Context) error{s.Interrupt, s.KeepAlive, s.EndOfAudio} {
		if err := f(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	var echoed []byte
	for ev := range s.Events() {
		switch {
		case ev.Audio != nil:
			got = append(got, "audio")
			if len(ev.Audio.Data) > 2*8000 {
				t.Errorf("a chunk of %d bytes exceeds one second", len(ev.Audio.Data))
			}
			echoed = append(echoed, ev.Audio.Data...)
		case ev.Stats != nil:
			got = append(got, ev.Stats.UtteranceId)
		case ev.End != nil:
			got = append(got, ev.End.Reason.String())
		}
	}
	want := "audio audio audio interrupt keepalive END_REASON_END_OF_AUDIO"
	if strings.Join(got, " ") != want {
		t.Errorf("events %v, want %s", got, want)
	}
	if !bytes.Equal(echoed, pcm) {
		t.Error("the audio came back different")
	}
	if err := s.Err(); err != nil {
		t.Errorf("Err() = %v", err)
	}
	if err := s.KeepAlive(ctx); !errors.Is(err, avatarforcing.ErrSessionEnded) {
		t.Errorf("KeepAlive after End = %v, want ErrSessionEnded", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	checkNoSessionGoroutines(t)
}

func TestFakeCloseSend(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 5*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CloseSend(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.SendAudio(ctx, []byte{0, 0}); !errors.Is(err, avatarforcing.ErrSendClosed) {
		t.Fatalf("SendAudio after CloseSend = %v, want ErrSendClosed", err)
	}
	var end *pb.End
	for ev := range s.Events() {
		if ev.End != nil {
			end = ev.End
		}
	}
	if end.GetReason() != pb.EndReason_END_REASON_CLIENT_CLOSED || s.Err() != nil {
		t.Fatalf("End = %v, Err = %v", end, s.Err())
	}
}

// A caller that never reads Events must not deadlock the session: Close still ends it.
func TestFakeUnreadEventsDoNotDeadlock(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 10*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "flood", EventBuffer: 4})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the event buffer and the flow-control windows fill up
	if err := s.KeepAlive(ctx); err != nil {
		t.Fatalf("KeepAlive while events pile up = %v", err)
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close = %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Close blocked on a session whose events nobody reads")
	}
	n := 0
	for range s.Events() {
		n++
	}
	if n > 4 {
		t.Errorf("%d events buffered, want at most EventBuffer = 4", n)
	}
	if !errors.Is(s.Err(), avatarforcing.ErrClosed) {
		t.Errorf("Err = %v, want ErrClosed", s.Err())
	}
	checkNoSessionGoroutines(t)
}

// A server that stops reading blocks SendAudio once the queue is full; the context ends the
// wait, and Close still returns.
func TestFakeSendBackpressure(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 10*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "stall", SendBuffer: 2})
	if err != nil {
		t.Fatal(err)
	}
	second := make([]byte, 2*16000) // 32 KiB per message
	sendCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	sent := 0
	for ; sent < 100; sent++ {
		if err := s.SendAudio(sendCtx, second); err != nil {
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("SendAudio = %v, want context.DeadlineExceeded", err)
			}
			break
		}
	}
	if sent >= 100 {
		t.Fatal("SendAudio never blocked against a server that does not read")
	}
	t.Logf("%d one-second chunks queued before SendAudio blocked", sent)
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Close took %v", d)
	}
	checkNoSessionGoroutines(t)
}

func TestFakeRefusedAndProtocolErrors(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 5*time.Second)
	_, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "refuse"})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("refused session: %v, want ResourceExhausted", err)
	}
	if st, ok := status.FromError(err); !ok || st.Message() != "all 1 session slots of this replica are in use" {
		t.Errorf("status.FromError = %v, %v; want the server's status", st, ok)
	}
	if d, ok := avatarforcing.RetryAfter(err); !ok || d != 250*time.Millisecond {
		t.Errorf("RetryAfter = %v, %v; want 250ms, true", d, ok)
	}
	if d, ok := avatarforcing.RetryAfter(fmt.Errorf("starting: %w", err)); !ok || d != 250*time.Millisecond {
		t.Errorf("RetryAfter of a wrapped error = %v, %v; want 250ms, true", d, ok)
	}
	var se *avatarforcing.StartError
	if !errors.As(err, &se) || se.Trailer.Get("retry-after-ms")[0] != "250" {
		t.Errorf("errors.As(StartError) on %v: %v", err, se)
	}
	_, err = c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "refuse-pushback"})
	if d, ok := avatarforcing.RetryAfter(err); !ok || d != 1500*time.Millisecond {
		t.Errorf("RetryAfter with grpc-retry-pushback-ms only = %v, %v; want 1.5s, true", d, ok)
	}
	_, err = c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "refuse-bare"})
	if d, ok := avatarforcing.RetryAfter(err); ok || status.Code(err) != codes.ResourceExhausted {
		t.Errorf("no trailer: RetryAfter = %v, %v (err %v); want false", d, ok, err)
	}
	for _, e := range []error{nil, errors.New("x"), status.Error(codes.ResourceExhausted, "x")} {
		if _, ok := avatarforcing.RetryAfter(e); ok {
			t.Errorf("RetryAfter(%v) = true", e)
		}
	}
	for _, mode := range []string{"twostarted", "eof"} {
		s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: mode})
		if err != nil {
			t.Fatal(err)
		}
		for range s.Events() {
		}
		if !errors.Is(s.Err(), avatarforcing.ErrProtocol) {
			t.Errorf("%s: Err = %v, want ErrProtocol", mode, s.Err())
		}
		if err := s.Close(); !errors.Is(err, avatarforcing.ErrProtocol) {
			t.Errorf("%s: Close = %v, want the session's ErrProtocol", mode, err)
		}
	}
	checkNoSessionGoroutines(t)
}

type countingRouter struct{ n atomic.Int32 }

func (r *countingRouter) Route(_ context.Context, o avatarforcing.SessionOptions, def grpc.ClientConnInterface) (grpc.ClientConnInterface, error) {
	r.n.Add(1)
	if o.AvatarID == "av_unroutable" {
		return nil, errors.New("no replica holds this avatar")
	}
	return def, nil
}

func TestFakeRouterExtensionPoint(t *testing.T) {
	r := &countingRouter{}
	c, _ := startFake(t, avatarforcing.WithRouter(r))
	ctx := testCtx(t, 5*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_x", UtteranceID: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_unroutable"}); err == nil ||
		!strings.Contains(err.Error(), "no replica holds this avatar") {
		t.Fatalf("routing error = %v", err)
	}
	if r.n.Load() != 2 {
		t.Fatalf("Route called %d times, want 2", r.n.Load())
	}
}

func TestFakeStreamPCMAndWAV(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 10*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), SampleRate: 8000, UtteranceID: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	go func() {
		for range s.Events() {
		}
	}()
	// Real-time pacing: 0.3 s of audio in 50 ms chunks takes at least 0.25 s (the last chunk
	// leaves at 0.25 s).
	start := time.Now()
	n, err := s.StreamPCM(ctx, bytes.NewReader(make([]byte, 2*2400)), true, 50*time.Millisecond)
	if err != nil || n != 2400 {
		t.Fatalf("StreamPCM = %d, %v", n, err)
	}
	if d := time.Since(start); d < 240*time.Millisecond {
		t.Errorf("real-time StreamPCM of 0.3 s took only %v", d)
	}
	if _, err := s.StreamPCM(ctx, bytes.NewReader(make([]byte, 7)), false, 0); !errors.Is(err, avatarforcing.ErrInvalidArgument) {
		t.Errorf("odd-length StreamPCM = %v, want ErrInvalidArgument", err)
	}
	if _, err := s.StreamPCM(ctx, bytes.NewReader(nil), false, 2*time.Second); !errors.Is(err, avatarforcing.ErrInvalidArgument) {
		t.Errorf("2 s chunks = %v, want ErrInvalidArgument", err)
	}
	_, err = s.StreamWAV(ctx, speechWAV, false) // 16 kHz file, 8 kHz session
	if !errors.Is(err, avatarforcing.ErrInvalidArgument) || !strings.Contains(err.Error(), "sampled at 16000 Hz but the session takes 8000 Hz") {
		t.Errorf("StreamWAV at the wrong rate = %v", err)
	}
}

// countKeepAlives reads the echo server's events until they close and counts the KeepAlives it
// saw between the first and the second Interrupt marker, and outside them.
func countKeepAlives(t *testing.T, s *avatarforcing.Session) (listening, sending int) {
	t.Helper()
	markers := 0
	for ev := range s.Events() {
		switch ev.Stats.GetUtteranceId() {
		case "interrupt":
			markers++
		case "keepalive":
			if markers == 1 {
				sending++
			} else {
				listening++
			}
		}
	}
	return listening, sending
}

// The session sends KeepAlive by itself every third of SessionStarted.IdleTimeoutMs when
// nothing else goes out, and not while audio flows.
func TestFakeAutoKeepAlive(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 10*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "idle"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Started().IdleTimeoutMs != 300 {
		t.Fatalf("IdleTimeoutMs = %v", s.Started().IdleTimeoutMs)
	}
	counted := make(chan [2]int, 1)
	go func() {
		l, sn := countKeepAlives(t, s)
		counted <- [2]int{l, sn}
	}()
	time.Sleep(550 * time.Millisecond) // listen only: a KeepAlive every 100 ms
	if err := s.Interrupt(ctx); err != nil {
		t.Fatal(err)
	}
	for range 20 { // audio every 20 ms: no KeepAlive needed
		if err := s.SendAudio(ctx, make([]byte, 640)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := s.Interrupt(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseSend(ctx); err != nil {
		t.Fatal(err)
	}
	got := <-counted
	if got[0] < 3 || got[0] > 7 {
		t.Errorf("%d KeepAlives in 550 ms of listening with a 300 ms idle timeout, want about 5", got[0])
	}
	if got[1] > 1 {
		t.Errorf("%d KeepAlives while audio went out every 20 ms, want none", got[1])
	}
	if s.Err() != nil || s.End().GetReason() != pb.EndReason_END_REASON_CLIENT_CLOSED {
		t.Errorf("Err = %v, End = %v", s.Err(), s.End())
	}
	s.Close()
	checkNoSessionGoroutines(t)
}

func TestFakeDisableAutoKeepAlive(t *testing.T) {
	c, _ := startFake(t)
	ctx := testCtx(t, 10*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "idle",
		DisableAutoKeepAlive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	counted := make(chan int, 1)
	go func() {
		l, _ := countKeepAlives(t, s)
		counted <- l
	}()
	time.Sleep(400 * time.Millisecond)
	if err := s.CloseSend(ctx); err != nil {
		t.Fatal(err)
	}
	if n := <-counted; n != 0 {
		t.Errorf("%d KeepAlives with DisableAutoKeepAlive, want 0", n)
	}
	// Close while the keep-alive timer runs leaves no goroutine behind either.
	s2, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), UtteranceID: "idle"})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	checkNoSessionGoroutines(t)
}
