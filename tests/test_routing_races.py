"""Routing races and outages, made deterministic: hooks hold a handler at the racing point (App.hooks), a real
redis-server, in-process replicas (issue 13: never lose or double a session)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import grpc
import pytest

from avatarforcing_client import AvatarForcingClient, pb
from avatarforcing_service.server import App
from avatarforcing_service.session import Session

from .cluster import RedisServer
from .test_routing import AppFactory, addr, config, open_raw, replicas, wait_for, wait_slots_free

ALICE = "alice-token-0123456789abcdef"


class Hold:
    """A hook that parks the task reaching it until released (only for the session it is armed for)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.go = asyncio.Event()
        self.session_id: str | None = None
        self.epoch: int | None = None
        self.hits = 0

    async def __call__(self, s: Session | None) -> None:
        if s is None or s.id != self.session_id or (self.epoch is not None and s.epoch != self.epoch):
            return
        self.hits += 1
        self.entered.set()
        await self.go.wait()


def record(redis: RedisServer, sid: str) -> dict[str, str]:
    import redis as redis_lib

    r = redis_lib.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        return dict(r.hgetall(f"af:session:{sid}"))  # type: ignore[arg-type]
    finally:
        r.close()


def owner_and_other(p: pb.CreateSessionResponse, a: App, b: App) -> tuple[App, App]:
    """The replica the placement ``p`` chose, and the other one."""
    return (a, b) if p.node_id == a.node_id else (b, a)


async def started(call: Any) -> pb.SessionStarted:
    resp = await call.read()
    assert resp.HasField("started"), resp
    return resp.started


async def next_frame(call: Any) -> pb.VideoFrame:
    while True:
        resp = await asyncio.wait_for(call.read(), 10)
        assert resp is not grpc.aio.EOF
        if resp.HasField("frame"):
            return resp.frame


# ---- race 1: a reattach to the same owner while the old stream is still being cancelled --------------------
@pytest.mark.parametrize("order", ["old-release-held", "old-release-first", "old-stream-still-live"])
async def test_reattach_to_the_same_owner_is_never_released_by_the_old_stream(
        make_app: AppFactory, redis_server: RedisServer, png: bytes, order: str) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    hold = Hold()
    a.hooks["release_route"] = hold
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        owner.hooks["release_route"] = hold
        cfg = config(png, session_id=p.session_id, session_token=p.session_token)
        ch1, call1 = await open_raw(p.address, cfg)
        await started(call1)
        assert record(redis_server, p.session_id)["epoch"] == "1"
        hold.session_id, hold.epoch = p.session_id, 1
        if order == "old-release-held":  # the old handler is cancelled and parked inside its release
            call1.cancel()
            await asyncio.wait_for(hold.entered.wait(), 10)
        elif order == "old-release-first":  # its release ran: the record is detached; then the client comes back
            hold.go.set()
            call1.cancel()
            await wait_for(lambda: record(redis_server, p.session_id).get("state") == "detached", "detached")
        # old-stream-still-live: the old stream has not even noticed that its client went away.
        ch2, call2 = await open_raw(p.address, cfg)
        await started(call2)  # the reattach works in every order (never NOT_FOUND "detached")
        await next_frame(call2)
        rec = record(redis_server, p.session_id)
        assert rec["state"] == "live" and rec["epoch"] == "2" and rec["node"] == owner.node_id
        if order == "old-stream-still-live":
            with pytest.raises(grpc.aio.AioRpcError) as ei:  # the old stream yields to the new one
                while True:
                    await call1.read()
            assert ei.value.code() == grpc.StatusCode.ABORTED
        hold.go.set()  # the old stream's release runs now, with the old epoch: it changes nothing
        await wait_for(lambda: hold.hits >= (0 if order == "old-release-first" else 1) and
                       owner.owned.get(p.session_id) is not None, "old release done")
        await asyncio.sleep(3 * owner.cfg.heartbeat_s + owner.router.limits.sweep_grace_s)
        rec = record(redis_server, p.session_id)
        assert rec["state"] == "live" and rec["epoch"] == "2", rec  # neither released nor swept
        assert owner.owned[p.session_id].epoch == 2 and owner.router.local[p.session_id].epoch == 2
        # The heartbeat keeps it alive, so a later resume finds the owner instead of placing a second copy.
        r = await c.create_session(p.session_id, p.session_token)
        assert r.node_id == owner.node_id and r.resumed
        assert not other.owned
        await next_frame(call2)
        call2.cancel()
        for ch in (ch1, ch2):
            await ch.close()
    await wait_slots_free([a, b])
    await wait_for(lambda: record(redis_server, p.session_id).get("state") == "detached", "released once, detached")


