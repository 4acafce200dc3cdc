package avatarforcing

import (
	"encoding/binary"
	"fmt"
	"os"
)

// WAV is a decoded 16-bit PCM WAV file, mono (a file with several channels is mixed down).
type WAV struct {
	// SampleRate in Hz.
	SampleRate int
	// PCM holds the mono samples, signed 16-bit little-endian (what SendAudio takes).
	PCM []byte
	// Channels is how many channels the file held (PCM is their mix-down when more than 1).
	Channels int
}

// Samples is the number of samples in w.
func (w *WAV) Samples() int { return len(w.PCM) / 2 }

const (
	wavFormatPCM        = 1
	wavFormatExtensible = 0xFFFE
)

// ReadWAV reads a 16-bit PCM WAV file, mono or mixed down to mono; see [DecodeWAV].
func ReadWAV(path string) (*WAV, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	w, err := DecodeWAV(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return w, nil
}

// DecodeWAV decodes a RIFF/WAVE file holding signed 16-bit PCM (format tag 1, or
// WAVE_FORMAT_EXTENSIBLE with the PCM sub-format). A file with several channels (stereo) is
// mixed down to mono: each sample is the mean of the channels, rounded half away from zero.
// Anything else is rejected with an error that wraps ErrInvalidArgument and says what the data
// holds; no resampling is done (the service takes 8 to 48 kHz, 22050 and 44100 included). A
// trailing partial sample frame in the data chunk is ignored.
func DecodeWAV(data []byte) (*WAV, error) {
	if len(data) < 12 || string(data[0:4]) != "RIFF" || string(data[8:12]) != "WAVE" {
		return nil, invalid("not a WAV file (no RIFF/WAVE header); send mono 16-bit PCM WAV")
	}
	var (
		fmtSeen  bool
		rate     int
		channels int
		pcmBytes []byte
		dataSeen bool
	)
	p := data[12:]
	for len(p) >= 8 {
		id := string(p[0:4])
		size := int(binary.LittleEndian.Uint32(p[4:8]))
		body := p[8:]
		if size > len(body) {
			if id != "data" {
				return nil, invalid("truncated WAV file: chunk %q claims %d bytes, %d remain", id, size, len(body))
			}
			size = len(body) // a streamed WAV whose header was never fixed up: use what is there
		}
		switch id {
		case "fmt ":
			if size < 16 {
				return nil, invalid("WAV fmt chunk is %d bytes, expected at least 16", size)
			}
			tag := binary.LittleEndian.Uint16(body[0:2])
			channels = int(binary.LittleEndian.Uint16(body[2:4]))
			rate = int(binary.LittleEndian.Uint32(body[4:8]))
			bits := int(binary.LittleEndian.Uint16(body[14:16]))
			if tag == wavFormatExtensible && size >= 26 {
				tag = binary.LittleEndian.Uint16(body[24:26]) // first two bytes of the sub-format GUID
			}
			if tag != wavFormatPCM {
				return nil, invalid("WAV sample format %#x is not integer PCM (3 is float); convert it to signed 16-bit PCM", tag)
			}
			if channels < 1 {
				return nil, invalid("WAV file has %d channels", channels)
			}
			if bits != 16 {
				return nil, invalid("WAV file has %d-bit samples; convert it to signed 16-bit PCM", bits)
			}
			if rate <= 0 {
				return nil, invalid("WAV file has sample rate %d", rate)
			}
			fmtSeen = true
		case "data":
			if !fmtSeen {
				return nil, invalid("WAV data chunk comes before the fmt chunk")
			}
			frame := 2 * channels
			pcmBytes = body[:size-size%frame]
			dataSeen = true
		}
		if dataSeen {
			break
		}
		adv := 8 + size + size&1 // chunks are padded to an even size
		if adv > len(p) {
			break
		}
		p = p[adv:]
	}
	if !fmtSeen {
		return nil, invalid("WAV file has no fmt chunk")
	}
	if !dataSeen {
		return nil, invalid("WAV file has no data chunk")
	}
	if channels > 1 {
		pcmBytes = mixDown(pcmBytes, channels)
	}
	return &WAV{SampleRate: rate, PCM: pcmBytes, Channels: channels}, nil
}

// mixDown averages interleaved PCM16LE frames of n channels into mono PCM16LE.
func mixDown(pcm []byte, n int) []byte {
	frames := len(pcm) / (2 * n)
	out := make([]byte, 2*frames)
	for i := 0; i < frames; i++ {
		sum := 0
		for c := 0; c < n; c++ {
			off := 2 * (i*n + c)
			sum += int(int16(binary.LittleEndian.Uint16(pcm[off:])))
		}
		// The mean, rounded half away from zero (as the Python SDK's read_wav).
		var m int
		if sum >= 0 {
			m = (2*sum + n) / (2 * n)
		} else {
			m = -((-2*sum + n) / (2 * n))
		}
		binary.LittleEndian.PutUint16(out[2*i:], uint16(int16(m)))
	}
	return out
}

// EncodeWAV returns a mono 16-bit PCM WAV file holding pcm (PCM16LE) at sampleRate Hz; useful
// for saving the AudioOut of a session. pcm must have an even length.
func EncodeWAV(pcm []byte, sampleRate int) ([]byte, error) {
	if len(pcm)%2 != 0 {
		return nil, invalid("PCM16 audio must have an even number of bytes, got %d", len(pcm))
	}
	if sampleRate <= 0 {
		return nil, invalid("sample rate must be positive, got %d", sampleRate)
	}
	out := make([]byte, 44, 44+len(pcm))
	copy(out[0:4], "RIFF")
	binary.LittleEndian.PutUint32(out[4:8], uint32(36+len(pcm)))
	copy(out[8:16], "WAVEfmt ")
	binary.LittleEndian.PutUint32(out[16:20], 16)
	binary.LittleEndian.PutUint16(out[20:22], wavFormatPCM)
	binary.LittleEndian.PutUint16(out[22:24], 1)
	binary.LittleEndian.PutUint32(out[24:28], uint32(sampleRate))
	binary.LittleEndian.PutUint32(out[28:32], uint32(sampleRate*2))
	binary.LittleEndian.PutUint16(out[32:34], 2)
	binary.LittleEndian.PutUint16(out[34:36], 16)
	copy(out[36:40], "data")
	binary.LittleEndian.PutUint32(out[40:44], uint32(len(pcm)))
	return append(out, pcm...), nil
}
