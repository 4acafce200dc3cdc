package avatarforcing_test

// Placement, resume, the frame-stall watchdog, attach deadlines and avatar re-registration,
// against the fake fleet (fleet_test.go). Time bounds are generous: the machine may be loaded.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func dialFleet(t *testing.T, target string, opts ...avatarforcing.Option) *avatarforcing.Client {
	t.Helper()
	c, err := avatarforcing.Dial(testCtx(t, 5*time.Second), target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ramp is n samples of PCM16LE whose value is their position (mod 2^15), so that any
// misplaced sample shows.
func ramp(n int) []byte {
	b := make([]byte, 2*n)
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint16(b[2*i:], uint16(i%32768))
	}
	return b
}

type received struct {
	frames []uint64
	audio  []uint32 // AudioOut block indices
	pcm    []byte   // AudioOut data, concatenated
	ends   []int64  // AudioOut: StreamStartSample + SourceEndSample, the session's audio covered
	end    *pb.End
}

func readAll(s *avatarforcing.Session) received {
	var r received
	for ev := range s.Events() {
		switch {
		case ev.Frame != nil:
			r.frames = append(r.frames, ev.Frame.Index)
		case ev.Audio != nil:
			r.audio = append(r.audio, ev.Audio.BlockIndex)
			r.pcm = append(r.pcm, ev.Audio.Data...)
			r.ends = append(r.ends, ev.StreamStartSample+int64(ev.Audio.SourceEndSample))
		case ev.End != nil:
			r.end = ev.End
		}
	}
	return r
}

// checkContiguous fails unless got is first, first+1, ..., with no duplicate and no gap.
func checkContiguous[T uint64 | uint32](t *testing.T, what string, got []T, first T, n int) {
	t.Helper()
	if len(got) != n {
		t.Errorf("%d %s, want %d: %v", len(got), what, n, got)
	}
	for i, v := range got {
		if v != first+T(i) {
			t.Fatalf("%s[%d] = %d, want %d (duplicates or a gap): %v", what, i, v, first+T(i), got)
		}
	}
}

