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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from . import messages
from .audio_in import AudioInput, Block
from .codecs import EncodedFrame, FrameEncoder
from .failure import SessionFailure
from .spec import SessionSpec

__all__ = ["OutItem", "OutputQueue", "Session", "SessionFailure", "Timeline"]


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

    def peek(self) -> OutItem | None:
        """The item :meth:`get` would return next, without taking it."""
        return self._q[0] if self._q else None

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
    """A session's whole state, and the only code that changes it.

    The servicer reports what the client sent (:meth:`client_message`, :meth:`push_audio`, :meth:`interrupt`,
    :meth:`end_of_audio`, :meth:`half_close`) and what went out (:meth:`frame_sent`); the scheduler reports a
    step's start and result (:meth:`start_step`, :meth:`step_done`, :meth:`queue_block`); the app closes it
    (:meth:`begin_release`, :meth:`begin_close`, :meth:`claim_route_release`). Everyone else only reads.
    """

    id: str
    spec: SessionSpec
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
    clear_requested: bool = False  # an interrupt's engine-side half: the next step clears the slot's audio
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
        return self.spec.realtime

    @property
    def fpb(self) -> int:
        return self.timeline.frames_per_block

    # ---- what the client sent ------------------------------------------------------------------
    def client_message(self, now: float) -> None:
        """Any message counts as a sign of life (the idle timeout)."""
        self.last_client_msg = now

    def push_audio(self, data: bytes, now: float) -> None:
        """A chunk of the client's audio; it also cancels an earlier EndOfAudio (REALTIME)."""
        if self.eoa and not self.realtime:
            raise SessionFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                 "audio after EndOfAudio in PACING_ASAP; open a new session")
        self.audio.push(data, now)
        self.eoa = False

    def interrupt(self) -> None:
        """Drops the buffered audio, silences the blocks already in the engine's window, and asks the next
        engine step to clear the slot's audio (the scheduler collects that with :meth:`take_clear_request`)."""
        self.audio.clear()
        self.clear_requested = True
        for b in self.pending:  # blocks in the window finish silent
            b.pcm_in[:] = 0
            b.real_samples = b.real_offset = 0
        self.last_real_block = -1

    def end_of_audio(self) -> None:
        self.eoa = True
        self.maybe_finish()

    def half_close(self) -> None:
        """The client closed its side of the stream: render what is left, then End (CLIENT_CLOSED)."""
        self.half_closed = True
        self.maybe_finish()

    def set_resumable(self, resumable: bool) -> None:
        """Whether releasing the session keeps its routing record, so that the client can resume it."""
        self.resumable = resumable

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

    def take_clear_request(self) -> bool:
        """True once after :meth:`interrupt` (unless released meanwhile): the slot's audio must be cleared."""
        if not self.clear_requested or self.released:
            return False
        self.clear_requested = False
        return True

    def start_step(self) -> Block:
        """The session goes into an engine step with its next block."""
        b = self.take_block()
        self.in_flight = True
        return b

    def step_done(self, emitted: bool) -> Block | None:
        """The engine step ran; returns the block it emitted (oldest pending first), if any."""
        self.steps += 1
        self.in_flight = False
        return self.pending.popleft() if emitted else None

    def step_failed(self, failure: SessionFailure) -> None:
        self.in_flight = False
        self.fail(failure)

    def finished_audio(self) -> bool:
        """Every block with real audio has been emitted and there is nothing buffered."""
        return self.audio.buffered == 0 and self.steps > self.last_real_block + self.timeline.window_blocks - 1

    def observe_similarity(self, similarity: float, floor: float | None) -> float | None:
        """Records a block's anchor similarity; returns the recent mean when it has just fallen below ``floor``
        (a drift alert, raised once per crossing), else None."""
        self.recent_sim.append(similarity)
        if floor is None or len(self.recent_sim) < (self.recent_sim.maxlen or 0):
            return None
        mean = sum(self.recent_sim) / len(self.recent_sim)
        if mean < floor and not self.drifting:
            self.drifting = True
            return mean
        if mean >= floor and self.drifting:
            self.drifting = False
        return None

    # ---- output --------------------------------------------------------------------------------
    def accepts_output(self) -> bool:
        return not (self.ending or self.released)

    def frame_due(self, index: int) -> float | None:
        if not self.realtime:
            return None
        index -= self.block_offset * self.fpb
        return self.t_start + self.timeline.latency_s + index / self.timeline.fps

    def make_room(self, incoming: int) -> int:
        """Applies the slow-client policy before a block is queued; returns frames dropped."""
        if not self.realtime or self.out.frames + incoming <= self.queue_frames:
            return 0
        if self.spec.inter_coded:
            dropped = self.out.clear_media()
            self.encoder.force_keyframe()
        else:
            dropped = 0
            while self.out.frames + incoming > self.queue_frames and self.out.frames > 0:
                dropped += self.out.drop_oldest_block()
        self.frames_dropped += dropped
        return dropped

    def queue_block(self, emitted_block: int, blk: Block, encoded: list[EncodedFrame]) -> None:
        """Queues an emitted block: its audio, its frames and (once a second) Stats, each due in real time."""
        j = emitted_block + self.block_offset  # resumed sessions continue the client's block numbering
        fpb = self.fpb
        a_off = self.block_offset * self.audio.in_block
        spf = self.audio.in_block // fpb
        fps = self.timeline.fps
        first = j * fpb
        self.out.put(OutItem(messages.audio_out(j, blk, blk.start_sample + a_off), block=j,
                             due=self.frame_due(first)))
        arrival = blk.newest_arrival if blk.real_samples else None
        for i, ef in enumerate(encoded):
            n = first + i
            msg = messages.video_frame(n, fps, blk.start_sample + a_off + i * spf, spf, ef, j)
            self.out.put(OutItem(msg, frames=1, block=j, due=self.frame_due(n), arrival=arrival))
        if (j + 1) * fpb // int(fps) != j * fpb // int(fps):
            self.out.put(OutItem(self.stats(), block=j, due=self.frame_due(first + fpb - 1)))
        self.delivered_block = emitted_block
        self.maybe_finish()

    def stamp_send(self, wall: float) -> None:
        """A frame is about to be written (``wall``: time.time()); the close log says when this replica streamed."""
        self.last_frame_ts = wall
        self.first_frame_ts = self.first_frame_ts or wall

    def frame_sent(self, now: float) -> tuple[float | None, float | None]:
        """A frame went out at ``now``; returns (time to the first frame, or the gap since the previous one)."""
        first = gap = None
        if self.first_frame_at is None:
            self.first_frame_at = now
            first = now - self.t_start
        elif self.last_frame_at is not None:
            gap = now - self.last_frame_at
        self.last_frame_at = now
        self.frames_sent += 1
        return first, gap

    def stats(self) -> pb.StreamResponse:
        sim = float(np.mean(self.recent_sim)) if self.recent_sim else 0.0
        return messages.stats(
            frames_sent=self.frames_sent, frames_dropped=self.frames_dropped,
            audio_samples_received=self.audio.received, silence_samples_inserted=self.audio.silence_inserted,
            queue_depth=self.out.frames, anchor_similarity=sim, utterance_id=self.spec.utterance_id)

    # ---- ending --------------------------------------------------------------------------------
    def end(self, reason: int, message: str = "", *, drop_media: bool = False) -> None:
        """Queues End (once); no more steps run for this session. ``drop_media``: what is still queued is not sent."""
        if self.ending:
            return
        if drop_media:
            self.out.clear_media()
        self.ending = True
        self.out.put(OutItem(messages.end(reason, message), end=True))

    def maybe_finish(self) -> None:
        """Ends the session once everything it must render has been queued."""
        if self.ending or not (self.half_closed or (self.eoa and not self.realtime)):
            return
        if self.audio.buffered == 0 and self.delivered_block >= self.last_real_block:
            self.end(messages.END_OF_AUDIO if self.eoa else messages.CLIENT_CLOSED)

    def fail(self, failure: SessionFailure, *, drop_media: bool = False) -> None:
        if drop_media:
            self.out.clear_media()
        if self.failure is None:
            self.failure = failure
        self.ending = True
        self.out.put(OutItem(messages.failed(), end=True))

    def begin_release(self, start: Callable[[], asyncio.Task[None]]) -> tuple[asyncio.Task[None], bool]:
        """Marks the session released (no more steps or output) and returns the task that frees its slot and
        encoder; ``start`` makes it on the first call only. The flag says whether this call started it."""
        if self.release_task is not None:
            return self.release_task, False
        self.released = True
        self.ending = True
        self.release_task = start()
        return self.release_task, True

    def begin_close(self, start: Callable[[], asyncio.Task[None]]) -> tuple[asyncio.Task[None], bool]:
        """The task that closes the session (slot, encoder, route), made by ``start`` on the first call only."""
        if self.close_task is not None:
            return self.close_task, False
        self.close_task = start()
        return self.close_task, True

    def claim_route_release(self) -> bool:
        """True for the one caller that gives the routing record back; False for every later one."""
        if self.route_released:
            return False
        self.route_released = True
        return True
