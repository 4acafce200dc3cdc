package avatarforcing

import (
	"fmt"
	"time"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
)

// The service takes PCM16LE mono audio at any rate from MinSampleRate to MaxSampleRate that
// gives a whole number of samples per video frame at the model's fps (at 25 fps: any multiple
// of 25 Hz, 22050 and 44100 included) and resamples it to the model's rate; AudioOut comes back
// at the session's rate. The server refuses other rates with INVALID_ARGUMENT.
// The bounds and the usual rates are wire constants (wire.go).

// DefaultSampleRate is used when SessionOptions.SampleRate is 0.
const DefaultSampleRate = 16000

const (
	defaultSendBuffer  = 16
	defaultEventBuffer = 64
)

// SessionOptions configure a session (the SessionConfig the client sends first).
//
// Exactly one of Image and AvatarID must be set. Zero values mean the documented defaults.
type SessionOptions struct {
	// Image is the reference face: PNG or JPEG bytes.
	Image []byte
	// AvatarID is an id returned by Client.RegisterAvatar (on the same replica).
	AvatarID string

	// SampleRate of the PCM16LE mono audio you will send: 8000 to 48000 Hz with a whole
	// number of samples per video frame (at 25 fps: 16000, 22050, 24000, 44100, 48000, ...;
	// 0: 16000). AudioOut comes back at the same rate.
	SampleRate int
	// VideoEncoding of VideoFrame.data (0: VIDEO_ENCODING_H264).
	VideoEncoding pb.VideoEncoding
	// Pacing: PACING_REALTIME (frames on a wall-clock timeline, the avatar idles when audio
	// runs short) or PACING_ASAP (as fast as possible; the stream ends after EndOfAudio).
	// 0 leaves the server's default, which is PACING_REALTIME.
	Pacing pb.Pacing
	// UtteranceID is echoed in Stats and the server's logs (optional).
	UtteranceID string
	// Seed for the session's noise (0: random). Same seed and same audio give the same video.
	Seed uint64
	// JPEGQuality 1..100 for VIDEO_ENCODING_JPEG (0: the server's default, 85).
	JPEGQuality int
	// VideoBitrate is the H.264 / fMP4 target in bits per second (0: encoder default).
	VideoBitrate int

	// SendBuffer is how many messages (audio chunks, control messages) may be queued for the
	// send goroutine before sends block (0: 16).
	SendBuffer int
	// EventBuffer is the capacity of the Events channel (0: 64). When it is full the receive
	// goroutine waits for the reader (see the package documentation).
	EventBuffer int

	// DisableAutoKeepAlive turns off the automatic KeepAlive. By default, when SessionStarted
	// announces an idle timeout (IdleTimeoutMs > 0), the session sends a KeepAlive whenever
	// nothing was sent for a third of it, so that a session that only listens stays open; with
	// this set, a session that sends nothing for the idle timeout ends with
	// END_REASON_IDLE_TIMEOUT unless you call Session.KeepAlive yourself.
	DisableAutoKeepAlive bool

	// ResumeTimeout is how long the session, when its stream breaks (the replica died or
	// stopped answering: UNAVAILABLE, UNKNOWN or INTERNAL, a transport error, the frame-stall
	// watchdog; or the replica drains: END_REASON_SERVER_SHUTDOWN), keeps trying to resume on
	// another replica. 0: the Client's (WithResumeTimeout, default 15 s); negative: never
	// resume this session. Only sessions placed through CreateSession resume.
	ResumeTimeout time.Duration
	// StallTimeout is the frame-stall watchdog of a PACING_REALTIME session (the server sends
	// frames continuously in REALTIME, idle ones included): a stream that delivers nothing for
	// this long while the session waits on it is treated as broken and resumed. 0: the
	// Client's (WithStallTimeout, default 1 s); negative: no watchdog. PACING_ASAP sessions
	// have none. The first frame may take SessionStarted.LatencyMs longer.
	StallTimeout time.Duration
	// ResumeBuffer bounds the audio kept for a resume: the audio sent and not yet covered by
	// frames received, at most this much of it (older audio is not sent again). 0: the
	// Client's (WithResumeBuffer, default 10 s).
	ResumeBuffer time.Duration
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidArgument, fmt.Sprintf(format, args...))
}

