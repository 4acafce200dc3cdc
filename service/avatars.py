"""Avatars: content-derived ids, a per-tenant bounded registry of prepared anchors, a shared-volume copy
that survives the routing store losing its data, a per-tenant rate limit on image decoding, and the
low-priority thread that decodes images.

An avatar's id is derived from its tenant and content (the image bytes and the text context): the same
face registered again, on any replica, by the same tenant, gets the same id. So a replica that lost it,
or a routing store that was restarted empty, never breaks a session that names it: the client (or the
SDK, which keeps the images it registered) registers it again and the id still matches.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from avatarforcing import AnchorState

from .security import DEFAULT_TENANT

log = structlog.get_logger("avatarforcing.avatars")


def content_digest(image: bytes, text_context: bytes = b"") -> str:
    return hashlib.sha256(image + b"\0" + hashlib.sha256(text_context).digest()).hexdigest()


def avatar_id_for(tenant: str, digest: str) -> str:
    """The id of ``tenant``'s avatar with content ``digest``: 128 bits of SHA-256(tenant, digest)."""
    h = hashlib.sha256(f"avatarforcing-avatar\0{tenant}\0{digest}".encode()).digest()[:16]
    return "av_" + base64.urlsafe_b64encode(h).decode().rstrip("=")


@dataclass
class Avatar:
    id: str
    name: str
    anchor: AnchorState
    digest: str
    tenant: str = DEFAULT_TENANT
    image: bytes = b""  # as uploaded: written back to the routing store when it loses its data
    text_context: bytes = b""
    last_use: float = field(default_factory=time.monotonic)


class AvatarRegistry:
    """Prepared avatars (anchors computed once, held in device memory). Each tenant keeps at most ``per_tenant`` of
    them (its own least recently used go first). When the whole registry is past ``capacity`` avatars, or its
    anchors past ``max_bytes``, the least recently used avatar of the tenant holding the most (avatars, or bytes)
    goes: one tenant cannot push another's avatars out. The avatar just added is never the one that goes (a session
    is about to use it). An evicted avatar is prepared again from its image (the routing store's, or the avatar
    volume's) when a session names it; live sessions keep a copy of their anchor in their slot."""

    def __init__(self, capacity: int, per_tenant: int = 0, max_bytes: int = 0) -> None:
        self.capacity = capacity
        self.per_tenant = per_tenant or capacity
        self.max_bytes = max_bytes  # 0: no byte budget
        self._by_id: collections.OrderedDict[str, Avatar] = collections.OrderedDict()
        self._by_digest: dict[str, str] = {}
        self._count: collections.Counter[str] = collections.Counter()
        self._bytes: collections.Counter[str] = collections.Counter()

    @property
    def nbytes(self) -> int:
        """Device memory the registered avatars' anchors take."""
        return sum(self._bytes.values())

    def get(self, avatar_id: str, tenant: str = DEFAULT_TENANT) -> Avatar | None:
        """The avatar, if registered here by ``tenant`` (another tenant's avatar is not found)."""
        a = self._by_id.get(avatar_id)
        if a is None or a.tenant != tenant:
            return None
        self._by_id.move_to_end(avatar_id)
        a.last_use = time.monotonic()
        return a

    def by_digest(self, digest: str, tenant: str = DEFAULT_TENANT) -> Avatar | None:
        aid = self._by_digest.get(f"{tenant}\0{digest}")
        return None if aid is None else self.get(aid, tenant)

    def add(self, name: str, anchor: AnchorState, digest: str, tenant: str = DEFAULT_TENANT,
            avatar_id: str | None = None, image: bytes = b"", text_context: bytes = b"") -> Avatar:
        a = Avatar(avatar_id or avatar_id_for(tenant, digest), name, anchor, digest, tenant, image, text_context)
        if a.id in self._by_id:
            self._remove(a.id)
        self._by_id[a.id] = a
        self._by_digest[f"{tenant}\0{digest}"] = a.id
        self._count[tenant] += 1
        self._bytes[tenant] += anchor.nbytes()
        if self._count[tenant] > self.per_tenant:
            self._evict(tenant, keep=a.id)
        while len(self._by_id) > self.capacity and self._evict(self._largest(self._count, a.id), keep=a.id):
            pass
        while (self.max_bytes and self.nbytes > self.max_bytes
               and self._evict(self._largest(self._bytes, a.id), keep=a.id)):
            pass
        if self.max_bytes and self.nbytes > self.max_bytes:
            log.warning("one avatar's anchor alone is over the avatar memory budget: kept, as a session needs it",
                        avatar_id=a.id, anchor_bytes=anchor.nbytes(), budget_bytes=self.max_bytes)
        return a

    def _largest(self, by: collections.Counter[str], keep: str) -> str:
        """The tenant holding the most (of ``by``) among those with an avatar other than ``keep``; "" if none."""
        tenants = {a.tenant for aid, a in self._by_id.items() if aid != keep}
        return max(tenants, key=lambda t: by[t], default="")

    def _evict(self, tenant: str, keep: str) -> bool:
        """Removes ``tenant``'s least recently used avatar other than ``keep``; False if it has none."""
        oldest = next((aid for aid, a in self._by_id.items() if a.tenant == tenant and aid != keep), None)
        if oldest is None:
            return False
        log.info("avatar evicted from this replica's registry", avatar_id=oldest, tenant=tenant)
        self._remove(oldest)
        return True

    def _remove(self, avatar_id: str) -> None:
        a = self._by_id.pop(avatar_id)
        self._by_digest.pop(f"{a.tenant}\0{a.digest}", None)
        self._count[a.tenant] -= 1
        self._bytes[a.tenant] -= a.anchor.nbytes()
        if self._count[a.tenant] <= 0:
            del self._count[a.tenant]
            del self._bytes[a.tenant]

    def count(self, tenant: str) -> int:
        return self._count.get(tenant, 0)

    def values(self) -> list[Avatar]:
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


