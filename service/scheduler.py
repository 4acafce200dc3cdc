"""The scheduler: earliest deadline first, one batched engine step at a time, off the event loop.

Each engine step is pick -> run -> apply: :meth:`Scheduler._pick` chooses the batch (and collects the slots that
interrupts asked to clear), :meth:`Scheduler._run_step` runs it in the engine thread, and
:meth:`Scheduler._apply` hands each result to its session and dispatches the encodes. Sessions change their own
state (their methods); the messages they queue are built in ``messages``, so this module knows no protobuf.

Each wake-up it collects the sessions whose next block is due (REALTIME: the deadline is near,
or a full block of audio is waiting and the session is not too far ahead; ASAP: a block of audio
is waiting or the tail must be flushed), sorts them by deadline, and runs up to ``max_batch`` of
them as ONE engine step in the engine thread. Encoding runs in a separate thread pool, so the
next step can start while the previous block is being encoded; the engine's results are deferred
(``StreamEngine.step(..., deferred=True)``), so with ``overlap_decode`` a block's decoding also runs
beside the next step's denoising, and the encode thread waits for its frames. Every engine call (step, slot
allocation and release, interrupts, re-plans) runs in the single engine thread, so slot state never races.

Speech onset: a session with audio far ahead of its silent timeline is ready at once and re-plans
(``Session.maybe_replan``) before its block is cut; the engine discards its window just before the step, and
the L steps that fill it again are due at once, ordered by the deadline of the block they produce, so they
never push a session whose real-time deadline is earlier. A re-plan costs L - 1 extra steps of that session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import structlog

from avatarforcing import AnchorState, StreamEngine
from avatarforcing.engine import SlotResult

from .audio_in import Block
from .failure import SessionFailure
from .session import Session
from .telemetry import Metrics

T = TypeVar("T")
log = structlog.get_logger("avatarforcing.scheduler")


class Scheduler:
    def __init__(self, engine: StreamEngine, metrics: Metrics, *, max_batch: int, encode_threads: int = 2,
                 drift_floor: float | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_batch = max_batch
        self.drift_floor = drift_floor
        self.sessions: dict[str, Session] = {}
        self._engine_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._codec_pool = concurrent.futures.ThreadPoolExecutor(encode_threads, thread_name_prefix="encode")
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self.last_step_at = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Recent step and encode times (moving averages): how long a re-plan's warm-up takes.
        self._step_s: float | None = None
        self._encode_s: float | None = None
        self._default_lead_s = 0.0

    # ---- engine thread ---------------------------------------------------------------------------
    async def in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._engine_pool, fn, *args)

    async def allocate(self, anchor: AnchorState, seed: int) -> int:
        """A slot for a new session. If the caller is cancelled meanwhile, the slot is freed again."""
        fut = asyncio.ensure_future(self.in_engine(self.engine.allocate, anchor, seed))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            try:
                slot = await fut
            except Exception:
                raise asyncio.CancelledError from None
            await self.in_engine(self.engine.free, slot)
            raise

    async def release(self, s: Session) -> None:
        """Frees the session's slot and encoder exactly once, whenever and however it ended.

        The work runs in its own task: a handler cancelled while releasing (the client went away)
        cannot interrupt it half way and leak the slot.
        """
        def start() -> asyncio.Task[None]:
            self.sessions.pop(s.id, None)
            return asyncio.create_task(self._release(s), name=f"release-{s.id}")

        task, new = s.begin_release(start)
        if new:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _release(self, s: Session) -> None:
        while s.in_flight:  # its slot is in the running step: free it after
            await asyncio.sleep(0.005)
        await self.in_engine(self.engine.free, s.slot)
        async with s.deliver_lock:  # never close the encoder under a running encode
            s.encoder.close()
        self.metrics.sessions_active.set(len(self.sessions))
        self.kick()

    # ---- loop ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    def add(self, s: Session) -> None:
        self.sessions[s.id] = s
        self.metrics.sessions_active.set(len(self.sessions))
        self.kick()

    def set_default_lead(self, seconds: float) -> None:
        """The warm-up estimate until steps have been measured (the server: half the processing budget)."""
        self._default_lead_s = seconds

    def onset_lead_s(self) -> float:
        """How long a re-plan's warm-up takes: L steps and an encode, from recent times."""
        if self._step_s is None:
            return self._default_lead_s
        return self.engine.L * self._step_s + (self._encode_s or 0.0)

    def kick(self) -> None:
        self._kick.set()

    async def stop(self) -> None:
        self._stopped = True
        self.kick()
        if self._task is not None:
            await self._task
        if self._tasks:  # releases and deliveries still running
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._engine_pool.shutdown(wait=True)
        self._codec_pool.shutdown(wait=True)

    async def _run(self) -> None:
        horizon = 0.25 * self.engine.frames_per_block / self.engine.cfg.fps
        while not self._stopped:
            now = time.monotonic()
            batch = self._pick(now, horizon)
            if not batch:
                wake = min((s.next_wake(horizon) for s in self.sessions.values()), default=float("inf"))
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), timeout=min(max(wake - now, 0.0), 0.1))
                except TimeoutError:
                    pass
                continue
            try:
                await self._step(batch)
            except Exception as e:  # never let one bad batch stop every session's stream
                log.exception("scheduler step failed")
                for s in batch:
                    s.step_failed(SessionFailure(grpc.StatusCode.INTERNAL, f"internal error while stepping: {e}"))

    def _pick(self, now: float, horizon: float) -> list[Session]:
        """The sessions of the next step: those due, earliest deadline first, at most ``max_batch``."""
        lead = self.onset_lead_s()
        ready = [s for s in self.sessions.values() if s.ready(now, horizon, lead)]
        if not ready:
            return ready
        ready.sort(key=Session.deadline)
        return ready[: self.max_batch]

    def progressing(self, stall_s: float = 5.0) -> bool:
        """False when a step has been due for ``stall_s`` and none finished: the engine is wedged (a hung
        device, a step that never returns). The routing heartbeat then publishes this node as stalled."""
        now = time.monotonic()
        due = [s.deadline() for s in self.sessions.values() if s.realtime and not s.ending]
        if not due or now - min(due) < stall_s:
            return True
        return now - self.last_step_at < stall_s

    async def _step(self, batch: list[Session]) -> None:
        now, lead = time.monotonic(), self.onset_lead_s()
        for s in batch:  # before its block is cut: a re-plan puts the audio in hand at the earliest open block
            if s.maybe_replan(now, lead):
                self.metrics.onset_replans.inc()
        blocks = [s.start_step() for s in batch]
        # Interrupts of any session (stepped now or not) clear their slot's audio before this step runs.
        clear_slots = [s.slot for s in self.sessions.values() if s.take_clear_request()]
        replan_slots = [s.slot for s in self.sessions.values() if s.take_replan_request()]
        pcm = np.stack([b.pcm_model for b in blocks])
        slots = [s.slot for s in batch]
        t0 = time.perf_counter()
        try:
            results = await self._run_step(slots, pcm, clear_slots, replan_slots)
        except Exception as e:  # a broken step fails its sessions, not the server
            log.exception("engine step failed", batch=[s.id for s in batch])
            for s in batch:
                s.step_failed(SessionFailure(grpc.StatusCode.INTERNAL,
                                             f"the engine failed on this session's step: {e}"))
            return
        dt = time.perf_counter() - t0
        self._step_s = dt if self._step_s is None else 0.8 * self._step_s + 0.2 * dt
        self.last_step_at = time.monotonic()
        self.metrics.step_duration.observe(dt)
        self.metrics.batch_size.observe(len(batch))
        self._apply(batch, results, blocks)

    async def _run_step(self, slots: list[int], pcm: np.ndarray, clear_slots: list[int],
                        replan_slots: list[int] | None = None) -> list[SlotResult]:
        """One engine step in the engine thread, after clearing the audio of the interrupted slots and
        discarding the windows of the re-planned ones."""
        def work() -> list[SlotResult]:
            for c in clear_slots:
                if self.engine.is_allocated(c):
                    self.engine.clear_audio(c)
            for r in replan_slots or ():
                if self.engine.is_allocated(r):
                    self.engine.replan(r)
            return self.engine.step(slots, pcm, deferred=True)

        return await self.in_engine(work)

    def _apply(self, batch: list[Session], results: list[SlotResult], blocks: list[Block]) -> None:
        """Hands each session its step's result; an emitted block goes to the encoders."""
        for s, r, b in zip(batch, results, blocks, strict=True):
            blk = s.step_done(r.emitted_block is not None)
            self.metrics.silence_inserted.inc((b.pcm_in.shape[0] - b.real_samples) / s.audio.rate)
            if blk is not None:
                t = asyncio.create_task(self._deliver(s, r, blk))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    async def _deliver(self, s: Session, r: SlotResult, blk: Block) -> None:
        """Encodes an emitted block and queues its audio and frames in order."""
        async with s.deliver_lock:  # FIFO: blocks of one session are delivered in order
            if not s.accepts_output():
                return
            number = r.emitted_block
            assert number is not None
            dropped = s.make_room(s.fpb)
            if dropped:
                self.metrics.frames_dropped.inc(dropped)
            s.before_encode(blk)
            t0 = time.perf_counter()
            try:
                r, encoded = await asyncio.get_running_loop().run_in_executor(self._codec_pool, _decoded_encoded,
                                                                              r, s.encoder)
            except Exception as e:
                if not s.released:
                    log.exception("decoding or encoding a block failed", session_id=s.id)
                    s.fail(SessionFailure(grpc.StatusCode.INTERNAL, f"decoding or encoding a block failed: {e}"))
                return
            enc = time.perf_counter() - t0
            self._encode_s = enc if self._encode_s is None else 0.8 * self._encode_s + 0.2 * enc
            self.metrics.decode_encode_duration.observe(enc)
            self.metrics.blocks_emitted.inc()
            if r.anchor_similarity is not None:
                self.metrics.anchor_similarity.observe(r.anchor_similarity)
                self._drift_alert(s, s.observe_similarity(r.anchor_similarity, self.drift_floor))
            s.queue_block(number, blk, encoded)
        self.kick()  # backpressured sessions may be ready again

    def _drift_alert(self, s: Session, mean: float | None) -> None:
        """A session whose recent anchor similarity just fell below the checkpoint's calibrated floor."""
        if mean is None or self.drift_floor is None:
            return
        self.metrics.drift_alerts.inc()
        log.warning("session drifting: anchor similarity below the calibrated floor", session_id=s.id,
                    similarity=round(mean, 4), floor=round(self.drift_floor, 4))


def _decoded_encoded(r: SlotResult, encoder: Any) -> tuple[SlotResult, Any]:
    """In an encode thread: the block's frames (waiting for its decoding, when deferred) and their encoding."""
    r = r.wait()
    assert r.frames is not None
    return r, encoder.encode(r.frames)
