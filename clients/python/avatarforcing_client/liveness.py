"""Liveness of a session: HTTP/2 keepalive pings on the channel, the automatic ``KeepAlive`` message that keeps
a quiet session from its server's idle timeout, and the stall watchdog's limit for a stream that stopped
delivering."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .errors import SessionClosedError

__all__ = ["keepalive_options", "stall_limit", "KeepAliveSender", "CLOSE_WAIT_S"]

#: How long closing waits for a graceful end (a half-close, the keepalive task) before cancelling.
CLOSE_WAIT_S = 1.0


def keepalive_options(time_s: float | None = 10.0, timeout_s: float = 5.0) -> tuple[tuple[str, Any], ...]:
    """gRPC channel options for HTTP/2 keepalive: a ping after ``time_s`` seconds without activity on the
    connection (also while no call is running), and the connection is closed when the ping is not answered
    within ``timeout_s`` (its calls fail with ``UNAVAILABLE``). ``time_s`` None or 0: no pings. The
    AvatarForcing server accepts a ping every 5 s or more; a server that allows fewer answers a client that
    pings more often with ``GOAWAY`` (``too_many_pings``)."""
    if not time_s:
        return ()
    if time_s < 0 or timeout_s <= 0:
        raise ValueError(f"keepalive_time_s must be >= 0 and keepalive_timeout_s > 0, got {time_s}, {timeout_s}")
    return (
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )


def stall_limit(stall_timeout: float | None, pacing: int, started: pb.SessionStarted | None,
                awaiting_first: bool) -> float | None:
    """Seconds without any response after which a started stream counts as stalled, or None (no watchdog).

    Only ``PACING_REALTIME`` streams are watched (the server sends frames continuously there, silence
    included; it may pause an ASAP stream while the reader is slow). The limit is never less than two
    blocks of frames, and the first response of a stream (``awaiting_first``) may come ``latency_ms``
    later."""
    if not stall_timeout or pacing == pb.PACING_ASAP or started is None:
        return None
    fps, fpb = started.fps, started.frames_per_block
    limit = max(stall_timeout, 2 * fpb / fps) if fps > 0 and fpb > 0 else stall_timeout
    if awaiting_first:
        limit += max(started.latency_ms, 0.0) / 1000
    return limit


class KeepAliveSender:
    """Sends ``KeepAlive`` from a background task whenever nothing was written for ``interval`` seconds.

    The session calls :meth:`touch` after every write; ``send`` writes one ``KeepAlive``; ``finished``
    says when the stream is over (the task then ends by itself)."""

    def __init__(self, send: Callable[[], Awaitable[None]], finished: Callable[[], bool]) -> None:
        self._send = send
        self._finished = finished
        self.last_write = time.monotonic()  # when the last message was handed to the stream
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def touch(self) -> None:
        self.last_write = time.monotonic()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, interval: float | None, name: str) -> None:
        """Start the task unless it runs already (it stops by itself when a stream finishes: a resumed stream
        starts it again). ``interval`` None: nothing to send."""
        if interval is None or self.running:
            return
        self.touch()  # the config (or a resume's replay) was just written
        self._task = asyncio.create_task(self._loop(interval), name=name)

    async def _loop(self, interval: float) -> None:
        try:
            while not self._finished():
                wait = self.last_write + interval - time.monotonic()
                if wait > 0:
                    # Woken early by stop(); otherwise re-check when the quiet period would end.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._stop.wait()
                    continue
                await self._send()
        except (SessionClosedError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the session ended: events() or the next send reports how

    def stop(self) -> None:
        """Wake the task so that it sees the session is finished (call :meth:`join` to wait for it)."""
        self._stop.set()

    async def join(self) -> None:
        task, self._task = self._task, None
        if task is None or task is asyncio.current_task():
            return
        if not task.done():
            # It wakes on stop(); a KeepAlive it is writing ends with the call.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), CLOSE_WAIT_S)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
