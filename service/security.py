"""Bearer-token auth (tenants, per-tenant session limits) and TLS credentials for the server.

Tokens come from a file (``auth_tokens_file``, one entry a line, ``#`` starts a comment) and/or
the environment (``AVATARFORCING_AUTH_TOKENS``, entries separated by commas). An entry is
``TOKEN``, ``TENANT:TOKEN`` or ``TENANT:TOKEN:MAX_SESSIONS`` (tokens must not contain ``:``,
``,`` or whitespace; ``secrets.token_urlsafe`` tokens never do). A bare token's tenant is
``t-`` plus the first 12 hex digits of its SHA-256. Clients send ``authorization: Bearer TOKEN``
metadata on every RPC; only ``grpc.health.v1.Health`` is open (Kubernetes probes carry no token).
With no tokens configured auth is off and every caller is the tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TENANT = "default"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


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
            raise AuthError("missing credentials: send the metadata 'authorization: Bearer <token>'")
        v = values[0] if isinstance(values[0], str) else values[0].decode()
        scheme, _, token = v.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed authorization metadata: expected 'Bearer <token>'")
        tenant = self.lookup(token.strip())
        if tenant is None:
            raise AuthError("invalid token")
        return tenant


class AuthError(Exception):
    code = grpc.StatusCode.UNAUTHENTICATED


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without a valid bearer token (UNAUTHENTICATED)."""

    def __init__(self, table: TokenTable) -> None:
        self.table = table

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            self.table.authenticate(handler_call_details.invocation_metadata)
        except AuthError as e:
            return _refusal(handler, e.code, str(e))
        return handler


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with ``client_ca`` clients must present a certificate it signed."""
    try:
        chain, pkey = Path(cert).read_bytes(), Path(key).read_bytes()
        ca = Path(client_ca).read_bytes() if client_ca else None
    except OSError as e:
        raise AuthConfigError(f"cannot read the TLS files: {e}") from None
    return grpc.ssl_server_credentials([(pkey, chain)], root_certificates=ca, require_client_auth=ca is not None)
