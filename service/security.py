"""Bearer-token auth (tenants, per-tenant session limits) and TLS credentials for the server.

Tokens come from a file (``auth_tokens_file``, one entry a line, ``#`` starts a comment) and/or
the environment (``AVATARFORCING_AUTH_TOKENS``, entries separated by commas). An entry is
``TOKEN``, ``TENANT:TOKEN`` or ``TENANT:TOKEN:MAX_SESSIONS`` (tokens must not contain ``:``,
``,`` or whitespace; ``secrets.token_urlsafe`` tokens never do). A bare token's tenant is
``t-`` plus the first 12 hex digits of its SHA-256. Clients send ``authorization: Bearer TOKEN``
metadata on every RPC; only ``grpc.health.v1.Health`` is open (Kubernetes probes carry no token).
With no tokens configured auth is off and every caller is the tenant ``default``.

Failed authentication is logged (warning: peer, method and reason, never the token), counted in
``avatarforcing_auth_failures_total{reason}`` and rate-limited per peer address (:class:`FailureLimiter`):
past ``AUTH_FAILURE_BURST`` failures in ``AUTH_FAILURE_WINDOW_S`` seconds the address is locked out for
``AUTH_LOCKOUT_S`` seconds, during which every RPC from it but health is answered UNAUTHENTICATED at once,
whatever its token (a valid token from a locked-out address is refused too: otherwise the lockout would still
tell a guesser which guess was right).

``Drain`` (:func:`drain_refusal`): with auth on, only admin tenants, from any address (a loopback peer proves
nothing behind a sidecar proxy); with auth off, only loopback peers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import inspect
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog

if TYPE_CHECKING:
    from .telemetry import Metrics

log = structlog.get_logger("avatarforcing.security")

DEFAULT_TENANT = "default"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: Failed authentications one peer address may make within AUTH_FAILURE_WINDOW_S (a token bucket of this size,
#: refilled at AUTH_FAILURE_BURST / AUTH_FAILURE_WINDOW_S per second) before it is locked out for AUTH_LOCKOUT_S.
AUTH_FAILURE_BURST = 10
AUTH_FAILURE_WINDOW_S = 10.0
AUTH_LOCKOUT_S = 30.0
#: Peer addresses tracked at most (the oldest idle ones are forgotten first).
AUTH_TRACKED_PEERS = 4096


class AuthConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Tenant:
    name: str
    max_sessions: int = 0  # 0: the server's default


class TokenTable:
    def __init__(self, entries: Iterable[tuple[str, Tenant]] = ()) -> None:
        # Tokens are looked up by their SHA-256, compared in constant time.
        self._by_hash: dict[str, Tenant] = {}
        for token, tenant in entries:
            self._by_hash[hashlib.sha256(token.encode()).hexdigest()] = tenant

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    @staticmethod
    def parse_entry(entry: str, where: str) -> tuple[str, Tenant]:
        parts = entry.split(":")
        if any(not p or any(c.isspace() for c in p) for p in parts) or len(parts) > 3:
            raise AuthConfigError(f"{where}: bad token entry (use TOKEN, TENANT:TOKEN or TENANT:TOKEN:MAX_SESSIONS)")
        if len(parts) == 1:
            token = parts[0]
            return token, Tenant("t-" + hashlib.sha256(token.encode()).hexdigest()[:12])
        limit = 0
        if len(parts) == 3:
            try:
                limit = int(parts[2])
            except ValueError:
                raise AuthConfigError(f"{where}: MAX_SESSIONS must be an integer") from None
            if limit < 0:
                raise AuthConfigError(f"{where}: MAX_SESSIONS must be >= 0")
        if len(parts[1]) < 16:
            raise AuthConfigError(f"{where}: token of tenant {parts[0]!r} is shorter than 16 characters")
        return parts[1], Tenant(parts[0], limit)

    @classmethod
    def load(cls, file: str = "", env: str = "") -> TokenTable:
        entries: list[tuple[str, Tenant]] = []
        if file:
            try:
                text = Path(file).read_text()
            except OSError as e:
                raise AuthConfigError(f"cannot read the auth tokens file {file}: {e}") from None
            for i, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    entries.append(cls.parse_entry(line, f"{file}:{i}"))
            if not entries:
                raise AuthConfigError(f"the auth tokens file {file} holds no token; auth would lock everyone out")
        for i, item in enumerate(x.strip() for x in env.split(",")):
            if item:
                entries.append(cls.parse_entry(item, f"AVATARFORCING_AUTH_TOKENS entry {i + 1}"))
        return cls(entries)

    def lookup(self, token: str) -> Tenant | None:
        h = hashlib.sha256(token.encode()).hexdigest()
        for known, tenant in self._by_hash.items():  # constant time per entry: no early exit on a prefix
            if hmac.compare_digest(known, h):
                return tenant
        return None

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Tenant:
        """The caller's tenant; raises :class:`AuthError` with the status to answer."""
        if not self.enabled:
            return Tenant(DEFAULT_TENANT)
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            raise AuthError("missing credentials: send the metadata 'authorization: Bearer <token>'", "missing")
        v = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = v.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed authorization metadata: expected 'Bearer <token>'", "malformed")
        tenant = self.lookup(token.strip())
        if tenant is None:
            raise AuthError("invalid token", "invalid")
        return tenant


