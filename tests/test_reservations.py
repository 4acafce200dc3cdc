"""A stream refused before it attaches gives its CreateSession reservation back at once (Router.give_back), on both
routing backends (the Redis one against a real redis-server), through the server, and when the client cancels
while the server is still opening the stream (held there deterministically). See docs/routing.md."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from avatarforcing_client import AvatarForcingClient, pb, pb_grpc
from avatarforcing_service.routing import Full, LocalRouter, NodeInfo, NotFound, Router, RoutingLimits
from avatarforcing_service.routing.redis_store import RedisRouter
from avatarforcing_service.server import App

from .cluster import RedisServer
from .conftest import png_bytes
from .test_routing import AppFactory, addr, config, open_raw, wait_for


@pytest.fixture(params=["local", "redis"])
async def router(request: pytest.FixtureRequest) -> AsyncIterator[Router]:
    node = NodeInfo("n0", "127.0.0.1:1000", 2)
    r: Router
    if request.param == "local":
        r = LocalRouter(node, RoutingLimits(), lambda: 2)
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        r = RedisRouter(node, RoutingLimits(), lambda: 2, url=redis.url, op_timeout_s=5.0)
    await r.start()
    yield r
    await r.stop()


def redis_of(r: Router, request: pytest.FixtureRequest) -> RedisServer | None:
    return request.getfixturevalue("redis_server") if isinstance(r, RedisRouter) else None


async def test_give_back_frees_a_fresh_reservation_once_and_only_with_its_token(
        router: Router, request: pytest.FixtureRequest) -> None:
    p = await router.create("t", 1)
    with pytest.raises(Full):  # the tenant's one place is the reservation's
        await router.create("t", 1)
    other = await router.create("u", 0)
    assert not await router.give_back(p.session_id, other.token, "t")  # another session's token
    assert not await router.give_back(p.session_id, p.token, "u")  # another tenant
    assert not await router.give_back(p.session_id, "", "t")
    assert router.local_pending() == 2
    with pytest.raises(Full):
        await router.create("t", 1)

    assert await router.give_back(p.session_id, p.token, "t")
    assert not await router.give_back(p.session_id, p.token, "t")  # given back exactly once
    assert router.local_pending() == 1 and p.session_id not in router.local
    redis = redis_of(router, request)
    if redis is not None:
        assert redis.cli("EXISTS", f"af:session:{p.session_id}") == "0"
        assert redis.cli("ZSCORE", "af:pending:n0", p.session_id) == "None"
        assert redis.cli("ZSCORE", "af:tenant:t", p.session_id) == "None"
    with pytest.raises(NotFound):  # the session is gone: attaching to it is refused
        await router.attach(p.session_id, p.token, "t")
    again = await router.create("t", 1)  # the tenant's place and the slot are free again
    assert again.node_id == "n0"


async def test_give_back_leaves_live_sessions_and_returns_a_resume_to_detached(
        router: Router, request: pytest.FixtureRequest) -> None:
    p = await router.create("t", 0)
    rec = await router.attach(p.session_id, p.token, "t")
    assert not await router.give_back(p.session_id, p.token, "t")  # live: its stream owns it
    assert router.local[p.session_id].state == "live"

    assert await router.release(p.session_id, rec.epoch, resumable=True)  # the stream broke
    resumed = await router.resume(p.session_id, p.token, "t")
    assert resumed.resumed and router.local_pending() == 1
    assert await router.give_back(p.session_id, p.token, "t")  # the resumed stream was refused
    assert router.local_pending() == 0
    redis = redis_of(router, request)
    if redis is not None:
        assert redis.cli("HGET", f"af:session:{p.session_id}", "state") == "detached"
        assert redis.cli("ZSCORE", "af:tenant:t", p.session_id) == "None"  # a detached session holds no quota
    # Still resumable, as it was before the refused stream.
    again = await router.resume(p.session_id, p.token, "t")
    assert again.resumed
    rec = await router.attach(p.session_id, p.token, "t")
    assert rec.state == "live"


# ---- through the server ---------------------------------------------------------------------------------------
async def create(app: App) -> pb.CreateSessionResponse:
    async with grpc.aio.insecure_channel(addr(app)) as ch:
        return await pb_grpc.AvatarForcingStub(ch).CreateSession(pb.CreateSessionRequest())


async def refused(app: App, cfg: pb.SessionConfig) -> grpc.aio.AioRpcError:
    ch, call = await open_raw(addr(app), cfg)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await call.read()
        return ei.value
    finally:
        await ch.close()


def placed(p: pb.CreateSessionResponse, cfg: pb.SessionConfig) -> pb.SessionConfig:
    cfg.session_id, cfg.session_token = p.session_id, p.session_token
    return cfg


async def test_a_refused_stream_frees_its_replica_slot_but_an_unknown_avatar_keeps_it(
        make_app: AppFactory, png: bytes) -> None:
    """One slot: before, a stream refused for a bad image left the reservation holding the slot for 15 s, and
    CreateSession answered RESOURCE_EXHAUSTED meanwhile."""
    app: App = await make_app(max_sessions=1)
    p = await create(app)
    e = await refused(app, placed(p, config(b"not an image")))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert app.router.local == {}
    p = await create(app)  # the slot is free again at once

    e = await refused(app, placed(p, pb.SessionConfig(avatar_id="av_unknown", video_encoding=pb.VIDEO_ENCODING_JPEG)))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "register it again" in (e.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as ei:  # kept: the client registers the avatar and attaches again
        await create(app)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ch, call = await open_raw(addr(app), placed(p, config(png)))
    try:
        first = await call.read()
        assert first.HasField("started") and first.started.session_id == p.session_id
    finally:
        call.cancel()
        await ch.close()


async def test_a_draining_replica_refuses_the_stream_and_frees_its_reservation(make_app: AppFactory,
                                                                              png: bytes) -> None:
    app: App = await make_app(max_sessions=2)
    p = await create(app)
    await app.drain(deadline_s=5)
    e = await refused(app, placed(p, config(png)))
    assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (e.details() or "")
    assert app.router.local == {}


async def test_a_client_that_cancels_while_the_stream_opens_frees_its_reservation(make_app: AppFactory,
                                                                                   png: bytes) -> None:
    """The cancellation lands at the avatar step's await (the stream is held there until the client has gone)."""
    app: App = await make_app(max_sessions=1)
    assert app._opener is not None
    real = app._opener.resolve_avatar
    entered, go = asyncio.Event(), asyncio.Event()

    async def held(spec: Any, tenant: str) -> Any:
        entered.set()
        await go.wait()
        return await real(spec, tenant)

    app._opener.resolve_avatar = held
    p = await create(app)
    ch, call = await open_raw(addr(app), placed(p, config(png)))
    await asyncio.wait_for(entered.wait(), 10)
    assert app.router.local_pending() == 1
    call.cancel()
    await ch.close()
    await wait_for(lambda: app.router.local == {}, "the reservation given back")
    go.set()
    await create(app)  # the one slot is free


