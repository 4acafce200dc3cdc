// Command avatar-example streams a WAV file and a reference face through an AvatarForcing
// server and writes the lip-synced video as an H.264 Annex-B elementary stream.
//
//	go run ./cmd/avatar-example -addr localhost:50051 \
//	    -wav ../../avatarforcing/assets/speech_16k.wav \
//	    -image ../../avatarforcing/assets/reference_face.png -out out.h264
//	ffplay -f h264 -framerate 25 out.h264
//
// The audio is sent as fast as possible with PACING_ASAP (offline rendering), or in real time
// with PACING_REALTIME when -realtime is given. It prints the number of frames and why the
// session ended.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
)

func main() {
	addr := flag.String("addr", "localhost:50051", "server address (host:port)")
	wavPath := flag.String("wav", "", "mono 16-bit PCM WAV file to speak (8, 16, 24 or 48 kHz)")
	imagePath := flag.String("image", "", "reference face, PNG or JPEG")
	outPath := flag.String("out", "out.h264", "output H.264 Annex-B elementary stream (empty: do not write)")
	realtime := flag.Bool("realtime", false, "send the audio in real time with PACING_REALTIME (default: PACING_ASAP)")
	flag.Parse()
	if *wavPath == "" || *imagePath == "" {
		fmt.Fprintln(os.Stderr, "avatar-example: -wav and -image are required")
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *addr, *wavPath, *imagePath, *outPath, *realtime); err != nil {
		fmt.Fprintln(os.Stderr, "avatar-example:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, addr, wavPath, imagePath, outPath string, realtime bool) error {
	wav, err := avatarforcing.ReadWAV(wavPath)
	if err != nil {
		return err
	}
	image, err := os.ReadFile(imagePath)
	if err != nil {
		return err
	}
	client, err := avatarforcing.Dial(ctx, addr)
	if err != nil {
		return err
	}
	defer client.Close()

	pacing := pb.Pacing_PACING_ASAP
	if realtime {
		pacing = pb.Pacing_PACING_REALTIME
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := client.StartSession(ctx, avatarforcing.SessionOptions{
		Image:         image,
		SampleRate:    wav.SampleRate,
		VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_H264,
		Pacing:        pacing,
	})
	if err != nil {
		return fmt.Errorf("starting the session: %w", err)
	}
	defer s.Close()
	st := s.Started()
	fmt.Printf("session %s: %dx%d @ %g fps, latency %.0f ms\n", st.SessionId, st.Width, st.Height, st.Fps, st.LatencyMs)

	// Send the audio, then EndOfAudio and a half-close: the server renders everything it got
	// and ends the session (in REALTIME too, instead of idling).
	sendErr := make(chan error, 1)
	go func() {
		_, err := s.StreamWAV(ctx, wavPath, realtime)
		if err == nil {
			err = s.EndOfAudio(ctx)
		}
		if err == nil {
			err = s.CloseSend(ctx)
		}
		if err != nil {
			cancel() // ends the session; the loop below stops
		}
		sendErr <- err
	}()

	var out io.Writer = io.Discard
	if outPath != "" {
		f, err := os.Create(outPath)
		if err != nil {
			return err
		}
		defer f.Close()
		out = f
	}
	t0 := time.Now()
	frames, dropped := 0, uint64(0)
	for ev := range s.Events() {
		switch {
		case ev.Frame != nil:
			if _, err := out.Write(ev.Frame.Data); err != nil {
				return err
			}
			frames++
		case ev.Stats != nil:
			dropped = ev.Stats.FramesDropped
		}
	}
	// The session's own error says more than the sender's (which then only knows that the
	// session ended), so check it first.
	if err := s.Err(); err != nil {
		return err
	}
	if err := <-sendErr; err != nil {
		return fmt.Errorf("sending audio: %w", err)
	}
	fmt.Printf("%d frames (%d dropped, %d resumes) in %.1f s; end reason %s\n",
		frames, dropped, s.Resumes(), time.Since(t0).Seconds(), s.End().GetReason())
	if outPath != "" {
		fmt.Printf("wrote %s (play: ffplay -f h264 -framerate %g %s)\n", outPath, st.Fps, outPath)
	}
	return nil
}