class AuthError(Exception):
    """A refused authentication; ``reason`` (``missing``, ``malformed``, ``invalid``, ``rate_limited``) labels
    ``avatarforcing_auth_failures_total``. The message never holds the token."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string, without the port: ``ipv4:10.0.0.7:53211`` -> ``10.0.0.7``,
    ``ipv6:[::1]:53211`` -> ``::1``; other kinds (``unix:...``) whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest[1:].split("]", 1)[0] if rest.startswith("[") else rest
    return peer


def is_loopback_peer(peer: str) -> bool:
    """A caller on this host: a loopback address (IPv4-mapped included) or a Unix socket."""
    if peer.startswith(("unix:", "unix-abstract:")):
        return True
    if not peer.startswith(("ipv4:", "ipv6:")):
        return False
    try:
        ip = ipaddress.ip_address(peer_address(peer))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def drain_refusal(tenant: Tenant, peer: str, auth_enabled: bool, admin_tenants: Iterable[str]) -> str | None:
    """Why ``Drain`` is refused to this caller (PERMISSION_DENIED), or ``None`` when it is allowed.

    With auth on only an admin tenant may drain, whatever its address: behind a sidecar proxy every caller
    comes from loopback. With auth off there is no identity, so only a caller on the replica's own host may."""
    admins = set(admin_tenants)
    if auth_enabled:
        if tenant.name in admins:
            return None
        return (f"Drain needs the token of an admin tenant (the server's admin_tenants, AVATARFORCING_ADMIN_TENANTS); "
                f"tenant {tenant.name!r} is not one")
    if is_loopback_peer(peer):
        return None
    return ("Drain without auth is allowed only from the replica's own host (a loopback address); to drain "
            "remotely configure auth tokens and call it with an admin tenant's token")