# ---- race 2: a handler cancelled inside its release ------------------------------------------------------------
async def test_a_handler_cancelled_inside_its_release_still_releases(make_app: AppFactory, redis_server: RedisServer,
                                                                     png: bytes) -> None:
    (a,) = await replicas(make_app, redis_server, 1, max_sessions=2, auth_tokens=f"alice:{ALICE}:1")
    md = (("authorization", f"Bearer {ALICE}"),)
    hold = Hold()
    a.hooks["release_route"] = hold
    async with AvatarForcingClient(addr(a), token=ALICE) as c:
        p = await c.create_session()
        hold.session_id = p.session_id
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token,
                                                    pacing=pb.PACING_ASAP), md)
        await started(call)
        await call.write(pb.StreamRequest(end_of_audio=pb.EndOfAudio()))
        await call.done_writing()
        while (resp := await call.read()) is not grpc.aio.EOF and not resp.HasField("end"):
            pass
        await asyncio.wait_for(hold.entered.wait(), 10)  # the handler is inside its release...
        handler_tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()
                         and any(f.f_code.co_name == "Stream" for f in t.get_stack())]
        for t in handler_tasks:  # ...and is cancelled there (the client closed right after End)
            t.cancel()
        call.cancel()
        await ch.close()
        await asyncio.sleep(0.2)
        assert record(redis_server, p.session_id).get("state") == "live"  # still held at the racing point
        hold.go.set()
        await wait_for(lambda: not record(redis_server, p.session_id), "the ended session's record is deleted")
        # The tenant (limit 1) is not locked out: a new session is admitted.
        p2 = await c.create_session()
        assert p2.session_id != p.session_id
    await wait_slots_free([a])


async def test_close_session_cannot_be_skipped_by_cancelling_its_caller(make_app: AppFactory,
                                                                        redis_server: RedisServer, png: bytes) -> None:
    (a,) = await replicas(make_app, redis_server, 1, max_sessions=2)
    hold = Hold()
    a.hooks["release_route"] = hold
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token))
        await started(call)
        s = a.owned[p.session_id]
        hold.session_id = p.session_id
        s.set_resumable(False)
        closer = asyncio.create_task(a.close_session(s))
        await asyncio.wait_for(hold.entered.wait(), 10)
        closer.cancel()  # the caller goes away at the racing point...
        with pytest.raises(asyncio.CancelledError):
            await closer
        again = asyncio.create_task(a.close_session(s))  # ...and a second close waits for the one in progress
        hold.go.set()
        await again
        assert not record(redis_server, p.session_id) and hold.hits == 1  # released, and exactly once
        call.cancel()
        await ch.close()
    await wait_slots_free([a])


# ---- the sweepers: records whose owner holds no stream -----------------------------------------------------------
async def test_records_no_stream_holds_are_swept(make_app: AppFactory, redis_server: RedisServer) -> None:
    (a,) = await replicas(make_app, redis_server, 1, max_sessions=4)
    # A live record whose local copy is also gone (a release that never ran, and a restart of the router's state)...
    rec1, _ = await a.router.create_local("t", 0)
    a.router.local.pop(rec1.session_id)
    # ...and one whose local copy remains, but no stream of the App holds it.
    rec2, _ = await a.router.create_local("t", 0)
    assert record(redis_server, rec1.session_id)["state"] == "live"
    grace = a.router.limits.sweep_grace_s
    await asyncio.sleep(grace / 2)
    assert record(redis_server, rec1.session_id)["state"] == "live"  # not before the grace period
    await wait_for(lambda: record(redis_server, rec1.session_id).get("state") == "detached" and
                   record(redis_server, rec2.session_id).get("state") == "detached", "both swept", timeout=grace + 5)
    assert redis_server.cli("ZCARD", "af:tenant:t") == "0"  # they hold no quota any more
    await wait_for(lambda: not a.router.local, "the local copies are gone too")


# ---- frozen owner ------------------------------------------------------------------------------------------------
async def test_a_frozen_owner_is_detected_by_its_silent_heartbeat(make_app: AppFactory, redis_server: RedisServer,
                                                                  png: bytes) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token))
        await started(call)
        # The owner's event loop "freezes": no heartbeat, though its port still accepts connections.
        task = owner.router._task  # type: ignore[attr-defined]
        task.cancel()
        await asyncio.sleep(owner.router.limits.suspect_s + 0.1)  # as late as a client's stall watchdog asks
        async with AvatarForcingClient(addr(other)) as c2:
            r = await c2.create_session(p.session_id, p.session_token)
        assert r.node_id == other.node_id and r.resumed
        rec = record(redis_server, p.session_id)
        assert rec["node"] == other.node_id and rec["state"] == "pending" and rec["epoch"] == "2"
        # When the owner wakes up, its heartbeat learns that the session moved and ends its stream.
        owner.router._task = asyncio.create_task(owner.router._loop())  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            while True:
                await call.read()
        assert ei.value.code() == grpc.StatusCode.ABORTED
        await ch.close()
    await wait_slots_free([a, b])


