package avatarforcing

// resumeState is what a session keeps so that it can resume on another replica, with no
// stream, lock or goroutine of its own (Session guards it with mu). Positions count samples of
// the client's audio at the session's rate, from the first sample sent. The server reports,
// per block, the source sample its audio ended at (AudioOut.source_end_sample, counted from the
// start of the current stream); once the block's last frame arrives that audio is covered and
// is not sent again. A resumed stream starts at the first block not fully received
// (resumeBlock) and gets the audio not yet covered, from a bounded buffer, then EndOfAudio if
// it had been sent (beginStream). Frames and AudioOut of blocks delivered before the resume are
// dropped (onFrame, onAudioOut return false).
//
// The Python SDK's ResumeState (clients/python/avatarforcing_client/resume.py) does the same;
// both run the cases of clients/testdata/resume_cases.json.
type resumeState struct {
	bound          int64            // the most audio kept for a resume, in samples
	sent           int64            // samples sent so far
	consumed       int64            // samples covered by fully received blocks
	streamBase     int64            // the position of the current stream's first audio sample
	buf            []pcmChunk       // audio sent and not yet covered, at most bound of it
	eoaSent        bool             // EndOfAudio was the last thing sent after the audio
	endByBlock     map[uint32]int64 // AudioOut.source_end_sample of blocks not yet complete
	lastIndex      int64            // the last frame index delivered (-1: none)
	lastAudioBlock int64            // the last AudioOut block delivered (-1: none)
}

type pcmChunk struct {
	start int64 // position of the first sample
	pcm   []byte
}

func newResumeState(bound int64) resumeState {
	return resumeState{bound: bound, endByBlock: map[uint32]int64{}, lastIndex: -1, lastAudioBlock: -1}
}

// onAudioSent records PCM16LE audio handed to the stream.
func (r *resumeState) onAudioSent(pcm []byte) {
	r.buf = append(r.buf, pcmChunk{start: r.sent, pcm: pcm})
	r.sent += int64(len(pcm) / 2)
	r.eoaSent = false
	r.trim()
}

func (r *resumeState) onEndOfAudioSent() { r.eoaSent = true }

// onInterruptSent voids the audio sent so far: it is never sent again.
func (r *resumeState) onInterruptSent() {
	r.consumed = r.sent
	clear(r.buf)
	r.buf = r.buf[:0]
}

// onFrame records a frame read from the stream; false: a duplicate of a frame delivered
// before a resume.
func (r *resumeState) onFrame(index, framesPerBlock int64) bool {
	if index <= r.lastIndex {
		return false
	}
	r.lastIndex = index
	if fpb := framesPerBlock; fpb > 0 && index%fpb == fpb-1 {
		// The block is complete: the audio it consumed is covered.
		b := uint32(index / fpb)
		if end, ok := r.endByBlock[b]; ok {
			r.consumed = max(r.consumed, r.streamBase+end)
			r.trim()
		}
		for k := range r.endByBlock {
			if k <= b {
				delete(r.endByBlock, k)
			}
		}
	}
	return true
}

// onAudioOut records an AudioOut read from the stream; false: a duplicate.
func (r *resumeState) onAudioOut(block uint32, sourceEndSample int64) bool {
	if int64(block) <= r.lastAudioBlock {
		return false
	}
	r.lastAudioBlock = int64(block)
	r.endByBlock[block] = sourceEndSample
	return true
}

// resumeBlock is the first block not fully received: the resumed stream starts there.
func (r *resumeState) resumeBlock(framesPerBlock int64) uint64 {
	if framesPerBlock <= 0 {
		return 0
	}
	return uint64((r.lastIndex + 1) / framesPerBlock)
}

// beginStream starts a new stream (a resume) and returns what it gets first: the audio not
// covered by frames received (the chunks' pcm may share memory with the buffer), and whether
// EndOfAudio follows it. The new stream's audio starts at the first sample not covered, or at
// the oldest sample kept when the buffer's bound dropped older audio.
func (r *resumeState) beginStream() (audio []pcmChunk, endOfAudio bool) {
	base := r.sent
	if len(r.buf) > 0 {
		base = max(r.consumed, r.buf[0].start)
	}
	for _, ch := range r.buf {
		skip := max(base-ch.start, 0) * 2
		if skip < int64(len(ch.pcm)) {
			audio = append(audio, pcmChunk{start: ch.start + skip/2, pcm: ch.pcm[skip:]})
		}
	}
	r.consumed = max(r.consumed, base)
	r.streamBase = base
	clear(r.endByBlock)
	return audio, r.eoaSent
}

// trim drops the audio covered by frames received, and the audio beyond the buffer's bound.
func (r *resumeState) trim() {
	keepFrom := max(r.consumed, r.sent-r.bound)
	k := 0
	for k < len(r.buf) && r.buf[k].start+int64(len(r.buf[k].pcm)/2) <= keepFrom {
		k++
	}
	if k > 0 {
		clear(r.buf[:k])
		r.buf = r.buf[k:]
	}
}
