package avatarforcing

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"reflect"
	"testing"
)

// resumeCases is clients/testdata/resume_cases.json, which the Python SDK's
// tests/test_sdk_resume_cases.py runs too (see its "about" for what each step means).
type resumeCases struct {
	Cases []struct {
		Name           string       `json:"name"`
		SampleRate     int          `json:"sample_rate"`
		BufferS        float64      `json:"buffer_s"`
		FramesPerBlock int64        `json:"frames_per_block"`
		Steps          []resumeStep `json:"steps"`
	} `json:"cases"`
}

type resumeStep struct {
	SendAudio  *int64  `json:"send_audio"`
	EndOfAudio *bool   `json:"end_of_audio"`
	Interrupt  *bool   `json:"interrupt"`
	AudioOut   []int64 `json:"audio_out"`
	Frames     []int64 `json:"frames"`
	Duplicate  bool    `json:"duplicate"`
	Resume     *struct {
		ResumeBlock uint64    `json:"resume_block"`
		Replay      [][]int64 `json:"replay"`
		EndOfAudio  bool      `json:"end_of_audio"`
	} `json:"resume"`
	Expect *struct {
		Sent       int64     `json:"sent"`
		Consumed   int64     `json:"consumed"`
		StreamBase int64     `json:"stream_base"`
		Buffered   [][]int64 `json:"buffered"`
	} `json:"expect"`
}

// casePCM is the audio the cases send: sample p has the value p % 30000.
func casePCM(start, n int64) []byte {
	out := make([]byte, 2*n)
	for i := range n {
		binary.LittleEndian.PutUint16(out[2*i:], uint16((start+i)%30000))
	}
	return out
}

func chunkSpans(chunks []pcmChunk) [][]int64 {
	out := [][]int64{}
	for _, ch := range chunks {
		out = append(out, []int64{ch.start, int64(len(ch.pcm) / 2)})
	}
	return out
}

func TestResumeStateSharedCases(t *testing.T) {
	raw, err := os.ReadFile("../../testdata/resume_cases.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases resumeCases
	if err := json.Unmarshal(raw, &cases); err != nil {
		t.Fatal(err)
	}
	if len(cases.Cases) == 0 {
		t.Fatal("no cases")
	}
	for _, c := range cases.Cases {
		t.Run(c.Name, func(t *testing.T) {
			r := newResumeState(int64(c.BufferS * float64(c.SampleRate)))
			for k, st := range c.Steps {
				switch {
				case st.SendAudio != nil:
					r.onAudioSent(casePCM(r.sent, *st.SendAudio))
				case st.EndOfAudio != nil:
					r.onEndOfAudioSent()
				case st.Interrupt != nil:
					r.onInterruptSent()
				case st.AudioOut != nil:
					if got := r.onAudioOut(uint32(st.AudioOut[0]), st.AudioOut[1]); got != !st.Duplicate {
						t.Fatalf("step %d: AudioOut %v delivered=%v, want %v", k, st.AudioOut, got, !st.Duplicate)
					}
				case st.Frames != nil:
					for i := st.Frames[0]; i <= st.Frames[1]; i++ {
						if got := r.onFrame(i, c.FramesPerBlock); got != !st.Duplicate {
							t.Fatalf("step %d: frame %d delivered=%v, want %v", k, i, got, !st.Duplicate)
						}
					}
				case st.Resume != nil:
					if got := r.resumeBlock(c.FramesPerBlock); got != st.Resume.ResumeBlock {
						t.Fatalf("step %d: resume block %d, want %d", k, got, st.Resume.ResumeBlock)
					}
					audio, eoa := r.beginStream()
					if got := chunkSpans(audio); !reflect.DeepEqual(got, st.Resume.Replay) {
						t.Fatalf("step %d: replay %v, want %v", k, got, st.Resume.Replay)
					}
					for _, ch := range audio {
						if want := casePCM(ch.start, int64(len(ch.pcm)/2)); !reflect.DeepEqual(ch.pcm, want) {
							t.Fatalf("step %d: the chunk replayed from %d is not the audio sent there", k, ch.start)
						}
					}
					if eoa != st.Resume.EndOfAudio {
						t.Fatalf("step %d: EndOfAudio replayed=%v, want %v", k, eoa, st.Resume.EndOfAudio)
					}
				case st.Expect != nil:
					want := *st.Expect
					got := want
					got.Sent, got.Consumed, got.StreamBase, got.Buffered = r.sent, r.consumed, r.streamBase, chunkSpans(r.buf)
					if !reflect.DeepEqual(got, want) {
						t.Fatalf("step %d: state %+v, want %+v", k, got, want)
					}
				default:
					t.Fatalf("step %d: no action", k)
				}
			}
		})
	}
}
