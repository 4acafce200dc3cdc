"""The Python SDK never loses a session to a replica that freezes instead of dying, nor to a routing store that
lost its data or is unreachable for a while (issue 13): HTTP/2 keepalive on every channel, the REALTIME
frame-stall watchdog, deadlines on every placement and attach, UNAVAILABLE retried through a resume, and avatars
registered again when a replica no longer knows them. Real servers only: in-process Apps, replicas as
subprocesses frozen with SIGSTOP, a real redis-server (frozen too)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from avatarforcing_client import AvatarForcingClient, pb
from avatarforcing_client.client import SessionClosedError, StreamStalledError
from avatarforcing_client.stream import read_within

from .cluster import RedisServer, Replica, start_replica, wait_serving
from .conftest import speechlike_pcm

AppFactory = Callable[..., Any]
#: Slack on top of a time limit of the SDK: the cancellation of the attempt that was running, a loaded CPU.
MARGIN_S = 2.5


def addr(app: Any) -> str:
    return f"127.0.0.1:{app.port}"


class SilentListener:
    """A TCP port that accepts connections (the kernel completes the handshake) but never answers a byte:
    what a frozen process looks like from the network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentListener]:
    s = SilentListener()
    yield s
    s.close()


def freeze(rep: Replica) -> None:
    os.kill(rep.proc.pid, signal.SIGSTOP)


def thaw_and_stop(rep: Replica) -> None:
    if rep.proc.poll() is None:
        os.kill(rep.proc.pid, signal.SIGCONT)
    rep.terminate()


