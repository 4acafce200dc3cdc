"""Per-session audio input: validation, buffering, block cutting on the session's timeline,
resampling to the model's rate.

Blocks are cut at the client's sample rate, so the audio returned with each block (AudioOut) is
the client's own samples, bit for bit, plus any silence the server inserted. When a block is
due and its audio is short (the client is late, or stopped), the gap is filled with silence:
at the END of the block when speech was already flowing (it stopped or stalled), at the START
when the block begins from silence (speech starts mid-block), so speech is never split by an
inserted gap inside a block. Resampling to the model's rate runs over the cut stream with one
stateful resampler, so the model hears a continuous signal.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import av
import numpy as np

from avatarforcing_proto.wire import COMMON_SAMPLE_RATES_HZ, MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ

# Any rate from MIN_RATE to MAX_RATE with a whole number of samples per video frame is taken (at 25 fps: every
# multiple of 25 Hz, 22,050 and 44,100 included) and resampled to the model's rate. SUPPORTED_RATES are the usual
# ones, which GetServerInfo lists (those that fit the model's fps).
# All three are wire constants (proto/avatarforcing/v1/avatarforcing.proto).
MIN_RATE, MAX_RATE = MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ
SUPPORTED_RATES = COMMON_SAMPLE_RATES_HZ


def rate_problem(rate: int, fps: float) -> str | None:
    """Why ``rate`` (Hz) cannot be taken at ``fps`` frames per second, or None when it can."""
    if not MIN_RATE <= rate <= MAX_RATE:
        return f"sample rate {rate} Hz is not supported; use a rate from {MIN_RATE} to {MAX_RATE} Hz"
    per_frame = rate / fps
    if abs(per_frame - round(per_frame)) > 1e-9:
        return (f"sample rate {rate} Hz gives {per_frame:g} samples per video frame at {fps:g} fps; use a rate with a "
                f"whole number of samples per frame (a multiple of {fps:g} Hz, e.g. 16000, 22050, 44100 or 48000)")
    return None


def rates_for(fps: float) -> list[int]:
    """The usual rates (SUPPORTED_RATES) that fit ``fps``."""
    return [r for r in SUPPORTED_RATES if rate_problem(r, fps) is None]


class AudioError(ValueError):
    """Audio that cannot be accepted (bad format or size); the message is for a person."""


class AudioOverflowError(AudioError):
    """The client sends audio much faster than it is rendered."""


@dataclass
class Block:
    pcm_in: np.ndarray  # int16 [in_block] at the client's rate, inserted silence included
    pcm_model: np.ndarray  # float32 [model_block] at the model's rate, in [-1, 1]
    real_samples: int  # how many of pcm_in came from the client
    real_offset: int  # where they start in pcm_in
    start_sample: int  # position of pcm_in[0] on the session's (re-timed) audio timeline
    newest_arrival: float | None  # monotonic time the newest real sample of the block arrived
    source_end: int = 0  # client samples consumed (rendered or dropped by an interrupt) through this block
    step: int = -1  # the session's engine step that took it (set by the session)
    voided: bool = False  # emitted before an Interrupt, not yet queued: speech the client cut off (the session)


class AudioInput:
    def __init__(self, sample_rate: int, model_rate: int, frames_per_block: int, fps: float,
                 max_chunk_ms: float, max_buffered_s: float) -> None:
        problem = rate_problem(sample_rate, fps)
        if problem is not None:
            raise AudioError(problem)
        self.rate = sample_rate
        self.model_rate = model_rate
        self.in_block = round(frames_per_block * sample_rate / fps)
        self.model_block = round(frames_per_block * model_rate / fps)
        self.max_chunk_samples = int(max_chunk_ms * sample_rate / 1000)
        self.max_buffered = int(max_buffered_s * sample_rate)
        self._buf = np.zeros(0, dtype=np.int16)
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque()  # (cum end, t)
        self._received = 0  # samples received over the session
        self._consumed = 0  # samples of the client's audio consumed into blocks
        self._timeline = 0  # samples of the re-timed timeline cut so far
        self._speaking = False  # the last block ended with real audio
        self.silence_inserted = 0
        self._resampler = None if sample_rate == model_rate else av.AudioResampler(
            format="s16", layout="mono", rate=model_rate)
        self._model_fifo = np.zeros(0, dtype=np.int16)

    # ---- input -------------------------------------------------------------------------------
    def push(self, data: bytes, now: float) -> int:
        """Appends a PCM16LE chunk; returns its sample count. Raises AudioError on bad input."""
        if len(data) == 0:
            return 0
        if len(data) % 2:
            raise AudioError(f"audio chunk of {len(data)} bytes is not a whole number of 16-bit samples")
        n = len(data) // 2
        if n > self.max_chunk_samples:
            raise AudioError(f"audio chunk of {n} samples ({n / self.rate * 1000:.0f} ms) exceeds the limit of "
                             f"{self.max_chunk_samples} samples per chunk; send smaller chunks (20-100 ms)")
        if self.buffered + n > self.max_buffered:
            raise AudioOverflowError(f"more than {self.max_buffered / self.rate:.0f} s of audio buffered ahead of "
                             f"rendering; send audio no faster than real time in PACING_REALTIME")
        self._buf = np.concatenate([self._buf, np.frombuffer(data, dtype="<i2").astype(np.int16)])
        self._received += n
        self._arrivals.append((self._received, now))
        return n

    @property
    def buffered(self) -> int:
        return int(self._buf.shape[0])

    @property
    def received(self) -> int:
        return self._received

    def has_full_block(self) -> bool:
        return self.buffered >= self.in_block

    def clear(self) -> int:
        """Interrupt: drops buffered audio; returns how many samples were dropped."""
        dropped = self.buffered
        self._consumed += dropped
        self._buf = self._buf[:0]
        self._speaking = False
        while self._arrivals and self._arrivals[0][0] <= self._consumed:
            self._arrivals.popleft()
        return dropped

    def oldest_arrival(self) -> float | None:
        """When the oldest buffered sample arrived (monotonic), or None with nothing buffered."""
        return self._arrivals[0][1] if self.buffered and self._arrivals else None

    def rewind(self, blocks: Sequence[Block], given_back: int = 0, given_back_silence: int | None = None) -> None:
        """A re-plan gives back the timeline of the blocks cut last, never shown: ``blocks`` (oldest first) and
        ``given_back`` queued ones cut just before them (silent, or voided by an Interrupt), holding
        ``given_back_silence`` inserted samples (default: all silent). The next block is cut where the first of
        them began; their inserted silence no longer counts, and the client audio in ``blocks`` is buffered again
        (with its arrival), to be cut anew."""
        if given_back_silence is None:
            given_back_silence = given_back * self.in_block
        self._timeline -= (len(blocks) + given_back) * self.in_block
        self.silence_inserted -= given_back_silence + sum(self.in_block - b.real_samples for b in blocks)
        real = [b for b in blocks if b.real_samples]
        if real:
            back = np.concatenate([b.pcm_in[b.real_offset : b.real_offset + b.real_samples] for b in real])
            for b in reversed(real):  # each block's newest arrival stands for its samples
                if b.newest_arrival is not None and not (self._arrivals and self._arrivals[0][0] <= b.source_end):
                    self._arrivals.appendleft((b.source_end, b.newest_arrival))
            self._consumed -= back.shape[0]
            self._buf = np.concatenate([back, self._buf])
        self._speaking = False

    # ---- blocks ------------------------------------------------------------------------------
    def take_block(self) -> Block:
        """Cuts the next block: a full one if buffered, else what there is padded with silence."""
        n = min(self.buffered, self.in_block)
        real = self._buf[:n].copy()
        self._buf = self._buf[n:]
        pad = np.zeros(self.in_block - n, dtype=np.int16)
        offset = 0
        if n == self.in_block:
            pcm = real
            self._speaking = True
        elif self._speaking or n == 0:
            pcm = np.concatenate([real, pad])  # speech stopped or stalled: silence after it
            self._speaking = False
        else:
            pcm = np.concatenate([pad, real])  # speech starts inside this block: silence before it
            offset = self.in_block - n
            self._speaking = True
        self.silence_inserted += self.in_block - n
        newest = None
        self._consumed += n
        while self._arrivals and self._arrivals[0][0] <= self._consumed:
            newest = self._arrivals.popleft()[1]
        if n and newest is None and self._arrivals:
            newest = self._arrivals[0][1]  # the block ends inside a chunk: that chunk's arrival
        start = self._timeline
        self._timeline += self.in_block
        return Block(pcm, self._to_model(pcm), n, offset, start, newest, self._consumed)

    def _to_model(self, pcm: np.ndarray) -> np.ndarray:
        if self._resampler is None:
            out = pcm
        else:
            frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            frame.sample_rate = self.rate
            parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
            fifo = np.concatenate([self._model_fifo, *parts]) if parts else self._model_fifo
            if fifo.shape[0] < self.model_block:  # the resampler's start-up delay: lead with silence
                fifo = np.concatenate([np.zeros(self.model_block - fifo.shape[0], np.int16), fifo])
            out, self._model_fifo = fifo[: self.model_block], fifo[self.model_block:]
        return out.astype(np.float32) / 32768.0