class AvatarDir:
    """Avatars on a volume every replica mounts (``--avatar-dir``): one file per avatar, named by its id, written
    atomically. The routing store keeps them too; this copy survives the store being restarted empty."""

    MAGIC = b"AFAVATAR1\n"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, avatar_id: str) -> Path:
        if not avatar_id.startswith("av_") or not all(c.isalnum() or c in "_-" for c in avatar_id):
            raise ValueError(f"not an avatar id: {avatar_id!r}")
        return self.root / avatar_id

    def put(self, avatar_id: str, tenant: str, image: bytes, text_context: bytes = b"") -> None:
        path = self._path(avatar_id)
        if path.exists():
            os.utime(path)  # last use: an operator's clean-up can go by modification time
            return
        t = tenant.encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(self.MAGIC + struct.pack("<III", len(t), len(image), len(text_context)))
            f.write(t + image + text_context)
        os.replace(tmp, path)

    def get(self, avatar_id: str, tenant: str) -> tuple[bytes, bytes] | None:
        try:
            data = self._path(avatar_id).read_bytes()
        except (OSError, ValueError):
            return None
        n = len(self.MAGIC)
        if data[:n] != self.MAGIC or len(data) < n + 12:
            log.warning("unreadable avatar file", avatar_id=avatar_id, path=str(self.root))
            return None
        lt, li, lc = struct.unpack("<III", data[n:n + 12])
        body = data[n + 12:]
        if len(body) != lt + li + lc or body[:lt].decode(errors="replace") != tenant:
            return None
        return body[lt:lt + li], body[lt + li:]


class RateLimited(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantRateLimiter:
    """A token bucket per tenant: ``rate`` per second, bursts of ``burst``. ``rate`` 0 turns it off."""

    def __init__(self, rate: float, burst: int, what: str) -> None:
        self.rate, self.burst, self.what = rate, max(1, burst), what
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, tenant: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate
            self._buckets[tenant] = (tokens, now)
            raise RateLimited(f"tenant {tenant!r} is over its rate of {self.rate:g} {self.what} per second "
                              f"(bursts of {self.burst}); retry in {wait:.1f} s", wait)
        self._buckets[tenant] = (tokens - 1.0, now)
        if len(self._buckets) > 10000:  # forget idle tenants (full buckets)
            full = [t for t, (k, ts) in self._buckets.items() if k + (now - ts) * self.rate >= self.burst]
            for t in full:
                del self._buckets[t]


def _nice_this_thread() -> None:
    try:  # Linux: the nice value is per thread, so this lowers only the decoding thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One low-priority thread for image decoding: a burst of large uploads queues here and yields the CPU to the
    engine, the encoders and the event loop, instead of stalling every other session's frames."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="image-decode", initializer=_nice_this_thread)
