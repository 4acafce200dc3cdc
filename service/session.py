"""One session: its audio, its engine slot, its encoder, its output queue, and how it ends.

Slow-client policy (PACING_REALTIME): the output queue holds at most ``queue_frames`` frames.
When a new block would overflow it, whole blocks are dropped, oldest first (frames and their
audio; dropped frames keep their indices, so a client sees the gap); for H.264 and fMP4 every
queued block is dropped and the next frame is encoded as a keyframe, so decoding resumes
cleanly. Each dropped frame counts in avatarforcing_frames_dropped and Stats.frames_dropped.
With PACING_ASAP nothing is dropped: a session whose queue is full is not stepped until the
client has read it down (backpressure).

Speech onset (REALTIME, ``Timeline.onset_replan``): a session whose window holds only silence that receives
audio far ahead of its timeline (a TTS burst: at least the whole window's audio, L blocks, in hand at once;
or a shorter utterance closed by EndOfAudio) re-plans. The blocks in the engine's window, planned on silence,
are discarded (the engine keeps the style anchor and the clean history). The queued silent blocks none of
whose items went out are given back: they keep going out while the window warms up, and the utterance's first
block takes the earliest of their positions still unsent when it is ready (its frame indices, pts and audio
samples), the rest being dropped then; so the output stays one continuous timeline, with no gap however long
the warm-up takes. The session steps as soon as such audio arrives (not at its paced deadline); the L steps
that fill the window again run unpaced, ordered by the deadline of the block they produce, then the session
is paced as before. A client that streams in real time in small chunks holds
at most about a block of audio, so it never re-plans: its latency stays the announced look-ahead latency.
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
    silent: bool | None = None  # a block's AudioOut (its first item): whether the block carries no client audio
    inserted: int = 0  # ...the silence inserted into it (samples)
    voided: bool = False  # ...rendered before an Interrupt and not sent yet: a burst after it may take its place
    onset_from: float | None = None  # the first frame of a re-planned utterance: when its burst arrived
    stats: bool = False  # a Stats: built when it goes out (Session.message), so its counts are of that moment


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

    def queued_blocks(self) -> list[OutItem]:
        """The AudioOut item of each block none of whose items has been taken yet (the AudioOut is a block's
        first item), oldest first."""
        return [it for it in self._q if it.silent is not None]

    def void_queued(self) -> None:
        """An Interrupt: the blocks queued so far hold speech the client no longer wants (see OutItem.voided)."""
        for it in self._q:
            if it.silent is not None:
                it.voided = True

    def drop_from_block(self, block: int) -> int:
        """Drops every media item of blocks ``block`` and later; returns the frames dropped."""
        kept = [it for it in self._q if it.end or it.block < block]
        dropped = sum(it.frames for it in self._q) - sum(it.frames for it in kept)
        self._q = collections.deque(kept)
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
    onset_replan: bool = False  # re-plan the window when audio comes far ahead of the timeline (module doc)

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
    encoding: collections.deque[Block] = field(default_factory=collections.deque)  # emitted, not yet queued
    last_real_block: int = -1
    delivered_block: int = -1
    eoa: bool = False  # EndOfAudio received and not followed by more audio
    half_closed: bool = False
    clear_requested: bool = False  # an interrupt's engine-side half: the next step clears the slot's audio
    # speech onset (module doc)
    replan_requested: bool = False  # a re-plan's engine-side half: the next step replans the slot's window
    shift: int = 0  # engine steps taken ahead of the output timeline by re-plans (the discarded blocks)
    skipped: int = 0  # engine-emitted blocks whose output positions a re-plan gave back (dropped unsent)
    replan_step: int = -1  # the step that took a re-plan's first block, until that block is queued...
    skipped_before: int = 0  # ...and ``skipped`` before it: blocks emitted earlier keep their positions
    keyframe_step: int = -1  # ...and until it is encoded (inter-coded: its first frame is a keyframe)
    replace_from: int = -1  # a re-plan's first given-back position, until its first block is queued...
    replace_silence: list[int] = field(default_factory=list)  # ...the silence inserted into each: queue_block
    sample_shift: int = 0  # audio-timeline samples added back for given-back blocks that went out after all
    warm_until: int = 0  # steps below this fill a re-planned window: unpaced
    blocks_emitted: int = 0  # blocks the engine emitted for this session (those not queued yet: ``encoding``)
    onset_from: float | None = None  # a re-plan waiting for its first frame: when its burst arrived
    onsets: int = 0
    onset_latency_s: float = 0.0  # the last measured: burst arrival to its first frame sent
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
        self.out.void_queued()
        for b in self.encoding:
            b.voided = True
        for b in self.pending:  # blocks in the window finish silent
            self.audio.silence_inserted += b.real_samples
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
        """When the next step must run at the latest (REALTIME); ASAP sessions sort by age.

        Steps that fill a re-planned window take the deadline of the step that emits its first block: they
        run unpaced, before sessions due later and after those due earlier."""
        if not self.realtime:
            return self.t_start + self.steps * 1e-3
        step = max(self.steps, self.warm_until - 1) - self.shift
        return self.t_start + (step + 1) * self.timeline.block_s + self.timeline.budget_s / 2

    def warming(self) -> bool:
        """A re-planned window is filling (module doc)."""
        return self.steps < self.warm_until

    def _flushing(self) -> bool:
        return self.eoa or self.half_closed

    def _drain_needed(self) -> bool:
        """Real audio is still in the window (or buffered) and must be rendered out."""
        return self.audio.buffered > 0 or self.steps <= self.last_real_block + self.timeline.window_blocks - 1

    def ready(self, now: float, horizon: float, lead_s: float = 0.0) -> bool:
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
        if self.warming() or self.replan_due(now, lead_s):
            return True
        d = self.deadline()
        if now >= d - horizon:
            return True
        ahead = self.max_blocks_ahead * self.timeline.block_s
        return (self.audio.has_full_block() or (self._flushing() and self.audio.buffered > 0)) and now >= d - ahead

    def next_wake(self, horizon: float) -> float:
        return self.deadline() - horizon if self.realtime and not self.ending else float("inf")

    def take_block(self) -> Block:
        b = self.audio.take_block()
        b.step = self.steps
        if b.real_samples:
            self.last_real_block = self.steps
        self.pending.append(b)
        return b

    # ---- speech onset --------------------------------------------------------------------------
    def audio_ahead(self, taken: int = 0) -> bool:
        """The audio in hand (buffered, plus ``taken`` samples just cut into the window) runs ahead of the
        timeline: the whole window's worth (L blocks), which a client streaming in real time in small chunks
        never holds (each block is stepped as soon as it is in), or a whole utterance closed by EndOfAudio."""
        held = self.audio.buffered + taken
        return held >= self.timeline.window_blocks * self.audio.in_block or (self.eoa and held > 0)

    def _window_silent(self) -> bool:
        """The window was planned on silence: past the first warm-up (or a re-plan's), its oldest block silent,
        and any block with client audio after it cut from the same burst as the audio still buffered (it arrived
        less than half a block before that audio: at least twice as fast as real time), which was still arriving
        when a step came due (its audio is cut again on a re-plan)."""
        p = self.pending
        if len(p) < self.timeline.window_blocks - 1 or not p or p[0].real_samples:
            return False
        real = [i for i, b in enumerate(p) if b.real_samples]
        if real and real != list(range(real[0], len(p))):
            return False
        if not real:
            return True
        buffered_from = self.audio.oldest_arrival()
        if buffered_from is None:
            return False
        return all(buffered_from - (p[i].newest_arrival or 0.0) < self.timeline.block_s / 2 for i in real)

    def replan_due(self, now: float, lead_s: float) -> bool:
        """This REALTIME session's window holds only silence and the audio in hand runs ahead of its timeline:
        the next step re-plans (:meth:`maybe_replan`), so the session need not wait for its paced deadline.

        ``lead_s``: how long the warm-up takes (L steps and an encode, from recent step times). The frames emitted
        (queued or being encoded) must cover it, less one block: the idle frames may come up to a block late (a
        short hitch before the avatar speaks), never more. A session whose output is not far enough ahead of the
        wall clock (a loaded server) would show nothing for the whole warm-up, and would gain nothing either, as
        the window's blocks planned on silence come out in as many steps as the warm-up takes."""
        tl = self.timeline
        if not (tl.onset_replan and self.realtime) or self.ending or self.in_flight or self.warming():
            return False
        if not (self._window_silent() and self.audio_ahead(sum(b.real_samples for b in self.pending))):
            return False
        until = self.planned_until()
        return until is not None and until + 1 / tl.fps + tl.block_s >= now + lead_s

    def planned_until(self) -> float | None:
        """When the last frame emitted so far (queued, or being encoded) is due (REALTIME), or None before any."""
        if not self.blocks_emitted:
            return None
        return self.frame_due((self.blocks_emitted - self.skipped + self.block_offset) * self.fpb - 1)

    def maybe_replan(self, now: float, lead_s: float) -> bool:
        """Re-plans (module doc) when :meth:`replan_due`; True when it did (the scheduler then replans the slot,
        see :meth:`take_replan_request`).

        The blocks emitted and not sent yet (queued with none of their items out, or being encoded), silent or
        voided by an Interrupt, are given back to the utterance, but stay queued and keep going out while the
        window warms up: when the utterance's first block is queued (:meth:`queue_block`) it takes the earliest
        of those positions still unsent, and only then are the rest dropped. So the output waits for the warm-up
        at most about a block (:meth:`replan_due`), whatever the estimate of its duration said."""
        if not self.replan_due(now, lead_s):
            return False
        tl = self.timeline
        # The blocks emitted and not sent yet, planned on silence or voided by an Interrupt (speech the client cut
        # off): those queued whose items are all unsent, and those being encoded (queued next), newest first.
        n = self.audio.in_block
        give_back: list[int] = []  # the silence inserted into each, oldest first
        if all(b.real_samples == 0 or b.voided for b in self.encoding):
            give_back = [n - b.real_samples for b in self.encoding]
            for it in reversed(self.out.queued_blocks()):
                if not (it.silent or it.voided):
                    break
                give_back.insert(0, it.inserted)
        next_pos = self.blocks_emitted - self.skipped + self.block_offset
        if self.replan_step < 0:  # (a re-plan whose first block is not queued yet holds the older count)
            self.skipped_before = self.skipped
        if give_back:
            self.replace_from, self.replace_silence = next_pos - len(give_back), give_back
        d, w = len(give_back), len(self.pending)
        self.audio.rewind(list(self.pending), d, sum(give_back))
        self.pending.clear()
        self.shift += w + d
        self.skipped += d
        self.warm_until = self.steps + tl.window_blocks
        self.replan_step = self.keyframe_step = self.steps
        self.replan_requested = True
        self.onsets += 1
        self.onset_from = self.audio.oldest_arrival() or now
        return True

    def take_replan_request(self) -> bool:
        """True once after a re-plan (unless released meanwhile): the slot's window must be replanned."""
        if not self.replan_requested or self.released:
            return False
        self.replan_requested = False
        return True

    def onset_sent(self, item: OutItem, now: float) -> float | None:
        """A frame went out: the onset latency (burst arrival to now) when it is a re-planned utterance's first."""
        if item.onset_from is None:
            return None
        self.onset_latency_s = now - item.onset_from
        return self.onset_latency_s

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
        if not emitted:
            return None
        self.blocks_emitted += 1
        blk = self.pending.popleft()
        self.encoding.append(blk)
        return blk

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

    def before_encode(self, blk: Block) -> None:
        """An emitted block is about to be encoded: a re-plan's first block starts with a keyframe (inter-coded),
        as the blocks before it may be given back unsent."""
        if self.keyframe_step >= 0 and blk.step >= self.keyframe_step:
            self.keyframe_step = -1
            if self.spec.inter_coded:
                self.encoder.force_keyframe()

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

    def _settle_replan(self) -> None:
        """The first block after a re-plan that gave positions back is about to be queued: it takes the earliest
        given-back position still unsent (its block's AudioOut still queued), and the rest are dropped. Those that
        went out while the window warmed up stay on the timeline: the utterance and all later blocks move on by
        as many positions (and their audio by as many blocks)."""
        c0, silence = self.replace_from, self.replace_silence
        n = len(silence)
        self.replace_from, self.replace_silence = -1, []
        unsent = [it.block for it in self.out.queued_blocks() if c0 <= it.block < c0 + n]
        start = unsent[0] if unsent else c0 + n
        self.out.drop_from_block(start)
        late = start - c0
        if late:
            self.skipped -= late
            self.shift -= late
            self.sample_shift += late * self.audio.in_block
            self.audio.silence_inserted += sum(silence[:late])

    def queue_block(self, emitted_block: int, blk: Block, encoded: list[EncodedFrame]) -> None:
        """Queues an emitted block: its audio, its frames and (once a second) Stats, each due in real time."""
        if self.encoding and self.encoding[0] is blk:
            self.encoding.popleft()
        skipped, replan_first = self.skipped, False
        if self.replan_step >= 0:
            if blk.step < self.replan_step:  # emitted before the re-plan: its position was set then
                skipped = self.skipped_before
            else:  # the re-plan's first block
                self.replan_step, replan_first = -1, True
                if self.replace_silence:
                    self._settle_replan()
                skipped = self.skipped
        # Resumed sessions continue the client's block numbering; re-plans gave some positions back.
        j = emitted_block + self.block_offset - skipped
        fpb = self.fpb
        a_off = self.block_offset * self.audio.in_block + self.sample_shift
        spf = self.audio.in_block // fpb
        fps = self.timeline.fps
        first = j * fpb
        self.out.put(OutItem(messages.audio_out(j, blk, blk.start_sample + a_off), block=j,
                             due=self.frame_due(first), silent=blk.real_samples == 0,
                             inserted=self.audio.in_block - blk.real_samples))
        arrival = blk.newest_arrival if blk.real_samples else None
        onset = None
        if replan_first and self.onset_from is not None:
            onset, self.onset_from = self.onset_from, None
        for i, ef in enumerate(encoded):
            n = first + i
            msg = messages.video_frame(n, fps, blk.start_sample + a_off + i * spf, spf, ef, j)
            self.out.put(OutItem(msg, frames=1, block=j, due=self.frame_due(n), arrival=arrival,
                                 onset_from=onset if i == 0 else None))
        if (j + 1) * fpb // int(fps) != j * fpb // int(fps):
            self.out.put(OutItem(messages.stats_slot(), block=j, due=self.frame_due(first + fpb - 1), stats=True))
        self.delivered_block = blk.step  # the step that took it: compared with last_real_block
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

    def message(self, item: OutItem) -> pb.StreamResponse:
        """What goes out for a queued item: its message (a Stats is built now)."""
        return self.stats() if item.stats else item.msg

    def stats(self) -> pb.StreamResponse:
        sim = float(np.mean(self.recent_sim)) if self.recent_sim else 0.0
        return messages.stats(
            frames_sent=self.frames_sent, frames_dropped=self.frames_dropped,
            audio_samples_received=self.audio.received, silence_samples_inserted=self.audio.silence_inserted,
            queue_depth=self.out.frames, anchor_similarity=sim, utterance_id=self.spec.utterance_id,
            onset_latency_ms=self.onset_latency_s * 1000, onsets=self.onsets)

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
