package avatarforcing_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
)

// countingClient returns a Client for an address where nothing listens, and a counter of the
// RPCs it started: argument errors must be caught before any RPC.
func countingClient(t *testing.T) (*avatarforcing.Client, *atomic.Int32) {
	t.Helper()
	var rpcs atomic.Int32
	c, err := avatarforcing.Dial(context.Background(), "127.0.0.1:1", avatarforcing.WithDialOptions(
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
			invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			rpcs.Add(1)
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
			method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			rpcs.Add(1)
			return streamer(ctx, desc, cc, method, opts...)
		})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, &rpcs
}

func TestStartSessionValidatesBeforeAnyRPC(t *testing.T) {
	png := []byte("\x89PNG...")
	cases := []struct {
		name string
		opts avatarforcing.SessionOptions
		want string // a piece of the message that says what to fix
	}{
		{"no reference", avatarforcing.SessionOptions{}, "set Image"},
		{"empty image", avatarforcing.SessionOptions{Image: []byte{}}, "Image is empty"},
		{"both references", avatarforcing.SessionOptions{Image: png, AvatarID: "av_1"}, "exactly one of Image and AvatarID"},
		{"sample rate", avatarforcing.SessionOptions{Image: png, SampleRate: 96000}, "SampleRate 96000 Hz is not supported; use a rate from 8000 to 48000 Hz"},
		{"low sample rate", avatarforcing.SessionOptions{Image: png, SampleRate: 7999}, "SampleRate 7999 Hz is not supported"},
		{"negative sample rate", avatarforcing.SessionOptions{Image: png, SampleRate: -1}, "SampleRate -1"},
		{"jpeg quality", avatarforcing.SessionOptions{Image: png, JPEGQuality: 101}, "JPEGQuality 101 is out of range; use 1..100"},
		{"video encoding", avatarforcing.SessionOptions{Image: png, VideoEncoding: 42}, "VideoEncoding 42 is unknown"},
		{"pacing", avatarforcing.SessionOptions{Image: png, Pacing: 9}, "Pacing 9 is unknown"},
		{"bitrate", avatarforcing.SessionOptions{AvatarID: "av_1", VideoBitrate: -5}, "VideoBitrate -5"},
		{"buffers", avatarforcing.SessionOptions{AvatarID: "av_1", SendBuffer: -1}, "SendBuffer"},
	}
	c, rpcs := countingClient(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := c.StartSession(context.Background(), tc.opts)
			if s != nil || err == nil {
				t.Fatalf("StartSession(%+v) = %v, %v; want an error", tc.opts, s, err)
			}
			if !errors.Is(err, avatarforcing.ErrInvalidArgument) {
				t.Errorf("error %q does not wrap ErrInvalidArgument", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
	if _, err := c.RegisterAvatar(context.Background(), nil, "x"); !errors.Is(err, avatarforcing.ErrInvalidArgument) {
		t.Errorf("RegisterAvatar(nil) = %v, want ErrInvalidArgument", err)
	}
	if n := rpcs.Load(); n != 0 {
		t.Fatalf("%d RPCs were started for invalid arguments, want 0", n)
	}
}

func TestStartSessionAcceptsEverySupportedRate(t *testing.T) {
	// Valid options get as far as the RPC, which fails here: nothing listens on port 1.
	c, _ := countingClient(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// espeak-ng's 22050 Hz and 44100 Hz among them; 8025 is an unusual rate the server takes at 25 fps.
	for _, rate := range append([]int{0, 8025}, avatarforcing.SupportedSampleRates...) {
		_, err := c.StartSession(ctx, avatarforcing.SessionOptions{AvatarID: "av_1", SampleRate: rate,
			VideoEncoding: pb.VideoEncoding_VIDEO_ENCODING_FMP4, Pacing: pb.Pacing_PACING_ASAP, JPEGQuality: 100})
		if errors.Is(err, avatarforcing.ErrInvalidArgument) {
			t.Errorf("rate %d rejected: %v", rate, err)
		}
	}
}