# ---- Redis outages -----------------------------------------------------------------------------------------------
async def test_resume_while_redis_is_paused_answers_unavailable_then_moves(
        make_app: AppFactory, redis_server: RedisServer, png: bytes) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token))
        await started(call)
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)  # paused, data intact
        try:
            await owner.stop(grace=0)  # the owner dies while Redis cannot be asked
            async with AvatarForcingClient(addr(other)) as c2:
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await c2.create_session(p.session_id, p.session_token)
                assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value  # "retry", not NOT_FOUND
                assert "Redis" in (ei.value.details() or "")
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        async with AvatarForcingClient(addr(other)) as c2:
            r = await c2.create_session(p.session_id, p.session_token)  # the record is back: it moves
        assert r.node_id == other.node_id and r.resumed
        await ch.close()
    await wait_slots_free([other])


async def test_tenant_limit_holds_while_redis_is_down(make_app: AppFactory, redis_server: RedisServer) -> None:
    apps = await replicas(make_app, redis_server, 3, max_sessions=4, auth_tokens=f"alice:{ALICE}:2")
    await wait_for(lambda: all(ap.router.serving_nodes == 3 for ap in apps), "every replica sees 3 serving")
    async with AvatarForcingClient(addr(apps[0]), token=ALICE) as c:
        await c.create_session()  # one session before the outage
        await wait_for(lambda: all(ap.router.tenant_counts.get("alice") == 1 for ap in apps), "counts seen")
    redis_server.stop()
    admitted = 0
    for ap in apps:
        async with AvatarForcingClient(addr(ap), token=ALICE) as c:
            for _ in range(3):
                try:
                    await c.create_session()
                    admitted += 1
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and "limit" in (e.details() or "")
    # Room left was 1 over 3 replicas: each may admit (2 - 1) // 3 = 0: the limit holds.
    assert admitted == 0
    redis_server.start()
    await wait_for(lambda: all(ap.router.healthy for ap in apps), "Redis back", timeout=15)


# ---- avatars survive the routing store losing its data ------------------------------------------------------
async def test_registered_avatars_survive_flushall(make_app: AppFactory, redis_server: RedisServer, png: bytes,
                                                   tmp_path: Any) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    async with AvatarForcingClient(addr(a)) as c:
        aid = await c.register_avatar(png, "face")
        assert aid == await c.register_avatar(png, "face")  # content-derived: the same image, the same id
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        cfg = pb.SessionConfig(avatar_id=aid, session_id=p.session_id, session_token=p.session_token,
                               pacing=pb.PACING_REALTIME, video_encoding=pb.VIDEO_ENCODING_JPEG)
        ch, call = await open_raw(p.address, cfg)
        await started(call)
        redis_server.cli("FLUSHALL")
        await wait_for(lambda: redis_server.cli("EXISTS", f"af:avatar:{aid}") == "1", "the owner writes it back")
        assert record(redis_server, p.session_id)["state"] == "live"
        other.avatars = type(other.avatars)(other.avatars.capacity)  # the other replica never saw it
        await owner.stop(grace=0)
        async with AvatarForcingClient(addr(other)) as c2:
            r = await c2.create_session(p.session_id, p.session_token)
            assert r.node_id == other.node_id
            cfg.resume_block = 1
            ch2, call2 = await open_raw(r.address, cfg)
            await started(call2)  # the resumed session finds its avatar
            call2.cancel()
            await ch2.close()
        await ch.close()
    await wait_slots_free([other])


async def test_avatar_volume_survives_an_empty_store(make_app: AppFactory, redis_server: RedisServer, png: bytes,
                                                     tmp_path: Any) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2, avatar_dir=str(tmp_path / "avatars"))
    async with AvatarForcingClient(addr(a)) as c:
        aid = await c.register_avatar(png, "face")
    redis_server.cli("FLUSHALL")  # no live session to write it back
    b.avatars = type(b.avatars)(b.avatars.capacity)
    ch, call = await open_raw(addr(b), pb.SessionConfig(avatar_id=aid, pacing=pb.PACING_REALTIME,
                                                        video_encoding=pb.VIDEO_ENCODING_JPEG))
    assert (await started(call)).avatar_id == aid
    assert redis_server.cli("EXISTS", f"af:avatar:{aid}") == "1"  # back in the store for the next replica
    call.cancel()
    await ch.close()
    await wait_slots_free([a, b])


