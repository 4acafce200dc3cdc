"""The in-process router: one node, no store. The zero-configuration default."""

from __future__ import annotations

import time

from .base import (
    DETACHED,
    LIVE,
    PENDING,
    Denied,
    Draining,
    Full,
    NotFound,
    Placement,
    Router,
    SessionRecord,
    check_token,
)


class LocalRouter(Router):
    kind = "local"

    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.detached: dict[str, SessionRecord] = {}

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, r in self.detached.items() if r.expires < now]:
            del self.detached[sid]

    def _tenant_count(self, tenant: str) -> int:
        self.local_pending()
        self._expire()
        return sum(1 for r in (*self.local.values(), *self.detached.values()) if r.tenant == tenant)

    def _admit(self, tenant: str, tenant_limit: int) -> None:
        if self.draining:
            raise Draining("this replica is draining and takes no new sessions; connect to another")
        if tenant_limit and self._tenant_count(tenant) >= tenant_limit:
            raise Full(f"tenant {tenant!r} already has {tenant_limit} sessions, its limit; end one first")
        if self.local_free() <= 0:
            raise Full(f"all {self.node.capacity} session slots of this replica are in use or reserved; retry "
                       "later or on another replica")

    async def create(self, tenant: str, tenant_limit: int) -> Placement:
        self._admit(tenant, tenant_limit)
        rec, token = self._record_here(tenant, PENDING)
        return Placement(rec.session_id, token, rec.node_id, rec.address, self.limits.reservation_ttl_s)

    async def create_local(self, tenant: str, tenant_limit: int) -> tuple[SessionRecord, str]:
        self._admit(tenant, tenant_limit)
        return self._record_here(tenant, LIVE)

    async def resume(self, session_id: str, token: str, tenant: str) -> Placement:
        self._expire()
        rec = self.local.get(session_id) or self.detached.get(session_id)
        if rec is None:
            raise NotFound(f"session {session_id} is unknown or expired; create a new one")
        if not check_token(rec.token_hash, token) or rec.tenant != tenant:
            raise Denied(f"the session token does not match session {session_id}")
        if rec.state == DETACHED:
            if self.draining:
                raise Draining("this replica is draining and takes no new sessions; connect to another")
            if self.local_free() <= 0:
                raise Full("no free session slot to resume on; retry later")
            del self.detached[session_id]
            rec.state = PENDING
            rec.expires = time.monotonic() + self.limits.reservation_ttl_s
            self.local[session_id] = rec
        return Placement(session_id, "", rec.node_id, rec.address, self.limits.reservation_ttl_s, resumed=True)

    async def attach(self, session_id: str, token: str, tenant: str) -> SessionRecord:
        self.local_pending()
        rec = self.local.get(session_id)
        if rec is None and session_id in self.detached:
            raise NotFound(f"session {session_id} is detached; resume it with CreateSession first")
        rec = self._check_local(session_id, token, tenant)
        if self.draining and rec.state == PENDING:
            raise Draining("this replica is draining and takes no new sessions; connect to another")
        rec.state = LIVE
        return rec

    async def release(self, session_id: str, resumable: bool) -> None:
        rec = self.local.pop(session_id, None)
        if rec is not None and resumable:
            rec.state = DETACHED
            rec.expires = time.monotonic() + self.limits.resume_ttl_s
            self.detached[session_id] = rec


__all__ = ["LocalRouter", "Denied"]
