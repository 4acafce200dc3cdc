"""One session: its audio, its engine slot, its encoder, its output queue, and how it ends.

Slow-client policy (PACING_REALTIME): the output queue holds at most ``queue_frames`` frames.
When a new block would overflow it, whole blocks are dropped, oldest first (frames and their
audio; dropped frames keep their indices, so a client sees the gap); for H.264 and fMP4 every
queued block is dropped and the next frame is encoded as a keyframe, so decoding resumes
cleanly. Each dropped frame counts in avatarforcing_frames_dropped and Stats.frames_dropped.
With PACING_ASAP nothing is dropped: a session whose queue is full is not stepped until the
client has read it down (backpressure).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio_in import AudioInput, Block
from .codecs import FrameEncoder


class SessionFailure(Exception):
    """Ends one session with a gRPC status; others go on."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


@dataclass
class OutItem:
    msg: pb.StreamResponse
    frames: int = 0  # video frames in this item (0 or 1)
    block: int = -1
    due: float | None = None  # monotonic send time (REALTIME)
    arrival: float | None = None  # when the newest audio sample of this frame arrived
    end: bool = False


class OutputQueue:
    """Bounded-by-policy FIFO of responses; counts frames."""

    def __init__(self) -> None:
        self._q: collections.deque[OutItem] = collections.deque()
        self._ev = asyncio.Event()
        self.frames = 0

    def put(self, item: OutItem) -> None:
        self._q.append(item)
        self.frames += item.frames
        self._ev.set()

    def drop_oldest_block(self) -> int:
        """Drops the oldest block's items; returns the frames dropped."""
        if not self._q:
            return 0
        blk = self._q[0].block
        dropped = 0
        while self._q and self._q[0].block == blk and not self._q[0].end:
            it = self._q.popleft()
            dropped += it.frames
        self.frames -= dropped
        return dropped

    def clear_media(self) -> int:
        kept = [it for it in self._q if it.end]
        dropped = self.frames
        self._q = collections.deque(kept)
        self.frames = 0
        return dropped

    async def get(self) -> OutItem:
        while not self._q:
            self._ev.clear()
            await self._ev.wait()
        it = self._q.popleft()
        self.frames -= it.frames
        return it

    def __len__(self) -> int:
        return len(self._q)


@dataclass
class Timeline:
    fps: float
    frames_per_block: int
    window_blocks: int
    budget_s: float

    @property
    def block_s(self) -> float:
        return self.frames_per_block / self.fps

    @property
    def latency_s(self) -> float:
        """Audio of frame n arrives at t0 + n/fps (real time); the frame is shown this much later."""
        return self.window_blocks * self.block_s + self.budget_s