# ---- keepalive ---------------------------------------------------------------------------------------
async def test_every_channel_is_dialed_with_keepalive(make_app: AppFactory, png: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The front channel and the replica channel a session is placed on both carry the keepalive options;
    `options` overrides them key by key, keepalive_time_s=None leaves them out; a session runs with them."""
    want = {"grpc.keepalive_time_ms": 10000, "grpc.keepalive_timeout_ms": 5000,
            "grpc.keepalive_permit_without_calls": 1, "grpc.http2.max_pings_without_data": 0}
    assert want.items() <= dict(AvatarForcingClient("x:1").channel_options).items()
    opts = dict(AvatarForcingClient("x:1", keepalive_time_s=20, keepalive_timeout_s=2,
                                    options=[("grpc.keepalive_timeout_ms", 3000)]).channel_options)
    assert opts["grpc.keepalive_time_ms"] == 20000 and opts["grpc.keepalive_timeout_ms"] == 3000
    assert opts["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert not any(k.startswith("grpc.keepalive") for k in dict(AvatarForcingClient(
        "x:1", keepalive_time_s=None).channel_options))

    dialed: list[tuple[str, dict[str, Any]]] = []
    real = grpc.aio.insecure_channel

    def recording(target: str, options: Any = None, *a: Any, **kw: Any) -> grpc.aio.Channel:
        dialed.append((target, dict(options or ())))
        return real(target, options, *a, **kw)

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording)
    app = await make_app()
    # "localhost" as the target: the replica the session is placed on (127.0.0.1) gets a channel of its own.
    async with AvatarForcingClient(f"localhost:{app.port}", stall_timeout=None) as c:
        async with c.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG) as s:
            assert s.address == addr(app)
            frames = 0
            async for ev in s.events():
                frames += isinstance(ev, pb.VideoFrame)
                if frames == 8:
                    break
    assert {t for t, _ in dialed} == {f"localhost:{app.port}", addr(app)}
    for target, o in dialed:
        assert want.items() <= o.items(), (target, o)


# ---- deadlines on placement and attach -----------------------------------------------------------------
async def test_start_against_a_silent_target_ends_within_placement_timeout(make_app: AppFactory, png: bytes,
                                                                           silent: SilentListener) -> None:
    """A target that accepts TCP but never answers: start() raises DEADLINE_EXCEEDED within placement_timeout
    (it used to hang for gRPC's 20 s connect timeout); with a live second target it starts there in time."""
    async with AvatarForcingClient(silent.address, placement_timeout=3.0) as c:
        s = c.session(image=png)
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(s.start(), 30)
        took = time.monotonic() - t0
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
        assert took < 3.0 + MARGIN_S, took
        assert s.closed
    app = await make_app()
    async with AvatarForcingClient([silent.address, addr(app)], placement_timeout=6.0) as c:
        t0 = time.monotonic()
        async with c.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG) as s:
            assert time.monotonic() - t0 < 6.0 + MARGIN_S
            assert s.address == addr(app) and s.started.node_id == app.node_id
        # The silent target is tried last from now on: the live one answered.
        assert c._front == 1


async def test_an_attach_to_a_silent_replica_is_cut_off_by_attach_timeout(make_app: AppFactory, png: bytes,
                                                                          silent: SilentListener) -> None:
    """CreateSession answers, but the replica it names (here: the address the server advertises) accepts
    connections and never answers: each attach is cancelled after attach_timeout, placement is asked again,
    and start() raises DEADLINE_EXCEEDED within placement_timeout."""
    app = await make_app(advertise_address=silent.address)
    async with AvatarForcingClient(addr(app), placement_timeout=4.0, attach_timeout=1.5) as c:
        s = c.session(image=png)
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await asyncio.wait_for(s.start(), 30)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
        assert silent.address in (ei.value.details() or ""), ei.value.details()
        assert time.monotonic() - t0 < 4.0 + MARGIN_S
        placed = app.metrics.registry.get_sample_value("avatarforcing_placements_total", {"result": "local"})
        assert placed is not None and placed >= 2  # asked again after the first attach ran out


async def test_a_frozen_replica_stalls_a_session_and_start_stays_bounded(tmp_path: Path, png: bytes) -> None:
    """One replica (no Redis), frozen with SIGSTOP under two REALTIME sessions: the one that may not resume
    gets StreamStalledError from events(); the one that may keeps trying for resume_timeout and then raises
    the last status; a new session's start() gives up within placement_timeout."""
    rep = start_replica("", "frozen-solo", tmp_path)
    try:
        await asyncio.to_thread(wait_serving, rep)
        async with AvatarForcingClient(rep.address, resume_timeout=0) as c0, \
                AvatarForcingClient(rep.address, resume_timeout=3.0) as c3:
            no_resume = c0.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG)
            resumable = c3.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG)
            await no_resume.start()
            await resumable.start()

            frozen_at: list[float] = []

            async def read(s: Any) -> tuple[int, grpc.aio.AioRpcError, float]:
                frames = 0
                try:
                    async for ev in s.events():
                        if isinstance(ev, pb.VideoFrame):
                            frames += 1
                            if frames == 10 and not frozen_at:  # the first session to get 10 frames
                                freeze(rep)
                                frozen_at.append(time.monotonic())
                except grpc.aio.AioRpcError as e:
                    assert frozen_at, e
                    return frames, e, time.monotonic() - frozen_at[0]
                raise AssertionError("events() ended without an error")

            async with asyncio.timeout(60):
                (f0, e0, t0), (f3, e3, t3) = await asyncio.gather(read(no_resume), read(resumable))
            assert max(f0, f3) >= 10
            assert isinstance(e0, StreamStalledError) and e0.code() == grpc.StatusCode.UNAVAILABLE, e0
            assert e0.address == rep.address and rep.address in (e0.details() or "")
            assert t0 < 1.0 + MARGIN_S + 2, t0  # the watchdog (1 s, + the first frame's delay at most)
            assert not isinstance(e3, StreamStalledError) and resumable.resumes == 0
            assert e3.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e3
            assert t3 < 1.0 + 3.0 + MARGIN_S + 2, t3  # the watchdog, then resume_timeout
            await no_resume.close()
            await resumable.close()

            c3.placement_timeout = 3.0
            s = c3.session(image=png)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await asyncio.wait_for(s.start(), 30)
            assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
            assert time.monotonic() - t0 < 3.0 + MARGIN_S
    finally:
        thaw_and_stop(rep)


