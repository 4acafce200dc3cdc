package avatarforcing_test

// Example's body is the README's example program (../README.md); TestREADMEExample keeps
// them identical. It is compiled, not run (it needs a server on localhost:50051).

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
)

func Example() {
	ctx := context.Background()
	client, err := avatarforcing.Dial(ctx, "localhost:50051")
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	image, err := os.ReadFile("avatarforcing/assets/reference_face.png")
	if err != nil {
		log.Fatal(err)
	}
	s, err := client.StartSession(ctx, avatarforcing.SessionOptions{
		Image:  image,
		Pacing: pb.Pacing_PACING_ASAP, // as fast as possible; PACING_REALTIME paces frames at the model's fps
	})
	if err != nil {
		log.Fatal(err) // a gRPC status error when the server refuses: status.Code(err) says why
	}
	defer s.Close()

	// Send the speech from one goroutine, read the video in this one.
	go func() {
		if _, err := s.StreamWAV(ctx, "avatarforcing/assets/speech_16k.wav", false); err != nil {
			log.Print(err)
			s.Close()
			return
		}
		s.EndOfAudio(ctx) // with PACING_ASAP the session ends once every frame is out
	}()

	out, err := os.Create("out.h264")
	if err != nil {
		log.Fatal(err)
	}
	defer out.Close()
	frames := 0
	for ev := range s.Events() {
		if ev.Frame != nil {
			out.Write(ev.Frame.Data) // H.264 Annex-B access units, one per frame
			frames++
		}
	}
	if err := s.Err(); err != nil {
		log.Fatal(err)
	}
	fmt.Println(frames, "frames, end reason", s.End().GetReason())
}
