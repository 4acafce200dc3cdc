"""Ownership after a freeze: a replica whose process (or event loop) stood still may have lost its sessions.

Another replica takes a session over once the owner's heartbeat is ``stale_s`` old. A process that was stopped
(SIGSTOP) or whose loop stalled for about that long cannot know, when it runs again, whether its sessions moved
meanwhile: :class:`FreezeGuard` notices the gap and holds every frame until the routing store has confirmed which
sessions are still ours.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from .routing import RoutingLimits

log = structlog.get_logger("avatarforcing.server")


class FreezeGuard:
    """Notices this process standing still; :meth:`owns_for_sure` is False until ownership is confirmed again."""

    def __init__(self, limits: RoutingLimits, confirm: Callable[[], Awaitable[bool]]) -> None:
        self._confirm_with_store = confirm
        self._tick = time.monotonic()
        self._stale_s = limits.stale_s
        # The last heartbeat may have been one interval before the freeze began: hence the margin.
        self._freeze_s = max(0.2, limits.stale_s - limits.heartbeat_s - 0.1)
        self._confirmed = asyncio.Event()
        self._confirmed.set()
        self._confirm_task: asyncio.Task[None] | None = None
        self._liveness_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._tick = time.monotonic()
        self._liveness_task = asyncio.create_task(self._liveness(), name="freeze-detector")

    def stop(self) -> None:
        for t in (self._liveness_task, self._confirm_task):
            if t is not None:
                t.cancel()

    def owns_for_sure(self) -> bool:
        """False after this process (or its event loop) stood still longer than a node may stay silent: its
        sessions may have moved meanwhile, until :meth:`confirm_ownership` has asked the store."""
        if time.monotonic() - self._tick > self._freeze_s:
            self._fence(time.monotonic() - self._tick)
        return self._confirmed.is_set()

    async def confirm_ownership(self) -> None:
        await self._confirmed.wait()

    def stood_still(self, seconds: float) -> None:
        """As if the process had just been stopped for ``seconds`` (SIGSTOP and SIGCONT): what a test of the
        freeze uses, since a real stop would stop the test too."""
        self._tick -= seconds

    def _fence(self, gap: float) -> None:
        self._tick = time.monotonic()
        if self._confirmed.is_set():
            log.warning("this replica stood still (frozen, or its event loop stalled): holding frames until the "
                        "routing store confirms which sessions are still ours", stalled_s=round(gap, 2))
            self._confirmed.clear()
        if self._confirm_task is None or self._confirm_task.done():
            self._confirm_task = asyncio.create_task(self._confirm(), name="confirm-ownership")

    async def _confirm(self) -> None:
        # While the store cannot be asked, nobody can move a session either; a client that did resume elsewhere
        # before has cancelled this stream. So frames wait for an unreachable store only briefly.
        t_end = time.monotonic() + self._stale_s
        while not await self._confirm_with_store():
            if time.monotonic() > t_end:
                log.warning("routing store unreachable: frames go out again without confirmation")
                break
            await asyncio.sleep(0.1)
        self._confirmed.set()

    async def _liveness(self) -> None:
        """Notices this process standing still (SIGSTOP, a blocked loop) the moment it runs again."""
        while True:
            await asyncio.sleep(0.1)
            if time.monotonic() - self._tick > self._freeze_s:
                self._fence(time.monotonic() - self._tick)
            self._tick = time.monotonic()
