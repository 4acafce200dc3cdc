"""The Router interface: node registry, session ownership, placement (see docs/routing.md).

Two backends implement it: :class:`~.local.LocalRouter` (in-process, one node, the zero-config
default) and :class:`~.redis_store.RedisRouter` (many replicas sharing one Redis). The server only
talks to this interface.

A session record goes through three states:

- ``pending``: a slot is reserved on its node by CreateSession; it expires unless a Stream
  attaches within the reservation TTL;
- ``live``: a Stream is attached on its node; the node refreshes it while the session runs;
- ``detached``: the stream went away without an End (the client vanished, or the replica drained
  it away); its slot is free, and the record stays for the resume TTL so the client can resume. A
  detached session does not count against its tenant's limit; resuming it needs room under the limit.

A session that ends with End (or an error status) is deleted.

Every transition is a compare-and-set on the record's owner and its **epoch**, a counter that each
attach and each move increments. A stream holds the epoch it attached with; releasing or refreshing
the record with an older epoch changes nothing, so a stale handler (a stream that is still being
cancelled while its client already reattached) can never release, refresh or overwrite a newer
owner's record. Reattaching to the same owner (the client lost only its connection) is an ordinary
attach: it bumps the epoch, and the old stream's cleanup becomes a no-op.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from avatarforcing_proto.wire import OWNER_ADDRESS_TRAILER as OWNER_ADDRESS_KEY

PENDING, LIVE, DETACHED = "pending", "live", "detached"
SERVING, DRAINING, STALLED = "serving", "draining", "stalled"


class RoutingError(Exception):
    """A routing decision that refuses the call, with the gRPC status to answer.

    Each refusal's text is written once, by a classmethod of its class (``Full.tenant_limit``, ...), which both
    backends raise: clients and tests match on these texts.
    """

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.trailers = trailers


class NotFound(RoutingError):
    code = grpc.StatusCode.NOT_FOUND

    @classmethod
    def session(cls, session_id: str) -> NotFound:
        return cls(f"session {session_id} is unknown or expired; create a new one")


class Denied(RoutingError):
    code = grpc.StatusCode.PERMISSION_DENIED

    @classmethod
    def token(cls, session_id: str) -> Denied:
        """The token or the tenant is not the session's (one answer for both: it tells a guesser nothing)."""
        return cls(f"the session token does not match session {session_id}")


class NotOwner(RoutingError):
    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, session_id: str, address: str) -> None:
        super().__init__(f"session {session_id} runs on the replica at {address}, not on this one; open the "
                         f"stream there (trailing metadata {OWNER_ADDRESS_KEY})", ((OWNER_ADDRESS_KEY, address),))
        self.address = address


