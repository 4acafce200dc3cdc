package avatarforcing_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
)

// wavBytes builds a WAV file with the given fmt fields and extra chunks before "data".
func wavBytes(tag uint16, channels, rate, bits int, extra []byte, pcm []byte) []byte {
	var b bytes.Buffer
	b.WriteString("RIFF")
	binary.Write(&b, binary.LittleEndian, uint32(0)) // fixed below
	b.WriteString("WAVEfmt ")
	binary.Write(&b, binary.LittleEndian, uint32(16))
	binary.Write(&b, binary.LittleEndian, tag)
	binary.Write(&b, binary.LittleEndian, uint16(channels))
	binary.Write(&b, binary.LittleEndian, uint32(rate))
	binary.Write(&b, binary.LittleEndian, uint32(rate*channels*bits/8))
	binary.Write(&b, binary.LittleEndian, uint16(channels*bits/8))
	binary.Write(&b, binary.LittleEndian, uint16(bits))
	b.Write(extra)
	b.WriteString("data")
	binary.Write(&b, binary.LittleEndian, uint32(len(pcm)))
	b.Write(pcm)
	out := b.Bytes()
	binary.LittleEndian.PutUint32(out[4:8], uint32(len(out)-8))
	return out
}

func TestDecodeWAV(t *testing.T) {
	pcm := []byte{1, 0, 2, 0, 0xff, 0x7f}
	list := append([]byte("LIST"), 3, 0, 0, 0, 'a', 'b', 'c', 0) // odd-sized chunk, padded
	cases := []struct {
		name string
		data []byte
		rate int
		want string // error text; "" = ok
	}{
		{"mono 16-bit", wavBytes(1, 1, 16000, 16, nil, pcm), 16000, ""},
		{"extra chunk", wavBytes(1, 1, 48000, 16, list, pcm), 48000, ""},
		{"8-bit", wavBytes(1, 1, 16000, 8, nil, pcm), 0, "8-bit samples; convert it to signed 16-bit PCM"},
		{"float", wavBytes(3, 1, 16000, 32, nil, pcm), 0, "not integer PCM"},
		{"not a wav", []byte("ID3\x04 an mp3 file"), 0, "not a WAV file"},
		{"empty", nil, 0, "not a WAV file"},
		{"no data", wavBytes(1, 1, 16000, 16, nil, pcm)[:36], 0, "no data chunk"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w, err := avatarforcing.DecodeWAV(tc.data)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, avatarforcing.ErrInvalidArgument) {
					t.Fatalf("DecodeWAV = %v, %v; want an ErrInvalidArgument saying %q", w, err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if w.SampleRate != tc.rate || !bytes.Equal(w.PCM, pcm) || w.Samples() != 3 {
				t.Fatalf("DecodeWAV = rate %d, pcm % x", w.SampleRate, w.PCM)
			}
		})
	}
}

func TestDecodeWAVStereoIsMixedDown(t *testing.T) {
	// A 44.1 kHz stereo file: each mono sample is the mean of the two channels, rounded half away
	// from zero (the Python SDK's read_wav gives the same samples: tests/test_client_sdk.py).
	var pcm []byte
	for _, lr := range [][2]int16{{100, 200}, {-3, -2}, {1, 2}, {32767, 32767}, {-32768, -32768}, {-32768, 32767}} {
		pcm = binary.LittleEndian.AppendUint16(pcm, uint16(lr[0]))
		pcm = binary.LittleEndian.AppendUint16(pcm, uint16(lr[1]))
	}
	pcm = append(pcm, 7, 0) // half a frame at the end: ignored
	w, err := avatarforcing.DecodeWAV(wavBytes(1, 2, 44100, 16, nil, pcm))
	if err != nil {
		t.Fatal(err)
	}
	var got []int16
	for i := 0; i+1 < len(w.PCM); i += 2 {
		got = append(got, int16(binary.LittleEndian.Uint16(w.PCM[i:])))
	}
	want := []int16{150, -3, 2, 32767, -32768, -1}
	if w.SampleRate != 44100 || w.Channels != 2 || w.Samples() != len(want) || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("DecodeWAV(stereo) = %d Hz, %d channels, samples %v; want 44100 Hz, 2 channels, %v", w.SampleRate, w.Channels, got, want)
	}
}

func TestDecodeWAVTruncatedData(t *testing.T) {
	// A WAV written by a streaming tool may claim more data than it holds (or an odd byte).
	data := wavBytes(1, 1, 16000, 16, nil, []byte{1, 0, 2, 0, 3})
	binary.LittleEndian.PutUint32(data[40:44], 1000)
	w, err := avatarforcing.DecodeWAV(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(w.PCM, []byte{1, 0, 2, 0}) {
		t.Fatalf("PCM = % x", w.PCM)
	}
}

func TestEncodeDecodeWAVRoundTrip(t *testing.T) {
	pcm := []byte{0, 0, 1, 0, 0xfe, 0xff}
	b, err := avatarforcing.EncodeWAV(pcm, 24000)
	if err != nil {
		t.Fatal(err)
	}
	w, err := avatarforcing.DecodeWAV(b)
	if err != nil || w.SampleRate != 24000 || !bytes.Equal(w.PCM, pcm) {
		t.Fatalf("round trip: %v %v", w, err)
	}
	if _, err := avatarforcing.EncodeWAV([]byte{1}, 16000); !errors.Is(err, avatarforcing.ErrInvalidArgument) {
		t.Fatalf("odd PCM: %v", err)
	}
}

func TestReadWAVBundledSpeech(t *testing.T) {
	w, err := avatarforcing.ReadWAV(speechWAV)
	if err != nil {
		t.Fatal(err)
	}
	if w.SampleRate != 16000 || w.Samples() != 155356 {
		t.Fatalf("speech_16k.wav: %d Hz, %d samples", w.SampleRate, w.Samples())
	}
	_, err = avatarforcing.ReadWAV(filepath.Join(t.TempDir(), "missing.wav"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}
