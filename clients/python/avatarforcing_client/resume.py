"""What a session keeps so that it can resume on another replica, as a plain object (no asyncio, no gRPC).

Positions count samples of the client's audio at the session's rate, from the first sample sent. The
server reports, per block, the source sample its audio ended at (``AudioOut.source_end_sample``, counted
from the start of the current stream); once the block's last frame arrives that audio is covered and need
not be sent again. A resumed stream starts at the first block not fully received (:meth:`ResumeState.resume_block`)
and gets the audio not yet covered, from a bounded buffer, then ``EndOfAudio`` if it had been sent
(:meth:`ResumeState.begin_stream`). Frames and ``AudioOut`` of blocks delivered before the resume are
dropped (:meth:`ResumeState.on_frame`, :meth:`ResumeState.on_audio_out` return False).

The Go SDK's ``resumeState`` (clients/go/avatarforcing/resume_state.go) does the same; both run the cases
of clients/testdata/resume_cases.json.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

__all__ = ["ResumeState", "Replay"]


@dataclass(frozen=True)
class Replay:
    """What a resumed stream gets before anything else."""

    #: ``(first sample position, PCM16LE bytes)`` of each chunk sent again, in order.
    audio: tuple[tuple[int, bytes], ...]
    #: ``EndOfAudio`` goes out after the audio (it was the last thing sent).
    end_of_audio: bool


class ResumeState:
    """Resume bookkeeping of one session, across all its streams.

    ``buffer_s`` bounds the audio kept for resending: the audio sent but not yet covered by received
    frames, at most this many seconds of it (older audio is dropped and not sent again).
    """

    def __init__(self, sample_rate: int, buffer_s: float) -> None:
        self._bound = int(buffer_s * (sample_rate or 16000))
        self.sent = 0  #: samples sent so far
        self.consumed = 0  #: samples covered by fully received blocks
        self.stream_base = 0  #: position of the current stream's first audio sample
        self.end_of_audio_sent = False  #: EndOfAudio was the last thing sent after the audio
        self.last_index = -1  #: the last frame index delivered
        self.last_audio_block = -1  #: the last AudioOut block delivered
        self._buf: collections.deque[tuple[int, bytes]] = collections.deque()  # (start sample, pcm)
        self._end_by_block: dict[int, int] = {}  # source_end_sample of blocks whose last frame has not come

    # -- what is sent --------------------------------------------------------------------------

    def on_audio_sent(self, pcm: bytes) -> None:
        """PCM16LE audio handed to the stream."""
        self._buf.append((self.sent, pcm))
        self.sent += len(pcm) // 2
        self.end_of_audio_sent = False
        self._trim()

    def on_end_of_audio_sent(self) -> None:
        self.end_of_audio_sent = True

    def on_interrupt_sent(self) -> None:
        """The audio sent so far is void: it is never sent again."""
        self.consumed = self.sent
        self._buf.clear()

    # -- what is received ----------------------------------------------------------------------

    def on_frame(self, index: int, frames_per_block: int) -> bool:
        """A frame read from the stream; False: a duplicate of one delivered before a resume."""
        if index <= self.last_index:
            return False
        self.last_index = index
        if frames_per_block > 0 and index % frames_per_block == frames_per_block - 1:
            b = index // frames_per_block  # the block is complete: the audio it consumed is covered
            end = self._end_by_block.pop(b, None)
            for k in [k for k in self._end_by_block if k < b]:
                del self._end_by_block[k]
            if end is not None:
                self.consumed = max(self.consumed, self.stream_base + end)
                self._trim()
        return True

    def on_audio_out(self, block_index: int, source_end_sample: int) -> bool:
        """An ``AudioOut`` read from the stream; False: a duplicate of one delivered before a resume."""
        if block_index <= self.last_audio_block:
            return False
        self.last_audio_block = block_index
        self._end_by_block[block_index] = source_end_sample
        return True

    # -- resuming ------------------------------------------------------------------------------

    def resume_block(self, frames_per_block: int) -> int:
        """The first block not fully received: the resumed stream starts there."""
        if frames_per_block <= 0:
            return 0
        return (self.last_index + 1) // frames_per_block

    def begin_stream(self) -> Replay:
        """Start a new stream (a resume): returns what it gets first. Its audio starts at the first
        sample not covered, or at the oldest sample kept when the buffer's bound dropped older audio."""
        base = max(self.consumed, self._buf[0][0]) if self._buf else self.sent
        audio = []
        for start, pcm in self._buf:
            skip = max(base - start, 0) * 2
            if skip < len(pcm):
                audio.append((start + skip // 2, pcm[skip:]))
        self.consumed = max(self.consumed, base)
        self.stream_base = base
        self._end_by_block.clear()
        return Replay(tuple(audio), self.end_of_audio_sent)

    @property
    def stream_audio_sent(self) -> int:
        """Samples handed to the current stream (audio sent again by a resume included)."""
        return self.sent - self.stream_base

    @property
    def buffered(self) -> tuple[tuple[int, int], ...]:
        """``(first sample, samples)`` of each chunk kept for a resume."""
        return tuple((start, len(pcm) // 2) for start, pcm in self._buf)

    def _trim(self) -> None:
        keep_from = max(self.consumed, self.sent - self._bound)
        while self._buf and self._buf[0][0] + len(self._buf[0][1]) // 2 <= keep_from:
            self._buf.popleft()