# ---- one tenant's load --------------------------------------------------------------------------------------
async def test_avatar_quota_and_image_rate_are_per_tenant(make_app: AppFactory, redis_server: RedisServer) -> None:
    import io

    import numpy as np
    from PIL import Image

    def face(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), i, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    bob = "bob-token-0123456789abcdef0123"
    (a,) = await replicas(make_app, redis_server, 1, tenant_max_avatars=3, image_rate_per_s=0.01, image_burst=4,
                          auth_tokens=f"alice:{ALICE},bob:{bob}")
    async with AvatarForcingClient(addr(a), token=bob) as cb, AvatarForcingClient(addr(a), token=ALICE) as ca:
        bob_avatar = await cb.register_avatar(face(200))
        ids = [await ca.register_avatar(face(i)) for i in range(4)]  # a burst of 4
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await ca.register_avatar(face(99))  # the fifth new image: over alice's rate
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in (ei.value.details() or "")
        assert dict(ei.value.trailing_metadata() or ()).get("retry-after-ms")
        assert await ca.register_avatar(face(3)) == ids[3]  # a known image costs nothing
        # Alice holds at most 3: her least recently used went; Bob's is untouched, here and in the store.
        assert a.avatars.count("alice") == 3 and a.avatars.get(ids[0], "alice") is None
        assert a.avatars.get(bob_avatar, "bob") is not None
        assert redis_server.cli("ZCARD", "af:avatars:alice") == "3"
        assert redis_server.cli("EXISTS", f"af:avatar:{ids[0]}") == "0"
        assert redis_server.cli("EXISTS", f"af:avatar:{bob_avatar}") == "1"


async def test_a_flushed_store_holds_tenant_limits_until_sessions_are_written_back(
        make_app: AppFactory, redis_server: RedisServer, png: bytes) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2, auth_tokens=f"alice:{ALICE}:1")
    md = (("authorization", f"Bearer {ALICE}"),)
    async with AvatarForcingClient(addr(a), token=ALICE) as c:
        p = await c.create_session()
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token), md)
        await started(call)
        redis_server.cli("FLUSHALL")  # alice's live session is unknown to the store for up to a heartbeat
        with pytest.raises(grpc.aio.AioRpcError) as ei:  # placed at once, this one would exceed her limit
            await c.create_session()
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in (ei.value.details() or "")
        assert record(redis_server, p.session_id)["state"] == "live"
        call.cancel()
        await ch.close()
    await wait_slots_free([a, b])


async def test_a_replica_that_stood_still_sends_no_frame_before_confirming_ownership(
        make_app: AppFactory, redis_server: RedisServer, png: bytes) -> None:
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token))
        await started(call)
        await next_frame(call)
        s = owner.owned[p.session_id]
        owner.router._task.cancel()  # type: ignore[attr-defined]  # its heartbeat stops...
        await asyncio.sleep(owner.router.limits.suspect_s + 0.1)
        async with AvatarForcingClient(addr(other)) as c2:
            r = await c2.create_session(p.session_id, p.session_token)  # ...so the session moves
        assert r.node_id == other.node_id
        # The owner "wakes up" (as after SIGCONT: its loop stood still longer than a node may be silent). Its next
        # frame waits for the store, which says the session moved: the stream ends without another frame.
        owner.freeze.stood_still(10)
        sent_before = s.frames_sent
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            while True:
                await call.read()
        assert ei.value.code() == grpc.StatusCode.ABORTED
        assert s.frames_sent <= sent_before + 1  # at most the one already past the check when the clock jumped
        await ch.close()
    await wait_slots_free([a, b])


async def test_a_paused_store_does_not_make_healthy_owners_look_dead(make_app: AppFactory, redis_server: RedisServer,
                                                                     png: bytes) -> None:
    """Every node's heartbeat is late after Redis was paused for longer than a node may be silent; none of them is
    frozen for that. A resume right after the pause finds the owner, instead of moving its session."""
    a, b = await replicas(make_app, redis_server, 2, max_sessions=2)
    async with AvatarForcingClient(addr(a)) as c:
        p = await c.create_session()
        owner, other = owner_and_other(p, a, b)
        ch, call = await open_raw(p.address, config(png, session_id=p.session_id, session_token=p.session_token))
        await started(call)
        assert redis_server.proc is not None
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2 * owner.router.limits.stale_s)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        async with AvatarForcingClient(addr(other)) as c2:
            r = await c2.create_session(p.session_id, p.session_token)
        assert r.node_id == owner.node_id, "a healthy owner was taken for dead after a store pause"
        await next_frame(call)  # and its stream goes on
        call.cancel()
        await ch.close()
    await wait_slots_free([a, b])


