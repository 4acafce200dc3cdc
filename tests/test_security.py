"""TLS, mutual TLS and bearer-token auth with tenants: refusals carry the right status codes, and
one tenant cannot attach to, interrupt or end another tenant's session."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from avatarforcing_client import AvatarForcingClient, pb, pb_grpc
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.security import (
    AUTH_FAILURE_BURST,
    FailureLimiter,
    Tenant,
    TokenTable,
    drain_refusal,
    is_loopback_peer,
    peer_address,
)
from avatarforcing_service.server import App

from .cluster import RedisServer, make_tls

AppFactory = Callable[..., Any]
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"
ADMIN = "admin-token-0123456789abcdef"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def tls_creds(tls: Any, client_cert: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        tls.ca.read_bytes(), tls.client_key.read_bytes() if client_cert else None,
        tls.client_cert.read_bytes() if client_cert else None)


def cfg(png: bytes, **kw: object) -> pb.SessionConfig:
    return pb.SessionConfig(reference_image=png, audio_format=pb.AudioFormat(
        encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=16000, channels=1),
        video_encoding=pb.VIDEO_ENCODING_JPEG, pacing=pb.PACING_REALTIME, **kw)  # type: ignore[arg-type]


async def refusal(ch: grpc.aio.Channel, md: Any, config: pb.SessionConfig) -> grpc.aio.AioRpcError:
    call = pb_grpc.AvatarForcingStub(ch).Stream(metadata=md)
    await call.write(pb.StreamRequest(config=config))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call.read()
    return ei.value


def test_token_table_parsing(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# comment\n{ALICE}\nbob:{BOB}:3\n\n")
    t = TokenTable.load(str(f), "carol:carol-token-0123456789ab")
    assert len(t) == 3
    assert t.lookup(ALICE) is not None and t.lookup(ALICE).name.startswith("t-")  # type: ignore[union-attr]
    assert t.lookup(BOB) == t.authenticate(bearer(BOB)) and t.lookup(BOB).max_sessions == 3  # type: ignore[union-attr]
    assert t.lookup("nope") is None
    for bad, match in [("bob:short", "shorter than 16"), ("a:b:c:d", "bad token entry"),
                       (f"bob:{BOB}:x", "integer")]:
        with pytest.raises(ValueError, match=match):
            TokenTable.load("", bad)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenTable.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="invalid server config"):
        App(ServerConfig(auth_tokens="x:y"))
    assert "redacted" in ServerConfig(auth_tokens=f"a:{ALICE}").to_json() and ALICE not in \
        ServerConfig(auth_tokens=f"a:{ALICE}").to_json()


async def test_tls_auth_and_tenant_isolation(make_app: AppFactory, redis_server: RedisServer, tmp_path: Path,
                                            png: bytes) -> None:
    tls = make_tls(tmp_path)
    app = await make_app(tls_cert=str(tls.server_cert), tls_key=str(tls.server_key), health_port=0,
                         auth_tokens=f"alice:{ALICE}:1,bob:{BOB}", redis_url=redis_server.url)
    assert app.auth is not None  # this test fails on purpose more often than the per-peer lockout allows
    app.auth.limiter = FailureLimiter(burst=1000)
    target = f"127.0.0.1:{app.port}"
    # Plaintext to the TLS port: no connection.
    async with grpc.aio.insecure_channel(target) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pb_grpc.AvatarForcingStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    # Health stays reachable in plaintext on the health port, without a token.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.secure_channel(target, tls_creds(tls)) as ch:
        stub = pb_grpc.AvatarForcingStub(ch)
        # No token, a malformed one, a wrong one: UNAUTHENTICATED on every RPC (health excepted).
        for md, match in [((), "missing credentials"), ((("authorization", ALICE),), "malformed"),
                          (bearer("wrong-token-0123456789"), "invalid token")]:
            for rpc in (stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md),
                        stub.CreateSession(pb.CreateSessionRequest(), metadata=md),
                        stub.RegisterAvatar(pb.RegisterAvatarRequest(image=png), metadata=md)):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await rpc
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED and match in (ei.value.details() or "")
            err = await refusal(ch, md, cfg(png))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status == \
            health_pb2.HealthCheckResponse.SERVING

    async with AvatarForcingClient(target, credentials=tls_creds(tls), token=ALICE) as alice, \
            AvatarForcingClient(target, credentials=tls_creds(tls), token=BOB) as bob:
        avatar = await alice.register_avatar(png)
        s = alice.session(avatar_id=avatar)
        await s.start()
        sid, token = s.session_id, s._placement.token
        # Alice's avatar is not Bob's.
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await bob.session(avatar_id=avatar).start()
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        # Alice's limit is one session.
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await alice.create_session()
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant 'alice'" in ei.value.details()
        # Bob cannot attach to Alice's session, with a guessed token or with hers, nor resume it.
        bob_md = bob.metadata
        async with grpc.aio.secure_channel(target, tls_creds(tls)) as ch:
            for t in ("guess", token):
                err = await refusal(ch, bob_md, cfg(png, session_id=sid, session_token=t))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            for t in ("guess", token):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await bob.create_session(sid, t)
                assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A wrong token cannot reach Drain either.
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await pb_grpc.AvatarForcingStub(ch).Drain(pb.DrainRequest(), metadata=bearer("wrong-token-0123456789"))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Alice's session was not interrupted or ended by any of that.
        n = 0
        async for ev in s.events():
            assert not isinstance(ev, pb.End)
            n += isinstance(ev, pb.VideoFrame)
            if n == 10:
                break
        assert s.resumes == 0 and sid in app.owned
        await s.close()


async def test_mutual_tls_needs_a_client_certificate(make_app: AppFactory, tmp_path: Path) -> None:
    tls = make_tls(tmp_path)
    app = await make_app(tls_cert=str(tls.server_cert), tls_key=str(tls.server_key), tls_client_ca=str(tls.ca))
    target = f"127.0.0.1:{app.port}"
    async with grpc.aio.secure_channel(target, tls_creds(tls)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await pb_grpc.AvatarForcingStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    async with AvatarForcingClient(target, credentials=tls_creds(tls, client_cert=True)) as c:
        info = await c.server_info()
        assert info.routing == "local" and info.node_id == app.node_id


# ---- Drain: admin tenants only (auth on), loopback only (auth off) ------------------------------------


def test_drain_refusal_rules() -> None:
    admins = {"admin"}
    local = ("ipv4:127.0.0.1:5001", "ipv4:127.3.2.1:5001", "ipv6:[::1]:5001", "ipv6:[::ffff:127.0.0.1]:5001",
             "unix:/run/af.sock")
    remote = ("ipv4:10.0.0.7:5001", "ipv6:[2001:db8::1]:5001", "ipv6:[::ffff:10.0.0.7]:5001", "ipv4:1270.0.0.1:1",
              "")
    assert all(is_loopback_peer(p) for p in local) and not any(is_loopback_peer(p) for p in remote)
    # Auth on: only an admin tenant, whatever its address (behind a sidecar proxy every caller is loopback).
    for peer in local + remote:
        assert drain_refusal(Tenant("admin"), peer, True, admins) is None
        msg = drain_refusal(Tenant("alice"), peer, True, admins)
        assert msg is not None and "admin tenant" in msg and "'alice'" in msg
    # Auth off: no identity, so loopback callers only; admin_tenants naming "default" changes nothing.
    for peer in local:
        assert drain_refusal(Tenant("default"), peer, False, admins) is None
    for peer in remote:
        msg = drain_refusal(Tenant("default"), peer, False, {"default"})
        assert msg is not None and "own host" in msg
    assert [peer_address(p) for p in ("ipv4:10.0.0.7:5001", "ipv6:[::1]:5001", "unix:/x")] == \
        ["10.0.0.7", "::1", "unix:/x"]


async def test_drain_needs_an_admin_token_even_from_loopback(make_app: AppFactory) -> None:
    app = await make_app(auth_tokens=f"alice:{ALICE},admin:{ADMIN}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = pb_grpc.AvatarForcingStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.Drain(pb.DrainRequest(deadline_s=1.0), metadata=bearer(ALICE))
        assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "admin tenant" in (ei.value.details() or "") and "admin_tenants" in (ei.value.details() or "")
        assert not app.draining
        r = await stub.Drain(pb.DrainRequest(deadline_s=1.0), metadata=bearer(ADMIN))
        assert r.deadline_s == 1.0 and app.draining


# ---- failed authentication: logged, counted, rate-limited per peer address ---------------------------


def test_failure_limiter_token_bucket() -> None:
    now = [100.0]
    lim = FailureLimiter(burst=3, window_s=3.0, lockout_s=20.0, clock=lambda: now[0])
    assert not lim.failure("a") and not lim.failure("a")
    assert lim.failure("a") and lim.retry_after("a") == 20.0 and lim.retry_after("b") == 0.0  # per address
    now[0] += 20.0
    assert lim.retry_after("a") == 0.0
    # One failure a second refills as fast as it drains (3 in 3 s): never locked out.
    for _ in range(10):
        now[0] += 1.0
        assert not lim.failure("b")
    lim = FailureLimiter(burst=2, window_s=1.0, max_peers=2, clock=lambda: now[0])
    lim.failure("x"), lim.failure("y"), lim.failure("z")
    assert len(lim._peers) == 2 and "x" not in lim._peers  # the longest-quiet address is forgotten


async def test_auth_failures_are_logged_counted_and_rate_limited(make_app: AppFactory, png: bytes) -> None:
    app = await make_app(auth_tokens=f"alice:{ALICE}")
    target = f"127.0.0.1:{app.port}"
    guess = "guessed-secret-0123456789abcdef"

    def failures(reason: str) -> float:
        return app.metrics.registry.get_sample_value("avatarforcing_auth_failures_total", {"reason": reason}) or 0.0

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.AvatarForcingStub(ch)
        with capture_logs() as logs:
            for md in [(), (("authorization", guess),)] + [bearer(guess)] * (AUTH_FAILURE_BURST - 2):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=md)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "too many" not in (ei.value.details() or "")
        assert (failures("missing"), failures("malformed"), failures("invalid")) == (1, 1, AUTH_FAILURE_BURST - 2)
        failed = [e for e in logs if e["event"] == "authentication failed"]
        assert len(failed) == AUTH_FAILURE_BURST and all(e["log_level"] == "warning" for e in failed)
        assert [e["reason"] for e in failed[:3]] == ["missing", "malformed", "invalid"]
        assert all(e["peer"].startswith("ipv4:127.0.0.1:") and "GetServerInfo" in e["method"] for e in failed)
        assert any(e["event"].startswith("too many failed") for e in logs)
        assert guess not in repr(logs)  # the token itself is never logged

        # Locked out: every RPC from this address is refused unchecked, even with a valid token...
        for call in (stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer(ALICE)),
                     stub.RegisterAvatar(pb.RegisterAvatarRequest(image=png), metadata=bearer(ALICE))):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            m = re.fullmatch(r"too many failed attempts; retry after (\d+) s", ei.value.details() or "")
            assert m is not None and 25 <= int(m.group(1)) <= 30, ei.value.details()  # the 30 s lockout
        err = await refusal(ch, bearer(ALICE), cfg(png))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "too many failed" in (err.details() or "")
        assert failures("rate_limited") == 3 and failures("invalid") == AUTH_FAILURE_BURST - 2
        # ...but health, which needs no token, still answers.
        assert (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status == \
            health_pb2.HealthCheckResponse.SERVING
        # After the lockout the valid token works again.
        assert app.auth is not None
        app.auth.limiter.clock = lambda: time.monotonic() + 31
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=bearer(ALICE))
        assert info.node_id == app.node_id


# ---- GetServerInfo: per tenant, no file paths --------------------------------------------------------


async def test_server_info_is_per_tenant_and_hides_paths(make_app: AppFactory, png: bytes) -> None:
    app = await make_app(auth_tokens=f"alice:{ALICE},bob:{BOB},admin:{ADMIN}")
    path = "/srv/secret-models/run-17/avatarforcing.safetensors"
    app.loaded = dataclasses.replace(app.loaded, source=path)
    target = f"127.0.0.1:{app.port}"
    async with AvatarForcingClient(target, token=ALICE) as alice, AvatarForcingClient(target, token=BOB) as bob, \
            AvatarForcingClient(target, token=ADMIN) as admin:
        avatar = await alice.register_avatar(png)
        async with alice.session(avatar_id=avatar, video_encoding=pb.VIDEO_ENCODING_JPEG):
            a, b, adm = await alice.server_info(), await bob.server_info(), await admin.server_info()
        assert (a.active_sessions, a.registered_avatars) == (1, 1)
        assert (b.active_sessions, b.registered_avatars) == (0, 0)
        assert (adm.active_sessions, adm.registered_avatars) == (1, 1)
        assert a.model.checkpoint == b.model.checkpoint == "avatarforcing.safetensors"
        assert adm.model.checkpoint == path
        for info in (a, b, adm):
            assert info.capacity_sessions == 4 and info.free_slots == 4 - 1  # capacity is everyone's
    # Auth off: no one is an admin, so no path either.
    app2 = await make_app()
    app2.loaded = dataclasses.replace(app2.loaded, source=path)
    async with AvatarForcingClient(f"127.0.0.1:{app2.port}") as c:
        assert (await c.server_info()).model.checkpoint == "avatarforcing.safetensors"
