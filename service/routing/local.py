"""The in-process router: one node, no store. The zero-configuration default."""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import (
    DETACHED,
    LIVE,
    PENDING,
    Denied,
    Draining,
    Full,
    NodeInfo,
    Placement,
    Router,
    RoutingLimits,
    SessionRecord,
    checked,
)


class LocalRouter(Router):
    kind = "local"

    def __init__(self, node: NodeInfo, limits: RoutingLimits, free_slots: Callable[[], int]) -> None:
        super().__init__(node, limits, free_slots)
        self.detached: dict[str, SessionRecord] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, r in self.detached.items() if r.expires < now]:
            del self.detached[sid]
        for rec in self.unheld():  # a release that never ran: the session is detached, as if it had
            self._detach(rec)

    def _detach(self, rec: SessionRecord) -> None:
        self.local.pop(rec.session_id, None)
        rec.state = DETACHED
        rec.expires = time.monotonic() + self.limits.resume_ttl_s
        self.detached[rec.session_id] = rec

    def _tenant_count(self, tenant: str) -> int:
        """The tenant's pending and live sessions (detached ones hold no quota)."""
        self.local_pending()
        self._expire()
        return sum(1 for r in self.local.values() if r.tenant == tenant)

    def _check_tenant(self, tenant: str, tenant_limit: int) -> None:
        if tenant_limit and self._tenant_count(tenant) >= tenant_limit:
            raise Full.tenant_limit(tenant, tenant_limit)

    def _admit(self, tenant: str, tenant_limit: int) -> None:
        if self.draining:
            raise Draining.no_new_sessions()
        self._check_tenant(tenant, tenant_limit)
        if self.local_free() <= 0:
            raise Full.replica(self.node.capacity)

    async def create(self, tenant: str, tenant_limit: int) -> Placement:
        self._admit(tenant, tenant_limit)
        rec, token = self._record_here(tenant, PENDING)
        return Placement(rec.session_id, token, rec.node_id, rec.address, self.limits.reservation_ttl_s)

    async def create_local(self, tenant: str, tenant_limit: int) -> tuple[SessionRecord, str]:
        self._admit(tenant, tenant_limit)
        return self._record_here(tenant, LIVE)

    def _find(self, session_id: str, token: str, tenant: str) -> SessionRecord:
        self._expire()
        return checked(self.local.get(session_id) or self.detached.get(session_id), session_id, token, tenant)

    async def resume(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> Placement:
        rec = self._find(session_id, token, tenant)
        if rec.state == DETACHED:
            if self.draining:
                raise Draining.no_new_sessions()
            self._check_tenant(tenant, tenant_limit)
            if self.local_free() <= 0:
                raise Full.no_slot_to_resume()
            del self.detached[session_id]
            rec.state = PENDING
            rec.expires = time.monotonic() + self.limits.reservation_ttl_s
            self.local[session_id] = rec
        return Placement(session_id, "", rec.node_id, rec.address, self.limits.reservation_ttl_s, resumed=True)

    async def attach(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> SessionRecord:
        self.local_pending()
        rec = self._find(session_id, token, tenant)
        if rec.state == DETACHED:  # the same client reattaching (it lost only its connection)
            if self.draining:
                raise Draining.no_new_sessions()
            self._check_tenant(tenant, tenant_limit)
            del self.detached[session_id]
            self.local[session_id] = rec
        elif self.draining and rec.state == PENDING:
            raise Draining.no_new_sessions()
        rec.state = LIVE
        rec.epoch += 1
        rec.attached_at = time.monotonic()
        return SessionRecord(**{**rec.__dict__})  # the caller's copy: its epoch is the stream's own

    async def release(self, session_id: str, epoch: int, resumable: bool) -> bool:
        rec = self.local.get(session_id)
        if rec is None or rec.epoch != epoch:
            return False
        if resumable:
            self._detach(rec)
        else:
            del self.local[session_id]
        return True

    async def give_back(self, session_id: str, token: str, tenant: str) -> bool:
        rec = self._pending_local(session_id, token, tenant)
        if rec is None:
            return False
        if rec.epoch == 0:  # never attached
            del self.local[session_id]
        else:
            self._detach(rec)
        return True


__all__ = ["LocalRouter", "Denied"]
