"""Malformed protobuf on the wire: every RPC answers with a deliberate status (INVALID_ARGUMENT for bytes that
do not parse), never UNKNOWN or INTERNAL, logs no traceback, and disturbs no other session.

Raw bytes go out through channels with pass-through serializers: seeded random bytes, truncated and bit-flipped
valid messages, wrong and invalid wire types, huge length prefixes, bad UTF-8 in strings, deeply nested groups.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from avatarforcing_client import pb, pb_grpc
from avatarforcing_service.server import App

from .conftest import speechlike_pcm

AppFactory = Callable[..., "asyncio.Future[App]"]
SERVICE = "/avatarforcing.v1.AvatarForcing/"
SEED = 20250611
UNARY: dict[str, type[Message]] = {"GetServerInfo": pb.GetServerInfoRequest, "RegisterAvatar": pb.RegisterAvatarRequest,
                                   "CreateSession": pb.CreateSessionRequest, "Drain": pb.DrainRequest}
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
ACCEPTED = "accepted"  # a stream that took the input and went on (the test then cancels it)
TOKEN = "fuzz-tenant-token-0123456789"


# ---- inputs ------------------------------------------------------------------------------------------
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def parses(cls: type[Message], data: bytes) -> bool:
    try:
        cls.FromString(data)
    except Exception:
        return False
    return True


def fuzz_inputs(rng: random.Random, cls: type[Message], valid: list[bytes], n: int) -> list[tuple[str, bytes]]:
    """``n`` seeded inputs of every kind, each a (kind, bytes) pair."""
    fields = list(cls.DESCRIPTOR.fields)
    numbers = [f.number for f in fields] or [1]
    strings = [f.number for f in fields if f.type == FieldDescriptor.TYPE_STRING]
    messages = [f.number for f in fields if f.type == FieldDescriptor.TYPE_MESSAGE]
    out: list[tuple[str, bytes]] = []
    kinds = ["random", "truncated", "flipped", "wire_type", "huge_length", "bad_utf8", "nested", "random_long"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        v = rng.choice(valid)
        if kind == "random":
            data = rng.randbytes(rng.randint(1, 48))
        elif kind == "random_long":
            data = rng.randbytes(rng.randint(200, 3000))
        elif kind == "truncated":
            data = v[: rng.randint(0, max(0, len(v) - 1))] if len(v) > 1 else rng.randbytes(3)
        elif kind == "flipped":
            b = bytearray(v or b"\0")
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            data = bytes(b)
        elif kind == "wire_type":  # a declared field with another (or a nonexistent) wire type, then junk
            wt = rng.choice([0, 1, 2, 3, 4, 5, 6, 7])
            data = tag(rng.choice(numbers), wt) + rng.randbytes(rng.randint(0, 12))
            if rng.random() < 0.5:
                data = v + data
        elif kind == "huge_length":
            size = rng.choice([2**31 - 1, 2**32 + 5, 2**63 - 1, 1 << 62, 10**9, 65 << 20])
            data = v + tag(rng.choice(messages or numbers), 2) + varint(size) + rng.randbytes(rng.randint(0, 8))
        elif kind == "bad_utf8":
            if strings:
                bad = rng.choice([b"\xff\xfe", b"\xc3\x28", b"ok\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
                data = v + tag(rng.choice(strings), 2) + varint(len(bad)) + bad
            else:
                data = v + b"\x80" * rng.randint(1, 11)  # an unterminated varint tag
        else:  # nested: unknown groups (or messages) nested past any parser's depth limit
            depth = rng.choice([50, 120, 400, 2000])
            if messages and rng.random() < 0.5:
                f = rng.choice(messages)
                inner = b""
                for _ in range(min(depth, 200)):
                    inner = tag(f, 2) + varint(len(inner)) + inner
                data = inner
            else:
                data = tag(900, 3) * depth + tag(900, 4) * rng.choice([0, depth])
        out.append((kind, data))
    return out


def valid_unary(png: bytes) -> dict[str, list[bytes]]:
    return {
        "GetServerInfo": [b""],
        "RegisterAvatar": [pb.RegisterAvatarRequest(image=png, name="fuzz").SerializeToString(),
                           pb.RegisterAvatarRequest(image=png[:64], name="zz").SerializeToString()],
        "CreateSession": [b"", pb.CreateSessionRequest(resume_session_id="s_abc", session_token="t_def")
                          .SerializeToString()],
        "Drain": [pb.DrainRequest(deadline_s=3.5).SerializeToString()],
    }


def config(png: bytes, **kw: object) -> pb.StreamRequest:
    return pb.StreamRequest(config=pb.SessionConfig(
        reference_image=png, audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=16000,
                                                         channels=1),
        video_encoding=pb.VIDEO_ENCODING_RAW_RGB24, pacing=pb.PACING_ASAP, **kw))  # type: ignore[arg-type]


def valid_stream_messages(png: bytes) -> list[bytes]:
    pcm = speechlike_pcm(0.02).tobytes()
    return [pb.StreamRequest(audio=pb.AudioChunk(data=pcm)).SerializeToString(),
            pb.StreamRequest(keep_alive=pb.KeepAlive()).SerializeToString(),
            pb.StreamRequest(end_of_audio=pb.EndOfAudio()).SerializeToString(),
            pb.StreamRequest(interrupt=pb.Interrupt()).SerializeToString(),
            config(png[:40]).SerializeToString()]


# ---- calls -------------------------------------------------------------------------------------------
@dataclass
class Tally:
    cases: int = 0
    faults: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, kind: str, data: bytes, code: grpc.StatusCode | str, details: str) -> None:
        self.cases += 1
        name = code if isinstance(code, str) else code.name
        self.codes[name] = self.codes.get(name, 0) + 1
        if code in BAD:
            self.faults.append(f"{what} [{kind}, {len(data)} bytes {data[:24].hex()}]: {name} {details!r}")

    def summary(self) -> str:
        lines = [f"{len(self.faults)} faults in {self.cases} cases; statuses {self.codes}", *self.faults[:15]]
        return "\n".join(lines)


async def unary(ch: grpc.aio.Channel, method: str, data: bytes,
                metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str]:
    call = ch.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        await call(data, timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def other_service(ch: grpc.aio.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode | str, str]:
    """The health and reflection services, which the server also guards: one raw request, the first answer."""
    try:
        if method.endswith("/Check"):
            await ch.unary_unary(method, request_serializer=None, response_deserializer=None)(data, timeout=30)
        elif method.endswith("/Watch"):
            call = ch.unary_stream(method, request_serializer=None, response_deserializer=None)(data, timeout=30)
            await call.read()
            call.cancel()
        else:
            hold = asyncio.Event()

            async def reqs() -> AsyncIterator[bytes]:
                yield data
                await hold.wait()

            call = ch.stream_stream(method, request_serializer=None, response_deserializer=None)(reqs(), timeout=30)
            try:
                await call.read()
            finally:
                hold.set()
                call.cancel()
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def stream(ch: grpc.aio.Channel, msgs: list[bytes], settle: float) -> tuple[grpc.StatusCode | str, str]:
    """Sends ``msgs`` then keeps the request side open writing nothing (a write racing the server's status makes
    grpc's aio client replace that status with its own INTERNAL). ``settle``: how long to wait for a status
    after the last message before calling the input accepted and cancelling."""
    hold = asyncio.Event()

    async def reqs() -> AsyncIterator[bytes]:
        for m in msgs:
            yield m
        await hold.wait()

    call = ch.stream_stream(SERVICE + "Stream", request_serializer=None, response_deserializer=None)(reqs())
    try:
        async with asyncio.timeout(settle):
            async for _ in call:
                pass
        return grpc.StatusCode.OK, ""
    except TimeoutError:
        call.cancel()
        return ACCEPTED, ""
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    finally:
        hold.set()


# ---- the good session --------------------------------------------------------------------------------
async def good_session(app: App, png: bytes, done: asyncio.Event) -> tuple[int, int, list[pb.StreamResponse]]:
    """Streams 40-ms chunks at real-time pace until ``done`` (at least 1 s), then EndOfAudio."""
    pcm = speechlike_pcm(2.0)
    chunk = 640  # 40 ms at 16 kHz
    sent = 0

    async def reqs() -> AsyncIterator[pb.StreamRequest]:
        nonlocal sent
        yield config(png)
        t0 = time.monotonic()
        i = 0
        while not done.is_set() or sent < 16000:
            part = pcm[(i * chunk) % len(pcm):][:chunk]
            i += 1
            sent += len(part)
            yield pb.StreamRequest(audio=pb.AudioChunk(data=part.tobytes()))
            await asyncio.sleep(max(0.0, t0 + i * 0.04 - time.monotonic()))
            if time.monotonic() - t0 > 120:
                break
        yield pb.StreamRequest(end_of_audio=pb.EndOfAudio())

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        resps = [r async for r in pb_grpc.AvatarForcingStub(ch).Stream(reqs())]
    frames = sum(r.HasField("frame") for r in resps)
    return sent, frames, resps


# ---- the tests ---------------------------------------------------------------------------------------
async def test_fuzzed_requests_never_fault(make_app: AppFactory, png: bytes, caplog: pytest.LogCaptureFixture,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.WARNING)
    # Short reservations: CreateSession inputs that parse reserve a slot each.
    app = await make_app(max_sessions=6, reservation_ttl_s=1.0, config_timeout_s=20.0)
    rng = random.Random(SEED)
    tally = Tally()
    done = asyncio.Event()
    good = asyncio.create_task(good_session(app, png, done))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            # Stream, first message fuzzed.
            for kind, data in fuzz_inputs(rng, pb.StreamRequest, valid_stream_messages(png), 80):
                ok = parses(pb.StreamRequest, data)
                code, details = await stream(ch, [data], 1.0 if ok else 20.0)
                tally.add("Stream first", kind, data, code, details)
            # Stream, a valid SessionConfig (a session opens) then a fuzzed message.
            first = config(png).SerializeToString()
            for kind, data in fuzz_inputs(rng, pb.StreamRequest, valid_stream_messages(png), 48):
                ok = parses(pb.StreamRequest, data)
                code, details = await stream(ch, [first, data], 0.4 if ok else 20.0)
                tally.add("Stream mid", kind, data, code, details)
            # Unary RPCs. Drain only with bytes that do not parse (one that parses drains this replica).
            valid = valid_unary(png)
            for method in ("GetServerInfo", "RegisterAvatar", "Drain", "CreateSession"):
                for kind, data in fuzz_inputs(rng, UNARY[method], valid[method], 64):
                    if method == "Drain" and parses(pb.DrainRequest, data):
                        continue
                    code, details = await unary(ch, method, data)
                    tally.add(method, kind, data, code, details)
            # Health and reflection.
            check = health_pb2.HealthCheckRequest(service="").SerializeToString()
            refl = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
            for method, cls, ok in (("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, check),
                                    ("/grpc.health.v1.Health/Watch", health_pb2.HealthCheckRequest, check),
                                    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     reflection_pb2.ServerReflectionRequest, refl)):
                for kind, data in fuzz_inputs(rng, cls, [ok], 16):
                    code, details = await other_service(ch, method, data)
                    tally.add(method, kind, data, code, details)
    finally:
        done.set()
        sent, frames, resps = await asyncio.wait_for(good, 120)
    print(tally.summary())
    assert not tally.faults, tally.summary()
    assert tally.cases >= 350, tally.summary()
    assert tally.codes.get("INVALID_ARGUMENT", 0) >= 250, tally.summary()
    # The well-formed session, streaming all along, finished whole.
    assert resps[0].HasField("started") and resps[-1].end.reason == pb.END_REASON_END_OF_AUDIO
    expected = -(-sent // 640)
    expected = -(-expected // 4) * 4
    assert frames == expected, (frames, sent)
    idx = [r.frame.index for r in resps if r.HasField("frame")]
    assert idx == list(range(frames))
    # No traceback anywhere in the server's logs (grpc's stdlib logging, structlog's stdout).
    out, err = capfd.readouterr()
    assert "Traceback" not in caplog.text and "Traceback" not in out + err, (caplog.text + out + err)[-3000:]
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("method", ["Stream", *UNARY])
async def test_bad_bytes_answer_invalid_argument_naming_the_message(make_app: AppFactory, method: str) -> None:
    app = await make_app()
    junk = tag(3, 2) + varint(2**31 - 1) + b"abc"  # a length prefix far past the end
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        if method == "Stream":
            code, details = await stream(ch, [junk], 20.0)
            name = "StreamRequest"
        else:
            code, details = await unary(ch, method, junk)
            name = UNARY[method].DESCRIPTOR.name
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert f"request is not a valid avatarforcing.v1.{name} protobuf message (" in details, details
    assert "2147483647" in details, details  # says what is wrong


async def test_bad_bytes_mid_stream_end_only_that_stream(make_app: AppFactory, png: bytes) -> None:
    app = await make_app()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        code, details = await stream(ch, [config(png).SerializeToString(), b"\x0a\xff\xff\xff\xff\x07abc"], 20.0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "not a valid avatarforcing.v1.StreamRequest protobuf message" in details
    t = time.monotonic() + 5
    while app.engine.free_slots != app.engine.capacity:
        assert time.monotonic() < t, "slot not freed"
        await asyncio.sleep(0.02)


async def test_auth_runs_before_parsing(make_app: AppFactory) -> None:
    """With auth on, bad bytes with a token are INVALID_ARGUMENT; without one UNAUTHENTICATED (nothing parsed).
    The valid-token calls go first: failed authentications may lock the address out."""
    app = await make_app(auth_tokens=f"fuzz:{TOKEN}")
    junk = b"\xff\xff\xff"
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        for method in UNARY:
            code, details = await unary(ch, method, junk, bearer)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
            assert "not a valid avatarforcing.v1." in details, details
        code, _ = await unary(ch, "RegisterAvatar", junk)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, details = await stream(ch, [junk], 20.0)
        assert code == grpc.StatusCode.UNAUTHENTICATED, details


def test_input_kinds_cover_parse_failures() -> None:
    """The generator makes inputs that do not parse, and some that do, for every request type."""
    rng = random.Random(SEED)
    for cls, valid in [(pb.StreamRequest, valid_stream_messages(b"\x89PNG" * 30)),
                       *((UNARY[m], v) for m, v in valid_unary(b"\x89PNG" * 30).items())]:
        inputs = fuzz_inputs(rng, cls, valid, 64)
        bad = sum(not parses(cls, d) for _, d in inputs)
        assert 32 <= bad < len(inputs), (cls, bad)
    assert varint(300) == b"\xac\x02" and tag(1, 2) == b"\x0a"