# ---- a frozen owner: resume elsewhere ----------------------------------------------------------------------
async def test_a_session_on_a_frozen_replica_resumes_on_another(redis_server: RedisServer, tmp_path: Path,
                                                              png: bytes) -> None:
    """Two replicas and Redis; the owner of a REALTIME session is frozen (SIGSTOP: connects still succeed,
    nothing answers) mid-speech. The stall watchdog breaks the stream, the resume's CreateSession goes to the
    other replica first, the session moves there and the frames go on, indices continuing."""
    reps = [start_replica(redis_server.url, f"proc-{i}", tmp_path) for i in range(2)]
    try:
        for r in reps:
            await asyncio.to_thread(wait_serving, r)
        pcm = speechlike_pcm(8.0)
        async with AvatarForcingClient([r.address for r in reps]) as c:
            s = c.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG)
            await s.start()
            owner = next(r for r in reps if r.node_id == s.started.node_id)
            sender = asyncio.create_task(s.stream_pcm(
                [pcm[i:i + 320].tobytes() for i in range(0, len(pcm), 320)], realtime=True))
            idx: list[int] = []
            after = 0
            async with asyncio.timeout(60):
                async for ev in s.events():
                    if isinstance(ev, pb.VideoFrame):
                        idx.append(ev.index)
                        if len(idx) == 30:
                            freeze(owner)
                        if s.generation == 1:
                            after += 1
                            if after == 16:
                                break
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await s.close()
        assert s.resumes == 1 and s.started.node_id != owner.node_id and s.address != owner.address
        assert idx == sorted(idx) and len(set(idx)) == len(idx)
    finally:
        for r in reps:
            thaw_and_stop(r)


# ---- avatars the server lost ------------------------------------------------------------------------------
async def test_an_avatar_the_server_lost_is_registered_again(make_app: AppFactory, png: bytes) -> None:
    """A replica that no longer knows a registered avatar (its registry and routing store lost it) refuses the
    stream with NOT_FOUND; the client that registered it registers it again and the session starts. A client
    that did not register it (or keeps no avatars) gets the NOT_FOUND."""
    app = await make_app()  # the in-process router: no store to load the avatar from, no avatar directory

    def forget_all() -> None:
        app.avatars = type(app.avatars)(app.avatars.capacity)  # a fresh, empty registry
    async with AvatarForcingClient(addr(app)) as c:
        avatar = await c.register_avatar(png)
        forget_all()
        async with c.session(avatar_id=avatar, video_encoding=pb.VIDEO_ENCODING_JPEG) as s:
            assert s.started.avatar_id == s.config.avatar_id and len(app.avatars) == 1
            async for ev in s.events():
                if isinstance(ev, pb.VideoFrame):
                    break

        forget_all()
        async with AvatarForcingClient(addr(app)) as other, \
                AvatarForcingClient(addr(app), avatar_cache_size=0) as forgetful:
            await forgetful.register_avatar(png)
            forget_all()
            for client in (other, forgetful):
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await client.session(avatar_id=avatar).start()
                assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "avatar" in (ei.value.details() or "")
                assert time.monotonic() - t0 < client.placement_timeout  # final: not retried
            assert len(app.avatars) == 0


