"""The scheduler: earliest deadline first, one batched engine step at a time, off the event loop.

Each wake-up it collects the sessions whose next block is due (REALTIME: the deadline is near,
or a full block of audio is waiting and the session is not too far ahead; ASAP: a block of audio
is waiting or the tail must be flushed), sorts them by deadline, and runs up to ``max_batch`` of
them as ONE engine step in the engine thread. Encoding runs in a separate thread pool, so the
next step can start while the previous block is being encoded. Every engine call (step, slot
allocation and release, interrupts) runs in the single engine thread, so slot state never races.
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
from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio_in import Block
from .session import OutItem, Session, SessionFailure
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
        if s.release_task is None:
            s.released = True
            s.ending = True
            self.sessions.pop(s.id, None)
            s.release_task = asyncio.create_task(self._release(s), name=f"release-{s.id}")
            self._tasks.add(s.release_task)
            s.release_task.add_done_callback(self._tasks.discard)
        await asyncio.shield(s.release_task)

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
            ready = [s for s in self.sessions.values() if s.ready(now, horizon)]
            if not ready:
                wake = min((s.next_wake(horizon) for s in self.sessions.values()), default=float("inf"))
                self._kick.clear()
                try:
                    await asyncio.wait_for(self._kick.wait(), timeout=min(max(wake - now, 0.0), 0.1))
                except TimeoutError:
                    pass
                continue
            ready.sort(key=Session.deadline)
            batch = ready[: self.max_batch]
            try:
                await self._step(batch)
            except Exception as e:  # never let one bad batch stop every session's stream
                log.exception("scheduler step failed")
                for s in batch:
                    s.in_flight = False
                    s.fail(SessionFailure(grpc.StatusCode.INTERNAL, f"internal error while stepping: {e}"))

    def progressing(self, stall_s: float = 5.0) -> bool:
        """False when a step has been due for ``stall_s`` and none finished: the engine is wedged (a hung
        device, a step that never returns). The routing heartbeat then publishes this node as stalled."""
        now = time.monotonic()
        due = [s.deadline() for s in self.sessions.values() if s.realtime and not s.ending]
        if not due or now - min(due) < stall_s:
            return True
        return now - self.last_step_at < stall_s

    async def _step(self, batch: list[Session]) -> None:
        blocks = [s.take_block() for s in batch]
        clears = [s for s in self.sessions.values() if s.clear_requested and not s.released]
        for s in clears:
            s.clear_requested = False
        for s in batch:
            s.in_flight = True
        pcm = np.stack([b.pcm_model for b in blocks])
        slots = [s.slot for s in batch]
        clear_slots = [s.slot for s in clears]

        def work() -> list[SlotResult]:
            for c in clear_slots:
                if self.engine.is_allocated(c):
                    self.engine.clear_audio(c)
            return self.engine.step(slots, pcm)

        t0 = time.perf_counter()
        try:
            results = await self.in_engine(work)
        except Exception as e:  # a broken step fails its sessions, not the server
            log.exception("engine step failed", batch=[s.id for s in batch])
            for s in batch:
                s.in_flight = False
                s.fail(SessionFailure(grpc.StatusCode.INTERNAL, f"the engine failed on this session's step: {e}"))
            return
        dt = time.perf_counter() - t0
        self.last_step_at = time.monotonic()
        self.metrics.step_duration.observe(dt)
        self.metrics.batch_size.observe(len(batch))
        for s, r, b in zip(batch, results, blocks, strict=True):
            s.steps += 1
            s.in_flight = False
            self.metrics.silence_inserted.inc((b.pcm_in.shape[0] - b.real_samples) / s.audio.rate)
            if r.emitted_block is not None:
                blk = s.pending.popleft()
                t = asyncio.create_task(self._deliver(s, r, blk))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

    def _check_drift(self, s: Session) -> None:
        """Flags a session whose recent anchor similarity fell below the checkpoint's calibrated floor."""
        if self.drift_floor is None or len(s.recent_sim) < (s.recent_sim.maxlen or 0):
            return
        mean = sum(s.recent_sim) / len(s.recent_sim)
        if mean < self.drift_floor and not s.drifting:
            s.drifting = True
            self.metrics.drift_alerts.inc()
            log.warning("session drifting: anchor similarity below the calibrated floor", session_id=s.id,
                        similarity=round(mean, 4), floor=round(self.drift_floor, 4))
        elif mean >= self.drift_floor and s.drifting:
            s.drifting = False

    async def _deliver(self, s: Session, r: SlotResult, blk: Block) -> None:
        """Encodes an emitted block and queues its audio and frames in order."""
        async with s.deliver_lock:  # FIFO: blocks of one session are delivered in order
            if s.ending or s.released:
                return
            assert r.frames is not None and r.emitted_block is not None
            j = r.emitted_block + s.block_offset  # resumed sessions continue the client's block numbering
            fpb = s.fpb
            a_off = s.block_offset * s.audio.in_block
            dropped = s.make_room(fpb)
            if dropped:
                self.metrics.frames_dropped.inc(dropped)
            t0 = time.perf_counter()
            try:
                encoded = await asyncio.get_running_loop().run_in_executor(self._codec_pool, s.encoder.encode, r.frames)
            except Exception as e:
                if not s.released:
                    log.exception("encoding failed", session_id=s.id)
                    s.fail(SessionFailure(grpc.StatusCode.INTERNAL, f"encoding failed: {e}"))
                return
            self.metrics.decode_encode_duration.observe(time.perf_counter() - t0)
            self.metrics.blocks_emitted.inc()
            if r.anchor_similarity is not None:
                self.metrics.anchor_similarity.observe(r.anchor_similarity)
                s.recent_sim.append(r.anchor_similarity)
                self._check_drift(s)
            spf = s.audio.in_block // fpb
            first = j * fpb
            s.out.put(OutItem(pb.StreamResponse(audio=pb.AudioOut(
                block_index=j, start_sample=blk.start_sample + a_off, data=blk.pcm_in.astype("<i2").tobytes(),
                silent=blk.real_samples == 0, real_samples=blk.real_samples, real_offset=blk.real_offset,
                source_end_sample=blk.source_end)),
                block=j, due=s.frame_due(first)))
            for i, ef in enumerate(encoded):
                n = first + i
                a0 = blk.start_sample + a_off + i * spf
                msg = pb.StreamResponse(frame=pb.VideoFrame(
                    index=n, pts_us=round(n * 1e6 / s.timeline.fps), audio_start_sample=a0,
                    audio_end_sample=a0 + spf, data=ef.data, keyframe=ef.keyframe, block_index=j))
                s.out.put(OutItem(msg, frames=1, block=j, due=s.frame_due(n),
                                  arrival=blk.newest_arrival if blk.real_samples else None))
            if (j + 1) * fpb // int(s.timeline.fps) != j * fpb // int(s.timeline.fps):
                s.out.put(OutItem(s.stats(), block=j, due=s.frame_due(first + fpb - 1)))
            s.delivered_block = r.emitted_block
            s.maybe_finish()
        self.kick()  # backpressured sessions may be ready again