async def test_a_replica_that_never_reached_the_store_admits_no_limited_tenant(
        make_app: AppFactory, redis_server: RedisServer) -> None:
    """A replica started while Redis is unreachable knows nothing of a tenant's sessions elsewhere: it places
    sessions of tenants without a limit (when it has room), never those of a tenant with one."""
    redis_server.stop()
    bob = "bob-token-0123456789abcdef"
    (a,) = await replicas(make_app, redis_server, 1, max_sessions=2, auth_tokens=f"alice:{ALICE}:1,bob:{bob}")
    async with AvatarForcingClient(addr(a), token=ALICE) as c:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.create_session()
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "limit" in (ei.value.details() or "")
    async with AvatarForcingClient(addr(a), token=bob) as c:
        assert (await c.create_session()).node_id == a.node_id
    redis_server.start()


# ---- a client that vanishes: its requests end before its handler is cancelled ----------------------------------
async def test_a_vanished_client_s_half_close_does_not_end_its_session_for_good(make_app: AppFactory,
                                                                                png: bytes) -> None:
    """When a client goes away, gRPC ends the handler's requests (a half-close) before it cancels the handler. The
    half-close ends the session with End(CLIENT_CLOSED); while that End waits to go out, the client is already gone.
    The session must stay resumable (detached), not be deleted: only an End that went out ends it for good."""
    app = await make_app()
    hold = Hold()
    app.hooks["end"] = hold
    async with AvatarForcingClient(addr(app)) as c:
        p = await c.create_session()
        hold.session_id = p.session_id
        cfg = config(png, session_id=p.session_id, session_token=p.session_token)
        ch, call = await open_raw(p.address, cfg)
        await started(call)
        await call.done_writing()  # the requests end: the session ends, its End is held just before it goes out
        await asyncio.wait_for(hold.entered.wait(), 10)
        call.cancel()  # and the client is gone: gRPC cancels the held handler
        await ch.close()
        await wait_slots_free([app])
        assert p.session_id in app.router.detached  # type: ignore[attr-defined]
        r = await c.create_session(p.session_id, p.session_token)
        assert r.resumed and r.session_id == p.session_id
        # A client that half-closes and reads its End: the session is over, nothing to resume.
        hold.go.set()
        ch, call = await open_raw(p.address, cfg)
        await started(call)
        await call.done_writing()
        ends = []
        while (resp := await asyncio.wait_for(call.read(), 10)) is not grpc.aio.EOF:
            if resp.HasField("end"):
                ends.append(resp.end.reason)
        assert ends == [pb.END_REASON_CLIENT_CLOSED]
        await ch.close()
        await wait_slots_free([app])
        assert p.session_id not in app.router.detached  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.create_session(p.session_id, p.session_token)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


# ---- a replica's stop while a Redis command is timing out ------------------------------------------------------
async def test_stop_ends_the_heartbeat_even_when_a_redis_call_absorbs_the_cancellation(
        redis_server: RedisServer) -> None:
    """Seen with Redis frozen (SIGSTOP): stop() cancelled the heartbeat while one of its commands was timing out, the
    client raised its own timeout instead of the cancellation, the loop went on, and stop() waited for it forever.
    The heartbeat is held inside a command that answers a cancellation that way."""
    from redis.exceptions import TimeoutError as RedisTimeout

    from avatarforcing_service.routing import NodeInfo, RoutingLimits
    from avatarforcing_service.routing.redis_store import RedisRouter

    router = RedisRouter(NodeInfo("n0", "127.0.0.1:1000", 1), RoutingLimits(heartbeat_s=0.05), lambda: 1,
                         url=redis_server.url)
    await router.start()
    entered = asyncio.Event()
    absorbed: list[bool] = []

    async def beat_inside_a_timing_out_command() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()  # the command, in flight
        except asyncio.CancelledError:
            if absorbed:  # (once: so that the test's own teardown can still end the task)
                raise
            absorbed.append(True)
            raise RedisTimeout("Timeout reading from the store") from None  # what the client raised instead

    router.beat = beat_inside_a_timing_out_command  # type: ignore[method-assign]
    await asyncio.wait_for(entered.wait(), 10)
    stop = asyncio.create_task(router.stop())
    done, _ = await asyncio.wait([stop], timeout=10)
    assert done, "stop() did not return: the heartbeat loop went on after its cancellation was absorbed"
    assert router._task is not None and router._task.done()