class Full(RoutingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @classmethod
    def tenant_limit(cls, tenant: str, limit: int, *, resuming: bool = False) -> Full:
        return cls(f"tenant {tenant!r} already has {limit} sessions, its limit; end one "
                   + ("before resuming this one" if resuming else "first"))

    @classmethod
    def replica(cls, capacity: int) -> Full:
        """This replica has no slot left for a session placed on it."""
        return cls(f"all {capacity} session slots of this replica are in use or reserved; retry later or on "
                   "another replica")

    @classmethod
    def no_slot_to_resume(cls) -> Full:
        return cls("no free session slot to resume on; retry later")

    @classmethod
    def every_replica(cls, *, resuming: bool = False) -> Full:
        if resuming:
            return cls("every replica is full or draining; cannot resume the session now, retry shortly")
        return cls("every replica is full or draining; retry later")


class StoreDown(RoutingError):
    code = grpc.StatusCode.UNAVAILABLE

    @classmethod
    def cannot(cls, what: str) -> StoreDown:
        """``what`` needs the store, and this replica's own records cannot answer it."""
        return cls(f"cannot {what} now: the routing store (Redis) is unreachable; retry shortly")

    @classmethod
    def no_free_slot(cls) -> StoreDown:
        return cls("the routing store (Redis) is unreachable and this replica has no free slot; retry shortly")

    @classmethod
    def tenant_limit_unchecked(cls, tenant: str) -> StoreDown:
        return cls(f"tenant {tenant!r} has a session limit that cannot be checked while the routing store (Redis) "
                   "is unreachable; retry shortly")

    @classmethod
    def recovering(cls) -> StoreDown:
        return cls("the routing store (Redis) has just restarted empty and the replicas are writing their sessions "
                   "back; tenant limits can be checked again in a moment: retry shortly")


class Draining(RoutingError):
    code = grpc.StatusCode.UNAVAILABLE

    @classmethod
    def no_new_sessions(cls) -> Draining:
        return cls("this replica is draining and takes no new sessions; connect to another")

    @classmethod
    def store_unreachable(cls) -> Draining:
        """Draining while the store is down: no other replica can be named, so the client retries."""
        return cls("this replica is draining and the routing store (Redis) is unreachable; retry shortly")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(16)  # 128 random bits


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def check_token(rec_hash: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(rec_hash, token_hash(token))


@dataclass
class NodeInfo:
    node_id: str
    address: str
    capacity: int


@dataclass
class SessionRecord:
    session_id: str
    tenant: str
    token_hash: str
    node_id: str
    address: str
    state: str = PENDING
    expires: float = field(default=0.0)  # monotonic, for the local backend and the local cache
    epoch: int = 0  # incremented by every attach and move: the fencing token of the stream that holds it
    attached_at: float = field(default=0.0)  # monotonic time of the attach that set ``epoch``

    def fields(self) -> dict[str, str]:
        return {"node": self.node_id, "addr": self.address, "tenant": self.tenant, "token": self.token_hash,
                "state": self.state, "epoch": str(self.epoch)}


@dataclass
class Placement:
    session_id: str
    token: str  # empty when resuming (the client has it)
    node_id: str
    address: str
    ttl_s: float
    resumed: bool = False


@dataclass
class RoutingLimits:
    reservation_ttl_s: float = 15.0  # CreateSession -> Stream attach
    resume_ttl_s: float = 30.0  # a detached session can be resumed this long
    session_ttl_s: float = 10.0  # a live session's record outlives its node by this at most
    node_ttl_s: float = 2.0  # a node's entry expires this long after its last heartbeat
    heartbeat_s: float = 0.5

    @property
    def suspect_s(self) -> float:
        """A node whose last heartbeat is older than this may be frozen: a resume waits for a fresher one."""
        return 1.5 * self.heartbeat_s

    @property
    def stale_s(self) -> float:
        """A node whose last heartbeat is older than this is taken for dead (frozen, or its loop stalled)."""
        return min(3.0 * self.heartbeat_s, self.node_ttl_s)

    @property
    def sweep_grace_s(self) -> float:
        """A live record that its owner has not held for this long is released by the owner's sweeper."""
        return max(2.0, 4.0 * self.heartbeat_s)


class Router(abc.ABC):
    """Where sessions run. ``free_slots`` is the App's view of its engine (free slots now)."""

    kind = "abstract"

    def __init__(self, node: NodeInfo, limits: RoutingLimits, free_slots: Callable[[], int]) -> None:
        self.node = node
        self.limits = limits
        self.free_slots = free_slots
        self.draining = False
        self.healthy = True
        # Sessions this node owns (pending or live): the truth when the store is unreachable,
        # and what is written back when the store comes back empty.
        self.local: dict[str, SessionRecord] = {}
        # Sessions that moved to another node while this one still ran them: the App ends them.
        self.on_lost: Callable[[str], None] = lambda sid: None
        # The sessions the App is streaming now, session id -> epoch: what the heartbeat refreshes. A
        # live record the App does not hold (its stream ended but the release never ran) is swept.
        self.held: Callable[[], dict[str, int]] = lambda: {}
        # Whether this node makes progress (its engine steps its sessions): a node that does not is
        # published as ``stalled``, so no session is placed on it and its sessions resume elsewhere.
        self.progressing: Callable[[], bool] = lambda: True

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 (optional hook)
        pass

    async def stop(self) -> None:  # noqa: B027
        pass

    async def set_draining(self) -> None:
        self.draining = True

    async def confirm(self) -> bool:
        """Re-checks with the store that this node still owns the sessions it streams (ending those that moved);
        False when the store cannot be asked now. One node alone (no store) owns everything it holds."""
        return True

    # ---- placement -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def create(self, tenant: str, tenant_limit: int) -> Placement:
        """Reserves a slot on the least-loaded serving node for a new session."""

    @abc.abstractmethod
    async def resume(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> Placement:
        """The node to resume an existing session on: its owner while that is alive and reachable,
        else the least-loaded other serving node (the reservation moves there). A detached session
        needs room under ``tenant_limit``."""

    @abc.abstractmethod
    async def create_local(self, tenant: str, tenant_limit: int) -> tuple[SessionRecord, str]:
        """A session placed on this node by a Stream without CreateSession, returned attached (live),
        with its token."""

    @abc.abstractmethod
    async def attach(self, session_id: str, token: str, tenant: str, tenant_limit: int = 0) -> SessionRecord:
        """A Stream for ``session_id`` arrived here: checks the token and tenant and that this node
        owns the session; marks it live with a new epoch (returned in the record). A detached session
        owned here is reattached (within the tenant's limit)."""

    @abc.abstractmethod
    async def release(self, session_id: str, epoch: int, resumable: bool) -> bool:
        """The stream that attached ``session_id`` with ``epoch`` ended on this node: the record is deleted,
        or kept ``detached`` for resuming. False (nothing changed) when a newer attach or a move holds it."""

    @abc.abstractmethod
    async def give_back(self, session_id: str, token: str, tenant: str) -> bool:
        """A Stream for ``session_id`` was refused here before it attached: the reservation placement made for it
        (``pending`` on this node, ``token`` and ``tenant`` its own) is given back at once instead of holding a slot
        and the tenant's quota until it expires. A session never attached (a fresh CreateSession) is deleted; one
        that ran before (a resume's reservation) goes back to ``detached``, resumable as it was. False (nothing
        changed) for any other record: live, detached, another node's, or a token or tenant not its own."""

    # ---- avatars ---------------------------------------------------------------------------------
    async def put_avatar(self, avatar_id: str, tenant: str, image: bytes,  # noqa: B027
                         text_context: bytes = b"") -> None:
        """Makes a registered avatar's image (and text context) reachable from other replicas (no-op on one node)."""

    async def get_avatar(self, avatar_id: str, tenant: str) -> tuple[bytes, bytes] | None:
        """(image, text context or b"") of an avatar registered on any replica."""
        return None

    # ---- helpers ---------------------------------------------------------------------------------
    def local_pending(self) -> int:
        now = time.monotonic()
        for sid in [s for s, r in self.local.items() if r.state == PENDING and r.expires < now]:
            del self.local[sid]
        return sum(1 for r in self.local.values() if r.state == PENDING)

    def local_free(self) -> int:
        """Slots of this node neither in use nor reserved."""
        return self.free_slots() - self.local_pending()

    def _record_here(self, tenant: str, state: str) -> tuple[SessionRecord, str]:
        """A new session record owned by this node (kept in ``local``), and its token."""
        token = new_token()
        now = time.monotonic()
        rec = SessionRecord(new_session_id(), tenant, token_hash(token), self.node.node_id, self.node.address, state,
                            now + self.limits.reservation_ttl_s, epoch=1 if state == LIVE else 0, attached_at=now)
        self.local[rec.session_id] = rec
        return rec, token

    def holds(self, session_id: str, epoch: int) -> bool:
        """Whether this node's record of ``session_id`` is the one attached with ``epoch`` (no newer stream attached
        it, here or elsewhere, and it did not move away)."""
        rec = self.local.get(session_id)
        return rec is not None and rec.epoch == epoch

    def _pending_local(self, session_id: str, token: str, tenant: str) -> SessionRecord | None:
        """This node's ``pending`` record of ``session_id``, if ``token`` and ``tenant`` are its own."""
        rec = self.local.get(session_id)
        if rec is None or rec.state != PENDING or rec.tenant != tenant or not check_token(rec.token_hash, token):
            return None
        return rec

    def _drop_local(self, session_id: str, epoch: int) -> bool:
        """Forgets the local copy if ``epoch`` still holds it."""
        rec = self.local.get(session_id)
        if rec is None or rec.epoch != epoch:
            return False
        del self.local[session_id]
        return True

    def unheld(self) -> list[SessionRecord]:
        """Live local records that the App has not been streaming for ``sweep_grace_s``: their release was
        skipped (a handler cancelled inside it, a crash in cleanup). The heartbeat releases them."""
        held, now = self.held(), time.monotonic()
        return [r for r in self.local.values() if r.state == LIVE and held.get(r.session_id) != r.epoch
                and now - r.attached_at > self.limits.sweep_grace_s]

    def _check_local(self, sid: str, token: str, tenant: str) -> SessionRecord:
        """This node's record of ``sid``, if ``token`` and ``tenant`` are its own."""
        return checked(self.local.get(sid), sid, token, tenant)


def checked(rec: SessionRecord | None, sid: str, token: str, tenant: str) -> SessionRecord:
    """``rec`` (the record of ``sid`` found, or None), if ``token`` and ``tenant`` are its own."""
    if rec is None:
        raise NotFound.session(sid)
    if not check_token(rec.token_hash, token) or rec.tenant != tenant:
        raise Denied.token(sid)
    return rec


async def reachable(address: str, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``address`` (host:port): a replica killed with
    -9 refuses at once, so its sessions move without waiting for its node entry to expire."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        _r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except (OSError, TimeoutError, ValueError):
        return False
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return True