// The replica fails the stream with UNAVAILABLE in the middle of block 3 (after 14 frames):
// the session resumes on the other replica at block 3, sends again exactly the audio after
// the last complete block (sample 3*2560) and EndOfAudio, and the caller sees every frame and
// every AudioOut once, in order, and the audio they carry is the audio sent.
func TestFleetResumeAfterUnavailable(t *testing.T) {
	f := startFleet(t, 2)
	a, b := f.replicas[0], f.replicas[1]
	a.failAfterFrames = 14
	c := dialFleet(t, a.addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pcm := ramp(32000) // 2 s at 16 kHz: 12.5 blocks of 2560 samples -> 13 blocks, 52 frames
	if err := s.SendAudio(ctx, pcm); err != nil {
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	if err := s.Err(); err != nil {
		t.Fatalf("Err = %v", err)
	}
	if got.end.GetReason() != pb.EndReason_END_REASON_END_OF_AUDIO {
		t.Errorf("End = %v, want END_OF_AUDIO", got.end)
	}
	checkContiguous(t, "frames", got.frames, 0, 52)
	checkContiguous(t, "AudioOut blocks", got.audio, 0, 13)
	want := append(slices.Clone(pcm), make([]byte, 2*(13*2560-32000))...)
	if !bytes.Equal(got.pcm, want) {
		t.Errorf("the AudioOut data (%d bytes) is not the audio sent (%d bytes, padded)", len(got.pcm), len(want))
	}
	if s.Resumes() != 1 || s.Started().GetNodeId() != "B" {
		t.Errorf("Resumes = %d, node %q; want 1 resume, to B", s.Resumes(), s.Started().GetNodeId())
	}
	// Each stream counts SourceEndSample from its own start; with StreamStartSample the positions
	// continue across the resume: block k's audio ends at sample (k+1)*2560 of the session's.
	wantEnds := make([]int64, 13)
	for k := range wantEnds {
		wantEnds[k] = min(int64(k+1)*2560, 32000)
	}
	if !slices.Equal(got.ends, wantEnds) {
		t.Errorf("AudioOut ends in the session's audio %v, want %v", got.ends, wantEnds)
	}
	if s.StreamStartSample() != 3*2560 {
		t.Errorf("StreamStartSample = %d, want %d (B's stream starts at block 3's audio)", s.StreamStartSample(), 3*2560)
	}
	streams := f.streamsOf(b)
	if len(streams) != 1 {
		t.Fatalf("%d streams on B, want 1", len(streams))
	}
	audio, eoa := streams[0].snapshot()
	if streams[0].resumeBlock != 3 {
		t.Errorf("resumed at block %d, want 3 (frames 12 and 13 of block 3 were received, not 14 and 15)", streams[0].resumeBlock)
	}
	if !bytes.Equal(audio, pcm[2*3*2560:]) {
		first := -1
		if len(audio) >= 2 {
			first = int(binary.LittleEndian.Uint16(audio))
		}
		t.Errorf("B received %d bytes of audio starting with sample value %d; want the %d bytes from sample 7680",
			len(audio), first, len(pcm)-2*7680)
	}
	if !eoa {
		t.Error("EndOfAudio was not sent again to the resumed stream")
	}
	if calls := f.calls(); !slices.Equal(calls, []string{"A:new", "A:resume"}) && !slices.Equal(calls, []string{"A:new", "B:resume"}) {
		t.Errorf("CreateSession calls %v", calls)
	}
	s.Close()
	checkNoSessionGoroutines(t)
}

// A REALTIME replica that stops sending (frozen) trips the stall watchdog: the session
// resumes, asking the other known target first, and frames go on without a duplicate.
func TestFleetStallWatchdogResumes(t *testing.T) {
	f := startFleet(t, 2)
	a, b := f.replicas[0], f.replicas[1]
	a.stallAfterFrames = 20
	c := dialFleet(t, a.addr, avatarforcing.WithFallbackTargets(b.addr), avatarforcing.WithStallTimeout(300*time.Millisecond))
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_REALTIME})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var frames []uint64
	for ev := range s.Events() {
		if ev.Frame != nil {
			frames = append(frames, ev.Frame.Index)
			if len(frames) == 60 {
				break
			}
		}
	}
	checkContiguous(t, "frames", frames, 0, 60)
	if s.Resumes() != 1 || s.Started().GetNodeId() != "B" {
		t.Errorf("Resumes = %d, node %q; want 1 resume, to B (err %v)", s.Resumes(), s.Started().GetNodeId(), s.Err())
	}
	// The stalled replica still answers, but the resume asks B first.
	if calls := f.calls(); !slices.Equal(calls, []string{"A:new", "B:resume"}) {
		t.Errorf("CreateSession calls %v, want [A:new B:resume]", calls)
	}
	if got := f.streamsOf(b); len(got) != 1 || got[0].resumeBlock != 5 {
		t.Errorf("streams on B: %v, want one resumed at block 5", got)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	checkNoSessionGoroutines(t)
}

// END_REASON_SERVER_SHUTDOWN (a draining replica) resumes too, and is not delivered.
func TestFleetResumeAfterServerShutdown(t *testing.T) {
	f := startFleet(t, 2)
	f.replicas[0].shutdownAfterFrames = 8
	c := dialFleet(t, f.replicas[0].addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP, SampleRate: 8000})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pcm := ramp(8000) // 1 s at 8 kHz: 1280 samples a block -> 7 blocks
	if err := s.SendAudio(ctx, pcm); err != nil {
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	if s.Err() != nil || got.end.GetReason() != pb.EndReason_END_REASON_END_OF_AUDIO {
		t.Fatalf("Err = %v, End = %v", s.Err(), got.end)
	}
	checkContiguous(t, "frames", got.frames, 0, 28)
	if s.Resumes() != 1 {
		t.Errorf("Resumes = %d, want 1", s.Resumes())
	}
}

// CreateSession answering NOT_FOUND to a resume is final: the session ends with it at once,
// not after the resume timeout.
func TestFleetResumeNotFoundIsFinal(t *testing.T) {
	f := startFleet(t, 2)
	f.replicas[0].failAfterFrames = 8
	f.forgetOnResume = true
	c := dialFleet(t, f.replicas[0].addr, avatarforcing.WithResumeTimeout(30*time.Second))
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	if err := s.SendAudio(ctx, ramp(16000)); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	elapsed := time.Since(start)
	if code := status.Code(s.Err()); code != codes.NotFound {
		t.Fatalf("Err = %v, want NotFound", s.Err())
	}
	if !strings.Contains(s.Err().Error(), "did not resume") {
		t.Errorf("Err = %q, want it to say the session did not resume", s.Err())
	}
	if elapsed > 10*time.Second {
		t.Errorf("the session ended %v after the break; NOT_FOUND must not be retried", elapsed)
	}
	checkContiguous(t, "frames", got.frames, 0, 8)
	if calls := f.calls(); len(calls) != 2 || calls[1] != "A:resume" {
		t.Errorf("CreateSession calls %v, want one resume", calls)
	}
	if s.Resumes() != 0 {
		t.Errorf("Resumes = %d", s.Resumes())
	}
}

// With resuming off, a broken stream ends the session with its status, as before.
func TestFleetResumeDisabled(t *testing.T) {
	f := startFleet(t, 2)
	f.replicas[0].failAfterFrames = 8
	c := dialFleet(t, f.replicas[0].addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP,
		ResumeTimeout: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SendAudio(ctx, ramp(16000)); err != nil {
		t.Fatal(err)
	}
	readAll(s)
	if code := status.Code(s.Err()); code != codes.Unavailable || s.Resumes() != 0 {
		t.Fatalf("Err = %v, Resumes = %d; want Unavailable, no resume", s.Err(), s.Resumes())
	}
}

// A target that accepts TCP connections and never answers cannot hold StartSession beyond the
// placement timeout.
func TestFleetFrozenTargetPlacementTimeout(t *testing.T) {
	addr := frozenListener(t)
	const placement = 2 * time.Second
	c := dialFleet(t, addr, avatarforcing.WithPlacementTimeout(placement))
	start := time.Now()
	_, err := c.StartSession(testCtx(t, 30*time.Second), avatarforcing.SessionOptions{Image: []byte("png")})
	elapsed := time.Since(start)
	if err == nil {
		t.Fatal("StartSession against a frozen target succeeded")
	}
	if code := status.Code(err); code != codes.DeadlineExceeded {
		t.Errorf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed > placement+3*time.Second {
		t.Errorf("StartSession took %v with a placement timeout of %v", elapsed, placement)
	}
	t.Logf("StartSession gave up after %v: %v", elapsed.Round(time.Millisecond), err)
}

// Placement names a frozen replica: the attach times out, is cancelled, and placement is asked
// again, which names a live one.
func TestFleetFrozenReplicaAttachRetries(t *testing.T) {
	f := startFleet(t, 1)
	frozen := frozenListener(t)
	f.placeAddr = func(n int) string {
		if n == 0 {
			return frozen
		}
		return f.replicas[0].addr
	}
	c := dialFleet(t, f.replicas[0].addr, avatarforcing.WithAttachTimeout(500*time.Millisecond))
	start := time.Now()
	s, err := c.StartSession(testCtx(t, 30*time.Second), avatarforcing.SessionOptions{Image: []byte("png"),
		Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatalf("StartSession = %v (after %v)", err, time.Since(start))
	}
	defer s.Close()
	if calls := f.calls(); !slices.Equal(calls, []string{"A:new", "A:new"}) {
		t.Errorf("CreateSession calls %v, want two placements", calls)
	}
	if elapsed := time.Since(start); elapsed > 8*time.Second {
		t.Errorf("StartSession took %v", elapsed)
	}
}

// Every replica full: placement is retried, waiting what retry-after-ms asks, until it succeeds.
func TestFleetPlacementRetriesWhenFull(t *testing.T) {
	f := startFleet(t, 1)
	f.refuseNew = 2
	c := dialFleet(t, f.replicas[0].addr)
	start := time.Now()
	s, err := c.StartSession(testCtx(t, 30*time.Second), avatarforcing.SessionOptions{Image: []byte("png")})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if elapsed := time.Since(start); elapsed < 200*time.Millisecond {
		t.Errorf("two refusals with retry-after-ms 200 were retried within %v", elapsed)
	}
	if n := len(f.calls()); n != 3 {
		t.Errorf("%d CreateSession calls, want 3", n)
	}
	// Still full when the placement timeout ends: RESOURCE_EXHAUSTED with the hint.
	f.mu.Lock()
	f.refuseNew = 1 << 30
	f.mu.Unlock()
	c2 := dialFleet(t, f.replicas[0].addr, avatarforcing.WithPlacementTimeout(time.Second))
	_, err = c2.StartSession(testCtx(t, 30*time.Second), avatarforcing.SessionOptions{Image: []byte("png")})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("err = %v, want ResourceExhausted", err)
	}
	if d, ok := avatarforcing.RetryAfter(err); !ok || d != 200*time.Millisecond {
		t.Errorf("RetryAfter = %v, %v", d, ok)
	}
}

// A replica that does not know the session's avatar (NOT_FOUND naming it): the Client
// registers the image it kept there again and opens the stream once more.
func TestFleetReRegistersAvatar(t *testing.T) {
	f := startFleet(t, 2)
	a, b := f.replicas[0], f.replicas[1]
	f.placeAddr = func(int) string { return b.addr }
	c := dialFleet(t, a.addr)
	ctx := testCtx(t, 20*time.Second)
	face := []byte("a face, as PNG bytes")
	id, err := c.RegisterAvatar(ctx, face, "bob")
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: id, Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatalf("StartSession = %v", err)
	}
	defer s.Close()
	if s.Started().GetNodeId() != "B" || s.Started().GetAvatarId() != id {
		t.Errorf("started on %q with avatar %q", s.Started().GetNodeId(), s.Started().GetAvatarId())
	}
	f.mu.Lock()
	reg := slices.Clone(b.registered)
	f.mu.Unlock()
	if len(reg) != 1 || !bytes.Equal(reg[0], face) {
		t.Errorf("B had %d registrations, want the face once", len(reg))
	}

	// An avatar this Client never registered: NOT_FOUND, no re-registration.
	_, err = c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_elsewhere", Pacing: pb.Pacing_PACING_ASAP})
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "avatar") {
		t.Fatalf("unknown avatar: err = %v, want NotFound naming the avatar", err)
	}
	f.mu.Lock()
	n := len(b.registered)
	f.mu.Unlock()
	if n != 1 {
		t.Errorf("%d registrations on B after an unknown avatar, want still 1", n)
	}
}

// A resume that lands on a replica without the avatar registers it there too.
func TestFleetResumeReRegistersAvatar(t *testing.T) {
	f := startFleet(t, 2)
	a, b := f.replicas[0], f.replicas[1]
	a.failAfterFrames = 8
	c := dialFleet(t, a.addr)
	ctx := testCtx(t, 20*time.Second)
	id, err := c.RegisterAvatar(ctx, []byte("face"), "")
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: id, Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SendAudio(ctx, ramp(16000)); err != nil {
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	if s.Err() != nil {
		t.Fatalf("Err = %v", s.Err())
	}
	checkContiguous(t, "frames", got.frames, 0, 28)
	if s.Resumes() != 1 || len(f.streamsOf(b)) != 1 {
		t.Errorf("Resumes = %d, streams on B %d", s.Resumes(), len(f.streamsOf(b)))
	}
}

// Close during a session that resumes leaves no goroutine behind, and sends after Close fail.
func TestFleetCloseAfterResume(t *testing.T) {
	f := startFleet(t, 2)
	f.replicas[0].failAfterFrames = 12
	c := dialFleet(t, f.replicas[0].addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png")})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for ev := range s.Events() {
		if ev.Frame != nil {
			if n++; n == 30 {
				break
			}
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close = %v", err)
	}
	if !errors.Is(s.Err(), avatarforcing.ErrClosed) || s.Resumes() != 1 {
		t.Errorf("Err = %v, Resumes = %d", s.Err(), s.Resumes())
	}
	if err := s.SendAudio(ctx, []byte{0, 0}); !errors.Is(err, avatarforcing.ErrClosed) {
		t.Errorf("SendAudio after Close = %v", err)
	}
	checkNoSessionGoroutines(t)
}

// A caller that stops reading Events for a while is not a stalled stream: the watchdog only
// counts time spent waiting on the stream.
func TestFleetSlowReaderIsNotAStall(t *testing.T) {
	f := startFleet(t, 2)
	c := dialFleet(t, f.replicas[0].addr, avatarforcing.WithStallTimeout(200*time.Millisecond))
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), EventBuffer: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	time.Sleep(time.Second) // nobody reads
	var frames []uint64
	for ev := range s.Events() {
		if ev.Frame != nil {
			if frames = append(frames, ev.Frame.Index); len(frames) == 40 {
				break
			}
		}
	}
	checkContiguous(t, "frames", frames, 0, 40)
	if s.Resumes() != 0 {
		t.Errorf("Resumes = %d after a slow reader, want 0", s.Resumes())
	}
}

// EndOfAudio and the half-close went out before the break: the resumed stream gets the
// audio again, EndOfAudio and the half-close, and the session ends normally.
func TestFleetResumeAfterCloseSend(t *testing.T) {
	f := startFleet(t, 2)
	f.replicas[0].failAfterFrames = 10
	c := dialFleet(t, f.replicas[0].addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pcm := ramp(16000) // 7 blocks
	if err := s.SendAudio(ctx, pcm); err != nil {
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseSend(ctx); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	if s.Err() != nil || got.end.GetReason() != pb.EndReason_END_REASON_END_OF_AUDIO {
		t.Fatalf("Err = %v, End = %v", s.Err(), got.end)
	}
	checkContiguous(t, "frames", got.frames, 0, 28)
	streams := f.streamsOf(f.replicas[1])
	if len(streams) != 1 {
		t.Fatalf("%d streams on B", len(streams))
	}
	if audio, eoa := streams[0].snapshot(); !bytes.Equal(audio, pcm[2*2*2560:]) || !eoa {
		t.Errorf("B got %d bytes of audio (want %d from sample 5120), EndOfAudio %v", len(audio), len(pcm)-2*5120, eoa)
	}
	s.Close()
	checkNoSessionGoroutines(t)
}

// The resume buffer bounds what is sent again: with 0.5 s of it, only the last 0.5 s of the
// audio sent (whole messages) goes to the resumed stream.
func TestFleetResumeBufferBound(t *testing.T) {
	f := startFleet(t, 2)
	f.renderAfterEOA = true
	f.replicas[0].failAfterFrames = 4
	c := dialFleet(t, f.replicas[0].addr)
	ctx := testCtx(t, 20*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("png"), Pacing: pb.Pacing_PACING_ASAP,
		ResumeBuffer: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pcm := ramp(32000)
	for i := 0; i < len(pcm); i += 2 * 1600 { // 0.1 s messages
		if err := s.SendAudio(ctx, pcm[i:i+2*1600]); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	got := readAll(s)
	if s.Err() != nil || s.Resumes() != 1 {
		t.Fatalf("Err = %v, Resumes = %d", s.Err(), s.Resumes())
	}
	// Block 0 came from A; B resumes at block 1 with the last 8000 samples: blocks 1..4.
	checkContiguous(t, "frames", got.frames, 0, 20)
	streams := f.streamsOf(f.replicas[1])
	if len(streams) != 1 {
		t.Fatalf("%d streams on B", len(streams))
	}
	if audio, _ := streams[0].snapshot(); !bytes.Equal(audio, pcm[2*24000:]) {
		t.Errorf("B got %d bytes of audio, want the last %d (0.5 s)", len(audio), 2*8000)
	}
}