// normalized validates o and returns a copy with the defaults filled in. Every error wraps
// ErrInvalidArgument and says what to change.
func (o SessionOptions) normalized() (SessionOptions, error) {
	switch {
	case len(o.Image) > 0 && o.AvatarID != "":
		return o, invalid("SessionOptions: set exactly one of Image and AvatarID, not both")
	case len(o.Image) == 0 && o.AvatarID == "":
		if o.Image != nil {
			return o, invalid("SessionOptions.Image is empty; pass the PNG or JPEG bytes of the face, or set AvatarID instead")
		}
		return o, invalid("SessionOptions: set Image (PNG or JPEG bytes of the face) or AvatarID (from Client.RegisterAvatar)")
	}
	if o.SampleRate == 0 {
		o.SampleRate = DefaultSampleRate
	}
	if o.SampleRate < MinSampleRate || o.SampleRate > MaxSampleRate {
		return o, invalid("SessionOptions.SampleRate %d Hz is not supported; use a rate from %d to %d Hz (e.g. %v; resample the audio) or 0 for %d",
			o.SampleRate, MinSampleRate, MaxSampleRate, SupportedSampleRates, DefaultSampleRate)
	}
	if o.VideoEncoding == pb.VideoEncoding_VIDEO_ENCODING_UNSPECIFIED {
		o.VideoEncoding = pb.VideoEncoding_VIDEO_ENCODING_H264
	}
	if _, known := pb.VideoEncoding_name[int32(o.VideoEncoding)]; !known {
		return o, invalid("SessionOptions.VideoEncoding %d is unknown; use RAW_RGB24, JPEG, H264 or FMP4", o.VideoEncoding)
	}
	if _, known := pb.Pacing_name[int32(o.Pacing)]; !known {
		return o, invalid("SessionOptions.Pacing %d is unknown; use PACING_REALTIME or PACING_ASAP", o.Pacing)
	}
	if o.JPEGQuality < 0 || o.JPEGQuality > 100 {
		return o, invalid("SessionOptions.JPEGQuality %d is out of range; use 1..100, or 0 for the default", o.JPEGQuality)
	}
	if o.VideoBitrate < 0 || int64(o.VideoBitrate) > int64(^uint32(0)) {
		return o, invalid("SessionOptions.VideoBitrate %d is out of range; use bits per second up to 2^32-1, or 0 for the default", o.VideoBitrate)
	}
	if o.SendBuffer < 0 || o.EventBuffer < 0 {
		return o, invalid("SessionOptions.SendBuffer and EventBuffer must be >= 0 (0: default)")
	}
	if o.ResumeBuffer < 0 {
		return o, invalid("SessionOptions.ResumeBuffer must be >= 0 (0: the Client's, default %v)", DefaultResumeBuffer)
	}
	if o.SendBuffer == 0 {
		o.SendBuffer = defaultSendBuffer
	}
	if o.EventBuffer == 0 {
		o.EventBuffer = defaultEventBuffer
	}
	return o, nil
}

// config builds the SessionConfig of normalized options.
func (o SessionOptions) config() *pb.SessionConfig {
	c := &pb.SessionConfig{
		AudioFormat: &pb.AudioFormat{
			Encoding:     pb.AudioEncoding_AUDIO_ENCODING_PCM16LE,
			SampleRateHz: uint32(o.SampleRate),
			Channels:     1,
		},
		VideoEncoding:   o.VideoEncoding,
		Pacing:          o.Pacing,
		UtteranceId:     o.UtteranceID,
		JpegQuality:     uint32(o.JPEGQuality),
		VideoBitrateBps: uint32(o.VideoBitrate),
		Seed:            o.Seed,
	}
	if len(o.Image) > 0 {
		c.Reference = &pb.SessionConfig_ReferenceImage{ReferenceImage: o.Image}
	} else {
		c.Reference = &pb.SessionConfig_AvatarId{AvatarId: o.AvatarID}
	}
	return c
}