# ---- the routing store unreachable during a resume ---------------------------------------------------------
async def test_resume_waits_out_an_unreachable_routing_store(make_app: AppFactory, redis_server: RedisServer,
                                                             png: bytes) -> None:
    """The session's replica shuts down while Redis is frozen (SIGSTOP: the replicas' Redis calls time out).
    CreateSession(resume) answers UNAVAILABLE while it cannot check the session; the SDK keeps asking until
    Redis is back (well inside resume_timeout) and the session resumes on the other replica."""
    assert redis_server.proc is not None
    apps = [await make_app(redis_url=redis_server.url, node_id=f"node-{i}") for i in range(2)]
    frozen = False
    try:
        async with AvatarForcingClient([addr(a) for a in apps], resume_timeout=20) as c:
            s = c.session(image=png, video_encoding=pb.VIDEO_ENCODING_JPEG)
            await s.start()
            owner = next(a for a in apps if a.node_id == s.started.node_id)
            other = next(a for a in apps if a is not owner)
            thawed_at: list[float] = []

            async def outage() -> None:
                nonlocal frozen
                os.kill(redis_server.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                frozen = True
                await owner.stop(grace=0.2)  # End(SERVER_SHUTDOWN): the SDK resumes
                await asyncio.sleep(2.0)
                os.kill(redis_server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                frozen = False
                thawed_at.append(time.monotonic())

            frames, after, stopper, resumed_at = 0, 0, None, 0.0
            async with asyncio.timeout(40):
                async for ev in s.events():
                    if isinstance(ev, pb.VideoFrame):
                        frames += 1
                        if frames == 8:
                            stopper = asyncio.create_task(outage())
                        if s.generation == 1:
                            after += 1
                            if after == 1:
                                resumed_at = time.monotonic()
                            if after == 8:
                                break
            assert stopper is not None
            await stopper
            await s.close()
        assert s.resumes == 1 and s.address == addr(other) and s.started.node_id == other.node_id
        assert resumed_at > thawed_at[0]  # it could not resume before Redis was back: UNAVAILABLE was retried
    finally:
        if frozen:
            os.kill(redis_server.proc.pid, signal.SIGCONT)


async def test_a_write_after_the_end_raises_session_closed_not_internal(make_app: Callable[..., Any],
                                                                        png: bytes) -> None:
    """grpc's aio client turns a write to a finished call into INTERNAL ("Internal error from Core"), replacing the
    call's real status. The SDK never writes to a session whose End it has read: it raises SessionClosedError, and
    does not try to resume a session that ended for good."""
    app = await make_app()
    async with AvatarForcingClient(addr(app)) as c:
        s = c.session(image=png, pacing=pb.PACING_ASAP)
        await s.start()
        await s.end_of_audio()
        events = [ev async for ev in s.events()]
        assert isinstance(events[-1], pb.End) and events[-1].reason == pb.END_REASON_END_OF_AUDIO
        with pytest.raises(SessionClosedError, match="ended"):
            await s.send_audio(speechlike_pcm(0.02).tobytes())
        assert s.resumes == 0
        await s.close()


async def test_targets_replaced_during_a_call_are_not_indexed_out_of_range(make_app: Callable[..., Any],
                                                                          silent: SilentListener) -> None:
    """A caller that updates ``client.targets`` (replicas replaced) while a placement is trying them: the call goes
    on over the targets it started with (it used to fail with IndexError when the new tuple was shorter)."""
    app = await make_app()
    async with AvatarForcingClient([silent.address, silent.address, addr(app)]) as c:
        call = asyncio.create_task(c.create_session(timeout=0.5))
        await asyncio.sleep(0.2)  # the first attempt is waiting on the silent target
        c.targets = (addr(app),)
        placed = await call
        assert placed.node_id == app.node_id


class HeldCall:
    """A call whose next response is written by whoever calls :meth:`answer` (as a server sharing the loop
    would write once the loop runs again)."""

    def __init__(self) -> None:
        self.reads: list[asyncio.Future[str]] = []

    def read(self) -> asyncio.Future[str]:
        self.reads.append(asyncio.get_running_loop().create_future())
        return self.reads[-1]

    def answer(self, msg: str) -> None:
        self.reads[-1].set_result(msg)


async def test_a_stall_of_the_clients_own_event_loop_is_not_a_stalled_stream() -> None:
    """The client's own event loop stands still past the watchdog's limit (a busy agent in the same process, a
    starved machine); what the stream delivers right after it runs again is read, not taken for a stall."""
    loop = asyncio.get_running_loop()
    call = HeldCall()

    def stand_still() -> None:
        time.sleep(0.6)  # past the limit below, with the loop (and the watchdog's timer) blocked
        loop.call_soon(call.answer, "frame")

    loop.call_later(0.05, stand_still)
    assert await read_within(call, 0.3) == ("frame", False)
    # A stream that stays silent while the loop runs is stalled, and its read is cancelled.
    t0 = time.monotonic()
    assert await read_within(call, 0.3) == (None, True)
    assert time.monotonic() - t0 < 0.3 + MARGIN_S
    await asyncio.sleep(0)
    assert call.reads[-1].cancelled()