@dataclass
class Session:
    id: str
    config: pb.SessionConfig
    slot: int
    audio: AudioInput
    encoder: FrameEncoder
    timeline: Timeline
    queue_frames: int
    max_blocks_ahead: int
    t_start: float = field(default_factory=time.monotonic)
    avatar_id: str = ""
    log: Any = None
    # routing
    block_offset: int = 0  # resumed sessions: output block (and frame, audio) positions continue from here
    token: str = ""  # for a session placed without CreateSession: its token, sent in SessionStarted
    tenant: str = ""
    resumable: bool = True  # on release: keep the routing record (detached) so that the client can resume
    route_released: bool = False
    epoch: int = 0  # the routing record's epoch this stream attached with (its fencing token)
    close_task: asyncio.Task[None] | None = None  # App.close_session: slot, encoder and route, exactly once
    # progress
    steps: int = 0
    in_flight: bool = False
    pending: collections.deque[Block] = field(default_factory=collections.deque)  # taken, not yet emitted
    last_real_block: int = -1
    delivered_block: int = -1
    eoa: bool = False  # EndOfAudio received and not followed by more audio
    half_closed: bool = False
    clear_requested: bool = False
    ending: bool = False  # End queued or failure set: no more steps
    released: bool = False
    release_task: asyncio.Task[None] | None = None
    failure: SessionFailure | None = None
    # counters
    frames_sent: int = 0
    frames_dropped: int = 0
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    first_frame_ts: float | None = None  # wall clock (time.time()) of the first and last frame sent: the log
    last_frame_ts: float | None = None  # says when this replica streamed the session (chaos checks overlaps)
    last_client_msg: float = field(default_factory=time.monotonic)
    recent_sim: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=25))
    drifting: bool = False  # recent anchor similarity below the checkpoint's calibrated floor
    out: OutputQueue = field(default_factory=OutputQueue)
    deliver_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def realtime(self) -> bool:
        return self.config.pacing != pb.PACING_ASAP

    @property
    def fpb(self) -> int:
        return self.timeline.frames_per_block

    # ---- scheduling ----------------------------------------------------------------------------
    def deadline(self) -> float:
        """When the next step must run at the latest (REALTIME); ASAP sessions sort by age."""
        if not self.realtime:
            return self.t_start + self.steps * 1e-3
        return self.t_start + (self.steps + 1) * self.timeline.block_s + self.timeline.budget_s / 2

    def _flushing(self) -> bool:
        return self.eoa or self.half_closed

    def _drain_needed(self) -> bool:
        """Real audio is still in the window (or buffered) and must be rendered out."""
        return self.audio.buffered > 0 or self.steps <= self.last_real_block + self.timeline.window_blocks - 1

    def ready(self, now: float, horizon: float) -> bool:
        if self.ending or self.in_flight or self.released:
            return False
        if not self.realtime:
            if self.out.frames + self.fpb > self.queue_frames:
                return False  # backpressure
            if self.audio.has_full_block():
                return True
            # Flushing: a partial block (an utterance shorter than a block included), then the window.
            return self._flushing() and (self.audio.buffered > 0 or
                                         (self._drain_needed() and self.last_real_block >= 0))
        d = self.deadline()
        if now >= d - horizon:
            return True
        ahead = self.max_blocks_ahead * self.timeline.block_s
        return (self.audio.has_full_block() or (self._flushing() and self.audio.buffered > 0)) and now >= d - ahead

    def next_wake(self, horizon: float) -> float:
        return self.deadline() - horizon if self.realtime and not self.ending else float("inf")

    def take_block(self) -> Block:
        b = self.audio.take_block()
        if b.real_samples:
            self.last_real_block = self.steps
        self.pending.append(b)
        return b

    def finished_audio(self) -> bool:
        """Every block with real audio has been emitted and there is nothing buffered."""
        return self.audio.buffered == 0 and self.steps > self.last_real_block + self.timeline.window_blocks - 1

    # ---- output --------------------------------------------------------------------------------
    def frame_due(self, index: int) -> float | None:
        if not self.realtime:
            return None
        index -= self.block_offset * self.fpb
        return self.t_start + self.timeline.latency_s + index / self.timeline.fps

    def make_room(self, incoming: int) -> int:
        """Applies the slow-client policy before a block is queued; returns frames dropped."""
        if not self.realtime or self.out.frames + incoming <= self.queue_frames:
            return 0
        inter = self.config.video_encoding in (pb.VIDEO_ENCODING_H264, pb.VIDEO_ENCODING_FMP4)
        if inter:
            dropped = self.out.clear_media()
            self.encoder.force_keyframe()
        else:
            dropped = 0
            while self.out.frames + incoming > self.queue_frames and self.out.frames > 0:
                dropped += self.out.drop_oldest_block()
        self.frames_dropped += dropped
        return dropped

    def stats(self) -> pb.StreamResponse:
        sim = float(np.mean(self.recent_sim)) if self.recent_sim else 0.0
        return pb.StreamResponse(stats=pb.Stats(
            frames_sent=self.frames_sent, frames_dropped=self.frames_dropped,
            audio_samples_received=self.audio.received, silence_samples_inserted=self.audio.silence_inserted,
            queue_depth=self.out.frames, anchor_similarity=sim, utterance_id=self.config.utterance_id))

    def end(self, reason: pb.EndReason, message: str = "") -> None:
        """Queues End (once); no more steps run for this session."""
        if self.ending:
            return
        self.ending = True
        self.out.put(OutItem(pb.StreamResponse(end=pb.End(reason=reason, message=message)), end=True))

    def maybe_finish(self) -> None:
        """Ends the session once everything it must render has been queued."""
        if self.ending or not (self.half_closed or (self.eoa and not self.realtime)):
            return
        if self.audio.buffered == 0 and self.delivered_block >= self.last_real_block:
            self.end(pb.END_REASON_END_OF_AUDIO if self.eoa else pb.END_REASON_CLIENT_CLOSED)

    def fail(self, failure: SessionFailure) -> None:
        if self.failure is None:
            self.failure = failure
        self.ending = True
        self.out.put(OutItem(pb.StreamResponse(), end=True))
