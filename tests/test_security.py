"""TLS, mutual TLS and bearer-token auth with tenants: refusals carry the right status codes, and
one tenant cannot attach to, interrupt or end another tenant's session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarforcing_client import AvatarForcingClient, pb, pb_grpc
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.security import TokenTable
from avatarforcing_service.server import App

from .cluster import RedisServer, make_tls

AppFactory = Callable[..., Any]
ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdefgh"


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
        sid, token = s.session_id, s._token
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