class FailureLimiter:
    """Failed authentications per peer address: a token bucket of ``burst`` refilled at ``burst / window_s`` per
    second; the failure that empties it locks the address out for ``lockout_s`` seconds (then the bucket is full
    again). A success does not refill it (one valid token must not buy unlimited guesses at others)."""

    def __init__(self, burst: int = AUTH_FAILURE_BURST, window_s: float = AUTH_FAILURE_WINDOW_S,
                 lockout_s: float = AUTH_LOCKOUT_S, max_peers: int = AUTH_TRACKED_PEERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.lockout_s, self.max_peers = burst, burst / window_s, lockout_s, max_peers
        self.clock = clock
        # address -> (tokens left, time of the last update, locked out until)
        self._peers: collections.OrderedDict[str, tuple[float, float, float]] = collections.OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds the address stays locked out (0: not locked out)."""
        entry = self._peers.get(address)
        return 0.0 if entry is None else max(0.0, entry[2] - self.clock())

    def failure(self, address: str) -> bool:
        """Records one failure; True when it locks the address out."""
        now = self.clock()
        tokens, last, until = self._peers.pop(address, (float(self.burst), now, 0.0))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate) - 1.0
        locked = tokens < 1.0  # no token left for another failure: the next attempt is not checked
        if locked:
            until, tokens = now + self.lockout_s, float(self.burst)
        self._peers[address] = (tokens, now, until)
        while len(self._peers) > self.max_peers:  # forget the longest-quiet address that is not locked out
            victim = next((a for a, e in self._peers.items() if e[2] <= now), None)
            if victim is None:
                break
            del self._peers[victim]
        return locked


Admit = Callable[[Any], Awaitable[tuple[grpc.StatusCode, str] | None]]


def _guarded(handler: grpc.RpcMethodHandler, admit: Admit) -> grpc.RpcMethodHandler:
    """The handler, of the same kind and with the same (de)serializers, run only when ``admit(context)`` answers
    ``None``; otherwise the call is aborted with the status it answers. The check runs in the call, where the
    peer is known (``HandlerCallDetails`` carries no peer)."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = await admit(context)
            if refusal is not None:
                await context.abort(*refusal)
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async with contextlib.aclosing(result):
                    async for response in result:
                        yield response
            elif inspect.isawaitable(result):  # a handler writing with context.write
                await result
            else:
                for response in result:
                    yield response

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **kw)
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    inner_unary = handler.stream_unary if handler.request_streaming else handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal = await admit(context)
        if refusal is not None:
            await context.abort(*refusal)
        result = inner_unary(request, context)
        return await result if inspect.isawaitable(result) else result

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without a valid bearer token (UNAUTHENTICATED); logs, counts and
    rate-limits failures per peer address (see the module's docstring)."""

    def __init__(self, table: TokenTable, metrics: Metrics | None = None,
                 limiter: FailureLimiter | None = None) -> None:
        self.table = table
        self.metrics = metrics
        self.limiter = limiter or FailureLimiter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata

        async def admit(context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
            return self.admit(method, metadata, context.peer() or "")

        return _guarded(handler, admit)

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.auth_failures.labels(reason).inc()

    def admit(self, method: str, metadata: Iterable[tuple[str, Any]] | None,
              peer: str) -> tuple[grpc.StatusCode, str] | None:
        """``None`` for a valid token from an address that is not locked out, else the status to answer."""
        address = peer_address(peer)
        wait = self.limiter.retry_after(address)
        if wait > 0:  # counted, not logged one by one: the lockout's start was
            self._count("rate_limited")
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"too many failed attempts; retry after {math.ceil(wait)} s")
        try:
            self.table.authenticate(metadata)
        except AuthError as e:
            self._count(e.reason)
            log.warning("authentication failed", peer=peer, method=method, reason=e.reason, detail=str(e))
            if self.limiter.failure(address):
                log.warning("too many failed authentications: peer address locked out", peer=peer,
                            address=address, lockout_s=self.limiter.lockout_s,
                            burst=self.limiter.burst, window_s=self.limiter.burst / self.limiter.rate)
            return e.code, str(e)
        return None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca`` clients must present a certificate it signed."""
    try:
        chain, pkey = Path(cert).read_bytes(), Path(key).read_bytes()
        ca = Path(client_ca).read_bytes() if client_ca else None
    except OSError as e:
        raise AuthConfigError(f"cannot read the TLS files: {e}") from None
    return grpc.ssl_server_credentials([(pkey, chain)], root_certificates=ca, require_client_auth=ca is not None)