async def test_sdk_retries_of_a_rate_limited_image_leave_no_reservation_behind(make_app: AppFactory) -> None:
    """The SDK answers RESOURCE_EXHAUSTED (an image over the tenant's rate) by waiting the server's retry-after and
    asking for placement again: each refused try left its reservation holding a slot for 15 s."""
    app: App = await make_app(max_sessions=2, image_rate_per_s=1.0, image_burst=1)
    async with AvatarForcingClient(addr(app), placement_timeout=10.0) as c:
        await c.register_avatar(png_bytes(color=(10, 20, 30)))  # the burst of one new image is spent
        refusals = app.metrics.registry.get_sample_value("avatarforcing_sessions_rejected_total",
                                                         {"code": "resource_exhausted"}) or 0
        async with c.session(image=png_bytes(color=(90, 80, 70)), video_encoding=pb.VIDEO_ENCODING_JPEG) as s:
            assert s.session_id
            after = app.metrics.registry.get_sample_value("avatarforcing_sessions_rejected_total",
                                                          {"code": "resource_exhausted"})
            assert after is not None and after > refusals  # it was refused at least once first
            assert app.router.local_pending() == 0 and list(app.router.local) == [s.session_id]


async def test_sdk_gives_up_at_once_when_the_server_asks_to_wait_longer_than_it_has(make_app: AppFactory) -> None:
    """A retry-after beyond the placement time left ends the start with the server's own RESOURCE_EXHAUSTED, at
    once, rather than a DEADLINE_EXCEEDED once the time has been waited out."""
    app: App = await make_app(max_sessions=2, image_rate_per_s=0.001, image_burst=1)
    async with AvatarForcingClient(addr(app), placement_timeout=5.0) as c:
        await c.register_avatar(png_bytes(color=(10, 20, 30)))
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.session(image=png_bytes(color=(90, 80, 70))).start()
    # (Before, the SDK slept out the time left and then failed its next CreateSession with DEADLINE_EXCEEDED.)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in (ei.value.details() or "")
    assert app.router.local == {}
