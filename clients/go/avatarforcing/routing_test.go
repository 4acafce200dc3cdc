package avatarforcing_test

import (
	"bytes"
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// startRedis runs a real redis-server (the Debian package) on a free loopback port.
func startRedis(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test skipped with -short")
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not installed (scripts/bootstrap.sh installs the Debian package)")
	}
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "",
		"--appendonly", "no", "--dir", t.TempDir())
	configureServerProcess(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killServerProcess(cmd); _ = cmd.Wait() })
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for deadline := time.Now().Add(20 * time.Second); ; {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not listen on %s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "redis://" + addr + "/0"
}

// Two one-slot replicas share a Redis: sessions started through replica A spread over both
// (the second one is placed on B and streamed there), and a third is refused with a retry hint
// once StartSession's own retries (for the placement timeout, 1 s here) are spent.
func TestE2EPlacementAcrossReplicas(t *testing.T) {
	url := startRedis(t)
	a := serverWith(t, "--redis-url", url, "--node-id", "go-a", "--max-sessions", "1")
	b := serverWith(t, "--redis-url", url, "--node-id", "go-b", "--max-sessions", "1")
	c := dialAddr(t, a, avatarforcing.WithPlacementTimeout(time.Second))
	waitFreeSlots(t, dialAddr(t, b))
	ctx := testCtx(t, 60*time.Second)
	face := readFile(t, facePNG)
	nodes := map[string]bool{}
	for i := 0; i < 2; i++ {
		s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		defer s.Close()
		go func() {
			for range s.Events() {
			}
		}()
		nodes[s.Started().GetNodeId()] = true
		if s.Started().GetSessionId() == "" {
			t.Fatal("no session id")
		}
	}
	if !nodes["go-a"] || !nodes["go-b"] {
		t.Fatalf("sessions ran on %v, want one on each replica", nodes)
	}
	_, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third session with both replicas full: err = %v, want ResourceExhausted", err)
	}
	if wait, ok := avatarforcing.RetryAfter(err); !ok || wait <= 0 {
		t.Fatalf("RetryAfter = %v, %v; want a positive hint", wait, ok)
	}
}

// Two replicas share a Redis; the replica a session streams from is killed (-9) in the middle
// of the utterance: the session resumes on the other one by itself, and the caller gets every
// frame once, in order and without a gap, then END_OF_AUDIO.
func TestE2EResumeAcrossReplicaKill(t *testing.T) {
	url := startRedis(t)
	a := serverWith(t, "--redis-url", url, "--node-id", "go-ra", "--max-sessions", "2")
	b := serverWith(t, "--redis-url", url, "--node-id", "go-rb", "--max-sessions", "2")
	c := dialAddr(t, a, avatarforcing.WithFallbackTargets(b))
	waitFreeSlots(t, dialAddr(t, b))
	ctx := testCtx(t, 90*time.Second)
	wav, err := avatarforcing.ReadWAV(speechWAV)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: readFile(t, facePNG), Pacing: pb.Pacing_PACING_ASAP,
		VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_JPEG})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	owner := s.Started().GetNodeId()
	victim := map[string]string{"go-ra": a, "go-rb": b}[owner]
	if victim == "" {
		t.Fatalf("the session runs on %q", owner)
	}
	sendErr := make(chan error, 1)
	go func() {
		_, err := s.StreamPCM(ctx, bytes.NewReader(wav.PCM), false, 0)
		if err == nil {
			err = s.EndOfAudio(ctx)
		}
		sendErr <- err
	}()
	st := s.Started()
	spb := int(st.AudioSampleRateHz) / int(st.Fps) * int(st.FramesPerBlock)
	want := (wav.Samples() + spb - 1) / spb * int(st.FramesPerBlock)
	var frames []uint64
	for ev := range s.Events() {
		if ev.Frame == nil {
			continue
		}
		frames = append(frames, ev.Frame.Index)
		if len(frames) == 20 {
			killServer(t, victim)
		}
	}
	if err := <-sendErr; err != nil {
		t.Fatalf("sending: %v", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("Err = %v after %d frames", err, len(frames))
	}
	if s.End().GetReason() != pb.EndReason_END_REASON_END_OF_AUDIO {
		t.Errorf("End = %v, want END_OF_AUDIO", s.End())
	}
	if s.Resumes() != 1 || s.Started().GetNodeId() == owner {
		t.Errorf("Resumes = %d, now on %q (was %q); want one resume on the other replica", s.Resumes(), s.Started().GetNodeId(), owner)
	}
	if len(frames) != want {
		t.Errorf("%d frames, want %d", len(frames), want)
	}
	for i, idx := range frames {
		if idx != uint64(i) {
			t.Fatalf("frame %d has index %d (a duplicate or a gap)", i, idx)
		}
	}
	t.Logf("killed %s after 20 frames were read; resumed on %s; %d frames", owner, s.Started().GetNodeId(), len(frames))
}
