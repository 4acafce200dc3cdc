package avatarforcing_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func dialTest(t *testing.T) *avatarforcing.Client {
	t.Helper()
	return dialAddr(t, serverAddr(t))
}

func dialAddr(t *testing.T, addr string, opts ...avatarforcing.Option) *avatarforcing.Client {
	t.Helper()
	c, err := avatarforcing.Dial(testCtx(t, 10*time.Second), addr, append([]avatarforcing.Option{avatarforcing.WithBlock()}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitFreeSlots polls GetServerInfo until every slot is free again.
func waitFreeSlots(t *testing.T, c *avatarforcing.Client) {
	t.Helper()
	ctx := testCtx(t, 10*time.Second)
	for {
		info, err := c.ServerInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.FreeSlots == info.CapacitySessions {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("free slots stay at %d of %d", info.FreeSlots, info.CapacitySessions)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func TestE2EServerInfo(t *testing.T) {
	c := dialTest(t)
	info, err := c.ServerInfo(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if info.CapacitySessions != 4 || info.Stream.GetFps() != 25 || info.Stream.GetFramesPerBlock() != 4 {
		t.Fatalf("unexpected server info: %v", info)
	}
}

// A whole utterance in ASAP pacing: one frame per 1/fps of audio, rounded up to whole blocks.
func TestE2EWholeUtteranceASAP(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t, 30*time.Second)
	wav, err := avatarforcing.ReadWAV(speechWAV)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{
		Image:         readFile(t, facePNG),
		VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_H264,
		Pacing:        pb.Pacing_PACING_ASAP,
		UtteranceID:   "go-e2e-asap",
		Seed:          7,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st := s.Started()
	if st.Fps != 25 || st.Width != 128 || st.Height != 128 || st.FramesPerBlock != 4 || st.AudioSampleRateHz != 16000 ||
		st.VideoEncoding != pb.VideoEncoding_VIDEO_ENCODING_H264 || st.SessionId == "" {
		t.Fatalf("unexpected SessionStarted: %v", st)
	}
	sendErr := make(chan error, 1)
	go func() {
		n, err := s.StreamWAV(ctx, speechWAV, false)
		if err == nil && n != int64(wav.Samples()) {
			err = errors.New("StreamWAV sent a different number of samples than the file holds")
		}
		if err == nil {
			err = s.EndOfAudio(ctx)
		}
		sendErr <- err
	}()

	samplesPerFrame := int(st.AudioSampleRateHz) / int(st.Fps) // 640
	fpb := int(st.FramesPerBlock)
	blocks := (wav.Samples() + samplesPerFrame*fpb - 1) / (samplesPerFrame * fpb)
	want := blocks * fpb // ceil(samples/640/4)*4

	var (
		frames     int
		firstKey   bool
		audioBytes int
		stats      int
		h264       bytes.Buffer
	)
	for ev := range s.Events() {
		switch {
		case ev.Frame != nil:
			if ev.Frame.Index != uint64(frames) {
				t.Fatalf("frame %d has index %d", frames, ev.Frame.Index)
			}
			if frames == 0 {
				firstKey = ev.Frame.Keyframe
			}
			h264.Write(ev.Frame.Data)
			frames++
		case ev.Audio != nil:
			audioBytes += len(ev.Audio.Data)
		case ev.Stats != nil:
			stats++
			if ev.Stats.UtteranceId != "go-e2e-asap" {
				t.Errorf("Stats.UtteranceId = %q", ev.Stats.UtteranceId)
			}
		case ev.End != nil:
			if ev.End.Reason != pb.EndReason_END_REASON_END_OF_AUDIO {
				t.Errorf("End.Reason = %v, want END_REASON_END_OF_AUDIO (%q)", ev.End.Reason, ev.End.Message)
			}
		}
	}
	if err := <-sendErr; err != nil {
		t.Fatalf("sending: %v", err)
	}
	if err := s.Err(); err != nil {
		t.Fatalf("Err() = %v, want nil after End", err)
	}
	if s.End() == nil {
		t.Fatal("End() = nil after the stream ended")
	}
	if frames != want {
		t.Errorf("got %d frames for %d samples, want ceil(%d/%d/%d)*%d = %d",
			frames, wav.Samples(), wav.Samples(), samplesPerFrame, fpb, fpb, want)
	}
	if !firstKey {
		t.Error("the first frame is not a keyframe")
	}
	if got := audioBytes / 2; got != frames*samplesPerFrame {
		t.Errorf("AudioOut holds %d samples, want %d (one block of audio per block of frames)", got, frames*samplesPerFrame)
	}
	if !bytes.HasPrefix(h264.Bytes(), []byte{0, 0, 0, 1}) && !bytes.HasPrefix(h264.Bytes(), []byte{0, 0, 1}) {
		t.Errorf("the H.264 stream does not start with an Annex-B start code: % x", h264.Bytes()[:min(8, h264.Len())])
	}
	t.Logf("%d frames, %d Stats, %d bytes of H.264", frames, stats, h264.Len())
	if err := s.Close(); err != nil {
		t.Errorf("Close() after End = %v", err)
	}
}

// espeak-ng's default 22050 Hz mono WAV and a 44.1 kHz stereo WAV (mixed down by ReadWAV) go through
// the real server at their own rates: one frame per 1/25 s of audio, AudioOut back at the file's rate.
func TestE2EWAVAt22050MonoAnd44100Stereo(t *testing.T) {
	c := dialTest(t)
	for _, tc := range []struct{ rate, channels int }{{22050, 1}, {44100, 2}} {
		t.Run(fmt.Sprintf("%d-Hz-%dch", tc.rate, tc.channels), func(t *testing.T) {
			ctx := testCtx(t, 60*time.Second)
			n := tc.rate * 6 / 5 // 1.2 s: 30 frames' worth, 7.5 blocks of 4
			var pcm []byte
			for i := 0; i < n; i++ {
				v := int16(8000 * math.Sin(2*math.Pi*220*float64(i)/float64(tc.rate)))
				for ch := 0; ch < tc.channels; ch++ {
					pcm = binary.LittleEndian.AppendUint16(pcm, uint16(v))
				}
			}
			data, err := avatarforcing.EncodeWAV(pcm, tc.rate)
			if err != nil {
				t.Fatal(err)
			}
			// EncodeWAV writes mono headers: patch channels, byte rate and block align for stereo.
			binary.LittleEndian.PutUint16(data[22:24], uint16(tc.channels))
			binary.LittleEndian.PutUint32(data[28:32], uint32(tc.rate*2*tc.channels))
			binary.LittleEndian.PutUint16(data[32:34], uint16(2*tc.channels))
			path := filepath.Join(t.TempDir(), "in.wav")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			w, err := avatarforcing.ReadWAV(path)
			if err != nil || w.SampleRate != tc.rate || w.Samples() != n {
				t.Fatalf("ReadWAV = %v, %v; want %d mono samples at %d Hz", w, err, n, tc.rate)
			}
			s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: readFile(t, facePNG), SampleRate: w.SampleRate,
				VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_JPEG, Pacing: pb.Pacing_PACING_ASAP})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if got := s.Started().AudioSampleRateHz; got != uint32(tc.rate) {
				t.Fatalf("SessionStarted.AudioSampleRateHz = %d, want %d", got, tc.rate)
			}
			go func() {
				if _, err := s.StreamWAV(ctx, path, false); err == nil {
					_ = s.EndOfAudio(ctx)
				}
			}()
			frames, audio := 0, 0
			for ev := range s.Events() {
				if ev.Frame != nil {
					frames++
				} else if ev.Audio != nil {
					audio += len(ev.Audio.Data) / 2
				}
			}
			if err := s.Err(); err != nil {
				t.Fatal(err)
			}
			if frames != 32 || audio != frames*tc.rate/25 {
				t.Fatalf("%d frames and %d AudioOut samples; want 32 frames (8 blocks) and %d samples", frames, audio, 32*tc.rate/25)
			}
		})
	}
}

// Interrupt mid-utterance in REALTIME: frames keep flowing, the audio after it turns silent.
func TestE2EInterruptRealtime(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t, 30*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{
		Image:  readFile(t, facePNG),
		Pacing: pb.Pacing_PACING_REALTIME,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	sendCtx, stopSending := context.WithCancel(ctx)
	defer stopSending()
	sendDone := make(chan error, 1)
	go func() {
		_, err := s.StreamWAV(sendCtx, speechWAV, true)
		sendDone <- err
	}()

	var (
		interruptedAt = -1 // frames received when Interrupt was sent
		frames        int
		spokenBefore  bool // a non-silent AudioOut before the interrupt
		silentAfter   bool
	)
	for ev := range s.Events() {
		switch {
		case ev.Frame != nil:
			frames++
		case ev.Audio != nil:
			if interruptedAt < 0 {
				if !ev.Audio.Silent {
					spokenBefore = true
				}
			} else if ev.Audio.Silent && frames > interruptedAt {
				silentAfter = true
			}
		case ev.End != nil:
			t.Fatalf("unexpected End %v", ev.End)
		}
		if interruptedAt < 0 && spokenBefore && frames >= 20 {
			stopSending()
			if err := <-sendDone; !errors.Is(err, context.Canceled) {
				t.Fatalf("StreamWAV = %v, want context.Canceled", err)
			}
			if err := s.Interrupt(ctx); err != nil {
				t.Fatal(err)
			}
			interruptedAt = frames
		}
		// Frames keep coming after the interrupt (the avatar idles); stop once the audio that
		// goes with them is silent and a second's worth of frames arrived.
		if interruptedAt >= 0 && silentAfter && frames >= interruptedAt+25 {
			break
		}
	}
	if interruptedAt < 0 || !silentAfter {
		t.Fatalf("stream ended early: interruptedAt=%d silentAfter=%v frames=%d err=%v", interruptedAt, silentAfter, frames, s.Err())
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	if err := s.Err(); !errors.Is(err, avatarforcing.ErrClosed) {
		t.Fatalf("Err() after Close = %v, want ErrClosed", err)
	}
	if err := s.Interrupt(ctx); !errors.Is(err, avatarforcing.ErrClosed) {
		t.Fatalf("Interrupt after Close = %v, want ErrClosed", err)
	}
	waitFreeSlots(t, c)
}

// EndOfAudio in REALTIME: the utterance is rendered, then idle frames with silent audio follow.
func TestE2EEndOfAudioRealtime(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t, 30*time.Second)
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{
		Image:  readFile(t, facePNG),
		Pacing: pb.Pacing_PACING_REALTIME,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	wav, err := avatarforcing.ReadWAV(speechWAV)
	if err != nil {
		t.Fatal(err)
	}
	speech := wav.PCM[:2*16000/2] // half a second, sent at once (the server buffers it)
	if err := s.SendAudio(ctx, speech); err != nil {
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	speechEnd := uint64(len(speech) / 2)
	var idleFrames, silentAfter int
	for ev := range s.Events() {
		switch {
		case ev.Frame != nil:
			if ev.Frame.AudioStartSample >= speechEnd {
				idleFrames++
			}
		case ev.Audio != nil:
			if ev.Audio.StartSample >= speechEnd && ev.Audio.Silent {
				silentAfter++
			}
		case ev.End != nil:
			t.Fatalf("REALTIME session ended after EndOfAudio: %v", ev.End)
		}
		if idleFrames >= 12 && silentAfter >= 2 {
			break
		}
	}
	if idleFrames < 12 || silentAfter < 2 {
		t.Fatalf("stream ended early: idle frames %d, silent AudioOut %d, err %v", idleFrames, silentAfter, s.Err())
	}
	// More audio may still be sent after EndOfAudio in REALTIME.
	if err := s.SendAudio(ctx, speech[:640*2]); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestE2EServerRejects(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t, 20*time.Second)

	_, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: []byte("\x89PNG\r\n\x1a\nthis is not a PNG")})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("garbage PNG: err = %v, want InvalidArgument", err)
	}
	_, err = c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_does_not_exist"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("unknown avatar id: err = %v, want NotFound", err)
	}
	_, err = c.RegisterAvatar(ctx, []byte("GIF89a nope"), "bad")
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("RegisterAvatar with a non-image: err = %v, want InvalidArgument", err)
	}

	// Audio after EndOfAudio in ASAP is the server's FAILED_PRECONDITION; it ends the session.
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: readFile(t, facePNG), Pacing: pb.Pacing_PACING_ASAP})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SendAudio(ctx, make([]byte, 2*16000)); err != nil { // 1 s: still rendering below
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.SendAudio(ctx, make([]byte, 640)); err != nil {
		t.Fatal(err)
	}
	for range s.Events() {
	}
	if code := status.Code(s.Err()); code != codes.FailedPrecondition {
		t.Errorf("audio after EndOfAudio in ASAP: Err() = %v (End %v), want FailedPrecondition", s.Err(), s.End())
	}
	if err := s.KeepAlive(ctx); !errors.Is(err, avatarforcing.ErrSessionEnded) || status.Code(err) != codes.FailedPrecondition {
		t.Errorf("KeepAlive after the session failed = %v, want ErrSessionEnded wrapping FailedPrecondition", err)
	}
	waitFreeSlots(t, c)
}

func TestE2ERegisterAvatar(t *testing.T) {
	c := dialTest(t)
	ctx := testCtx(t, 20*time.Second)
	id, err := c.RegisterAvatar(ctx, readFile(t, facePNG), "go-e2e")
	if err != nil {
		t.Fatal(err)
	}
	if id == "" {
		t.Fatal("RegisterAvatar returned an empty id")
	}
	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: id, Pacing: pb.Pacing_PACING_ASAP,
		VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_JPEG, JPEGQuality: 70})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Started().AvatarId != id {
		t.Errorf("SessionStarted.AvatarId = %q, want %q", s.Started().AvatarId, id)
	}
	if err := s.SendAudio(ctx, make([]byte, 2*8000)); err != nil { // 0.5 s: 12.5 frames -> 4 blocks
		t.Fatal(err)
	}
	if err := s.EndOfAudio(ctx); err != nil {
		t.Fatal(err)
	}
	frames := 0
	for ev := range s.Events() {
		if ev.Frame != nil {
			if !bytes.HasPrefix(ev.Frame.Data, []byte{0xff, 0xd8}) {
				t.Fatalf("frame %d is not a JPEG", ev.Frame.Index)
			}
			frames++
		}
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	if frames != 16 {
		t.Errorf("got %d frames for 0.5 s of audio, want 16", frames)
	}
}

// Cancelling the context given to StartSession ends the session and frees its slot.
func TestE2EContextCancelFreesSlot(t *testing.T) {
	c := dialTest(t)
	waitFreeSlots(t, c)
	ctx := testCtx(t, 20*time.Second)
	info, err := c.ServerInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.StartSession(sctx, avatarforcing.SessionOptions{Image: readFile(t, facePNG)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	during, err := c.ServerInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if during.FreeSlots != info.CapacitySessions-1 {
		t.Errorf("free slots during the session = %d, want %d", during.FreeSlots, info.CapacitySessions-1)
	}
	// Read a few frames, then cancel while nobody reads Events any more.
	got := 0
	for ev := range s.Events() {
		if ev.Frame != nil {
			if got++; got == 4 {
				break
			}
		}
	}
	cancel()
	select {
	case <-s.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the session did not end within 5 s of its context being cancelled")
	}
	for range s.Events() { // closed; drains what was buffered
	}
	if code := status.Code(s.Err()); code != codes.Canceled {
		t.Errorf("Err() = %v, want codes.Canceled", s.Err())
	}
	if err := s.SendAudio(ctx, make([]byte, 2)); !errors.Is(err, avatarforcing.ErrSessionEnded) {
		t.Errorf("SendAudio after the session ended = %v, want ErrSessionEnded", err)
	}
	waitFreeSlots(t, c)
}

// smallServerFlags start a second server with one session slot and a 0.6 s idle timeout, for
// the tests of the automatic KeepAlive and of the retry hint.
var smallServerFlags = []string{"--idle-timeout", "0.6", "--max-sessions", "1"}

// A listen-only REALTIME session outlives the server's idle timeout thanks to the automatic
// KeepAlive; without it the server ends the session with END_REASON_IDLE_TIMEOUT.
func TestE2EAutoKeepAlive(t *testing.T) {
	c := dialAddr(t, serverWith(t, smallServerFlags...))
	waitFreeSlots(t, c)
	ctx := testCtx(t, 30*time.Second)
	face := readFile(t, facePNG)

	s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face, Pacing: pb.Pacing_PACING_REALTIME})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.Started().IdleTimeoutMs; got != 600 {
		t.Fatalf("SessionStarted.IdleTimeoutMs = %v, want 600", got)
	}
	start := time.Now()
	frames := 0
	for ev := range s.Events() {
		if ev.End != nil {
			t.Fatalf("listen-only session ended after %v: %v", time.Since(start), ev.End)
		}
		if ev.Frame != nil {
			frames++
		}
		if time.Since(start) > 2200*time.Millisecond {
			break
		}
	}
	if d := time.Since(start); d < 2200*time.Millisecond {
		t.Fatalf("the session ended after %v (Err %v, End %v)", d, s.Err(), s.End())
	}
	if frames < 10 { // 55 at full speed; a busy CPU runs the server slower
		t.Errorf("only %d frames in 2.2 s", frames)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	waitFreeSlots(t, c)

	s, err = c.StartSession(ctx, avatarforcing.SessionOptions{Image: face, Pacing: pb.Pacing_PACING_REALTIME,
		DisableAutoKeepAlive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start = time.Now()
	for range s.Events() {
	}
	if s.Err() != nil || s.End().GetReason() != pb.EndReason_END_REASON_IDLE_TIMEOUT {
		t.Fatalf("without KeepAlive: Err = %v, End = %v; want END_REASON_IDLE_TIMEOUT", s.Err(), s.End())
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("the idle session ended only after %v", d)
	}
	t.Logf("%d frames in 2.2 s with KeepAlive; without, End %q after %v", frames, s.End().GetMessage(), time.Since(start))
	waitFreeSlots(t, c)
}

// A full server refuses with RESOURCE_EXHAUSTED and a retry hint (once StartSession's own
// retries for the placement timeout, 1 s here, are spent); retrying after it succeeds once
// the slot is free.
func TestE2ERetryAfterWhenFull(t *testing.T) {
	c := dialAddr(t, serverWith(t, smallServerFlags...), avatarforcing.WithPlacementTimeout(time.Second))
	waitFreeSlots(t, c)
	ctx := testCtx(t, 30*time.Second)
	face := readFile(t, facePNG)

	held, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	go func() {
		for range held.Events() {
		}
	}()
	_, err = c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("second session on a one-slot server: err = %v, want ResourceExhausted", err)
	}
	if st, ok := status.FromError(err); !ok || !strings.Contains(st.Message(), "slots") {
		t.Errorf("status.FromError = %v, %v", st, ok)
	}
	wait, ok := avatarforcing.RetryAfter(err)
	if !ok || wait <= 0 {
		t.Fatalf("RetryAfter = %v, %v; want a positive hint", wait, ok)
	}
	t.Logf("refused: %v; retry after %v", err, wait)

	if err := held.Close(); err != nil {
		t.Fatal(err)
	}
	// Retry as a client would: wait the hint, try again.
	for attempt := 1; ; attempt++ {
		time.Sleep(wait)
		s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
		if err == nil {
			s.Close()
			break
		}
		if wait, ok = avatarforcing.RetryAfter(err); !ok || attempt == 20 {
			t.Fatalf("attempt %d after the slot was freed: %v", attempt, err)
		}
	}
	waitFreeSlots(t, c)
}
