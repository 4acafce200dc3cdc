"""Unit tests of the Python SDK (clients/python/avatarforcing_client); all but the last one need no server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator, Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import avatarforcing_client as afc
from avatarforcing_client import (
    AvatarForcingClient,
    Mp4Writer,
    SyncClient,
    decode_video_frames,
    pb,
    pb_grpc,
    pcm_chunks,
    read_wav,
    record_session,
    write_wav,
)

av = pytest.importorskip("av")

W, H, FPS = 64, 48, 25


def _frames(n: int) -> np.ndarray:
    """Smooth, distinct synthetic RGB frames (compress well, decode close to the original)."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 3 + i * 9) % 256
        out[i, ..., 1] = (yy * 4 + i * 5) % 256
        out[i, ..., 2] = (40 + i * 11) % 256
    return out


def _h264_annexb(frames: np.ndarray) -> list[bytes]:
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = W, H, "yuv420p"
    cc.time_base = Fraction(1, FPS)
    cc.framerate = FPS
    cc.options = {"bf": "0", "tune": "zerolatency", "preset": "ultrafast", "qp": "10"}
    aus: list[bytes] = []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        aus += [bytes(p) for p in cc.encode(vf)]
    aus += [bytes(p) for p in cc.encode(None)]
    return aus


def _close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) < tol


# -- package ---------------------------------------------------------------------------------------


def test_package_is_light() -> None:
    """Importing the SDK pulls in neither PyAV, Pillow nor the server packages."""
    assert afc.pb is pb and afc.pb_grpc.AvatarForcingStub
    code = (
        "import sys, avatarforcing_client; "
        "bad = [m for m in ('av', 'PIL', 'avatarforcing', 'avatarforcing_service') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- audio -----------------------------------------------------------------------------------------


def test_wav_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-32768, 32767, size=4321, dtype=np.int16)
    p = tmp_path / "a.wav"
    write_wav(p, x, 24000)
    y, rate = read_wav(p)
    assert rate == 24000 and y.dtype == np.int16
    np.testing.assert_array_equal(x, y)


def _write_raw_wav(path: Path, channels: int, width: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(b"\x01" * (channels * width * 100))


def test_read_wav_mixes_stereo_down(tmp_path: Path) -> None:
    # The Go SDK's DecodeWAV gives the same samples for the same frames (TestDecodeWAVStereoIsMixedDown).
    frames = np.array([[100, 200], [-3, -2], [1, 2], [32767, 32767], [-32768, -32768], [-32768, 32767]], np.int16)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(frames.astype("<i2").tobytes())
    y, rate = read_wav(tmp_path / "stereo.wav")
    assert rate == 44100 and y.dtype == np.int16
    assert y.tolist() == [150, -3, 2, 32767, -32768, -1]


def test_read_wav_errors(tmp_path: Path) -> None:
    _write_raw_wav(tmp_path / "u8.wav", 1, 1)
    with pytest.raises(ValueError, match="16-bit"):
        read_wav(tmp_path / "u8.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="WAV"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError):
        read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="int16"):
        write_wav(tmp_path / "f.wav", np.zeros(10, dtype=np.float32), 16000)


def test_pcm_chunks_sizes() -> None:
    x = np.arange(1000, dtype=np.int16)
    chunks = list(pcm_chunks(x, 16000, 20))
    assert [len(c) for c in chunks] == [640, 640, 640, 80]
    assert b"".join(chunks) == x.astype("<i2").tobytes()
    assert [len(c) for c in pcm_chunks(np.zeros(480, np.int16), 48000, 5)] == [480, 480]
    assert list(pcm_chunks(np.zeros(0, np.int16), 16000)) == []
    with pytest.raises(ValueError):
        list(pcm_chunks(np.zeros((2, 10), np.int16), 16000))


# -- client (no server) ----------------------------------------------------------------------------


def test_session_needs_exactly_one_reference() -> None:
    client = AvatarForcingClient("127.0.0.1:1")
    with pytest.raises(ValueError, match="exactly one"):
        client.session(image=b"png", avatar_id="abc")
    with pytest.raises(ValueError, match="exactly one"):
        client.session()
    with pytest.raises(ValueError):
        client.session(image=b"")
    assert client._channel is None  # nothing was connected


async def test_session_config_and_client_side_validation(tmp_path: Path) -> None:
    async with AvatarForcingClient("127.0.0.1:1") as client:
        s = client.session(
            avatar_id="av1", sample_rate=24000, video_encoding=pb.VIDEO_ENCODING_JPEG, seed=7, jpeg_quality=90
        )
        cfg = s.config
        assert cfg.WhichOneof("reference") == "avatar_id" and cfg.avatar_id == "av1"
        assert cfg.audio_format.sample_rate_hz == 24000 and cfg.audio_format.channels == 1
        assert cfg.audio_format.encoding == pb.AUDIO_ENCODING_PCM16LE
        assert cfg.video_encoding == pb.VIDEO_ENCODING_JPEG and cfg.seed == 7 and cfg.jpeg_quality == 90
        assert cfg.pacing == pb.PACING_REALTIME
        with pytest.raises(ValueError, match="even"):
            await s.send_audio(b"\x00\x01\x02")
        write_wav(tmp_path / "16k.wav", np.zeros(160, np.int16), 16000)
        with pytest.raises(ValueError, match="sample_rate=24000"):
            await s.stream_wav(tmp_path / "16k.wav")
        with pytest.raises(RuntimeError):
            _ = s.started
        await s.close()
        await s.close()  # idempotent


async def test_stream_pcm_paces_and_rejoins_odd_chunks() -> None:
    client = AvatarForcingClient("127.0.0.1:1")
    s = client.session(image=b"png", sample_rate=16000)
    sent: list[tuple[float, bytes]] = []
    ended: list[bool] = []

    async def fake_send(pcm: bytes) -> None:
        sent.append((time.monotonic(), pcm))

    async def fake_end() -> None:
        ended.append(True)

    s.send_audio = fake_send  # type: ignore[method-assign]
    s.end_of_audio = fake_end  # type: ignore[method-assign]
    chunk = b"\x00\x00" * 320  # 20 ms
    n = await s.stream_pcm([chunk] * 6, realtime=True)
    assert n == 6 * 320 and ended == [True]
    # Chunk k may not go out before k * 20 ms after the first one.
    t0 = sent[0][0]
    for k, (t, _) in enumerate(sent):
        assert t - t0 >= k * 0.020 - 0.002

    async def odd_chunks():  # type: ignore[no-untyped-def]
        for c in (b"\x01", b"\x02\x03", b"\x04"):
            yield c

    sent.clear()
    assert await s.stream_pcm(odd_chunks(), realtime=False, end=False) == 2
    assert b"".join(p for _, p in sent) == b"\x01\x02\x03\x04" and ended == [True]
    with pytest.raises(ValueError, match="dangling"):
        await s.stream_pcm([b"\x01\x02\x03"], realtime=False)


class _QuietServer(pb_grpc.AvatarForcingServicer):
    """A server without routing (``CreateSession`` answers UNIMPLEMENTED, as the generated servicer does) whose
    Stream answers the config with SessionStarted, then records what the client writes, with the time it
    arrived, until :attr:`end_stream` is set (the stream then ends with OK)."""

    def __init__(self, idle_timeout_ms: float) -> None:
        self.started = pb.SessionStarted(session_id="stub", fps=25, width=8, height=8, idle_timeout_ms=idle_timeout_ms)
        self.writes: list[tuple[float, str]] = []
        self.half_closed = False
        self.end_stream = asyncio.Event()

    async def Stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        await context.read()  # the config
        await context.write(pb.StreamResponse(started=self.started))
        reader = asyncio.create_task(self._record(context))
        try:
            await self.end_stream.wait()
        finally:
            reader.cancel()

    async def _record(self, context: grpc.aio.ServicerContext) -> None:
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                self.half_closed = True
                return
            self.writes.append((time.monotonic(), str(req.WhichOneof("message"))))

    def keepalives(self, since: float = 0.0) -> list[float]:
        return [t for t, kind in self.writes if kind == "keep_alive" and t >= since]


@contextlib.asynccontextmanager
async def _quiet_server(idle_timeout_ms: float) -> AsyncIterator[tuple[AvatarForcingClient, _QuietServer]]:
    """A :class:`_QuietServer` on a loopback port, and a client of it."""
    servicer = _QuietServer(idle_timeout_ms)
    server = grpc.aio.server()
    pb_grpc.add_AvatarForcingServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AvatarForcingClient(f"127.0.0.1:{port}") as client:
            yield client, servicer
    finally:
        await server.stop(None)


def _keepalive_tasks() -> list[asyncio.Task[Any]]:
    """The SDK's automatic KeepAlive tasks still running (they are named after the session)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("avatarforcing-keepalive-") and not t.done()]


async def test_session_sends_keepalive_when_quiet_for_a_third_of_the_idle_timeout() -> None:
    async with _quiet_server(450) as (client, server):  # a KeepAlive after 150 ms without a write
        s = client.session(avatar_id="a")
        await s.start()
        assert s.keepalive_interval == pytest.approx(0.15)
        t0 = time.monotonic()
        await asyncio.sleep(0.7)
        ka = server.keepalives()
        assert 3 <= len(ka) <= 5, [round(t - t0, 3) for t in ka]
        assert ka[0] - t0 >= 0.14 and all(b - a >= 0.14 for a, b in zip(ka, ka[1:], strict=False))
        # Other messages count as activity: none is needed while audio flows every 50 ms.
        t1 = time.monotonic()
        for _ in range(12):
            await s.send_audio(b"\x00\x00" * 160)
            await asyncio.sleep(0.05)
        assert not server.keepalives(t1 + 0.01), "no KeepAlive while audio is being sent"
        await asyncio.sleep(0.25)
        assert server.keepalives(t1), "and one again once it stops"
        # It stops with the session.
        await s.close()
        assert _keepalive_tasks() == []
        n = len(server.writes)
        await asyncio.sleep(0.35)
        assert len(server.writes) == n and server.half_closed


async def test_keepalive_stops_when_the_stream_finishes_and_can_be_turned_off() -> None:
    async with _quiet_server(300) as (client, server):
        s = client.session(avatar_id="a")
        await s.start()
        (task,) = _keepalive_tasks()
        server.end_stream.set()  # the server ended the stream; nobody reads events()
        await asyncio.wait_for(task, 1.0)
        n = len(server.writes)
        await asyncio.sleep(0.25)
        assert len(server.writes) == n
        await s.close()

    async with _quiet_server(300) as (client, server):
        s = client.session(avatar_id="a", auto_keepalive=False)
        await s.start()
        assert s.keepalive_interval is None and _keepalive_tasks() == []
        await asyncio.sleep(0.35)
        assert server.keepalives() == []
        await s.close()

    async with _quiet_server(0) as (client, server):  # a server that announces no idle timeout
        s = client.session(avatar_id="a")
        await s.start()
        assert s.keepalive_interval is None and _keepalive_tasks() == []
        await s.close()


def test_sync_client_reports_unavailable_server() -> None:
    with SyncClient("127.0.0.1:1") as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.server_info(timeout=5)
        assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- decoding --------------------------------------------------------------------------------------


def test_decode_raw() -> None:
    frames = _frames(3)
    out = decode_video_frames(pb.VIDEO_ENCODING_RAW_RGB24, [f.tobytes() for f in frames], W, H)
    assert out.shape == (3, H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, frames)
    with pytest.raises(ValueError, match="bytes"):
        decode_video_frames(pb.VIDEO_ENCODING_RAW_RGB24, [b"\x00" * 10], W, H)
    assert decode_video_frames(pb.VIDEO_ENCODING_H264, [], W, H).shape == (0, H, W, 3)


def test_decode_h264_annexb() -> None:
    frames = _frames(8)
    aus = _h264_annexb(frames)
    assert len(aus) == 8 and aus[0].startswith(b"\x00\x00\x00\x01")
    out = decode_video_frames(pb.VIDEO_ENCODING_H264, aus, W, H)
    assert out.shape == (8, H, W, 3)
    for a, b in zip(out, frames, strict=True):
        assert _close(a, b, 6.0)


def test_decode_jpeg() -> None:
    from PIL import Image

    frames = _frames(3)
    datas = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95)
        datas.append(buf.getvalue())
    out = decode_video_frames(pb.VIDEO_ENCODING_JPEG, datas, W, H)
    assert out.shape == (3, H, W, 3)
    for a, b in zip(out, frames, strict=True):
        assert _close(a, b, 6.0)


def test_decode_fmp4() -> None:
    frames = _frames(5)
    buf = io.BytesIO()
    movflags = {"movflags": "frag_every_frame+empty_moov+default_base_moof"}
    with av.open(buf, "w", format="mp4", options=movflags) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"bf": "0", "preset": "ultrafast", "qp": "10"}
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    data, boxes, off = buf.getvalue(), [], 0
    while off < len(data):
        size, kind = struct.unpack(">I4s", data[off : off + 8])
        boxes.append((kind, data[off : off + size]))
        off += size
    init = b"".join(b for k, b in boxes if k in (b"ftyp", b"moov"))
    frags = [boxes[i][1] + boxes[i + 1][1] for i in range(len(boxes) - 1) if boxes[i][0] == b"moof"]
    assert len(frags) == 5
    out = decode_video_frames(pb.VIDEO_ENCODING_FMP4, frags, W, H, init_segment=init)
    assert out.shape == (5, H, W, 3)
    assert _close(out[4], frames[4], 6.0)


# -- recording -------------------------------------------------------------------------------------


def _read_back(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac" and a.codec_context.sample_rate == 16000
        n_video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        n_audio = sum(f.samples for f in c.decode(audio=0))
    return n_video, n_audio / 16000


def _synthetic_events(n_frames: int, rate: int = 16000) -> list[pb.VideoFrame | pb.AudioOut]:
    frames = _frames(n_frames)
    per_frame = rate // FPS
    events: list[pb.VideoFrame | pb.AudioOut] = []
    tone = (np.sin(np.arange(per_frame * 4) * 0.07) * 6000).astype("<i2")
    for i, f in enumerate(frames):
        if i % 4 == 0 and i // 4 != 2:  # block 2 has no AudioOut: silence there
            events.append(pb.AudioOut(block_index=i // 4, start_sample=i * per_frame, data=tone.tobytes()))
        events.append(
            pb.VideoFrame(
                index=i,
                pts_us=i * 1_000_000 // FPS,
                audio_start_sample=i * per_frame,
                audio_end_sample=(i + 1) * per_frame,
                data=f.tobytes(),
                keyframe=True,
                block_index=i // 4,
            )
        )
    return events


def test_mp4_writer_raw(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with Mp4Writer(out, FPS, W, H, 16000, encoding=pb.VIDEO_ENCODING_RAW_RGB24) as w:
        for ev in _synthetic_events(40):
            w.add_event(ev)
        w.add_event(pb.Stats(frames_sent=40))  # ignored
    assert w.frames_written == 40 and w.audio_samples == 9 * 4 * 640
    n_video, audio_s = _read_back(out)
    assert n_video == 40
    assert abs(audio_s - 40 / FPS) < 0.15


def test_mp4_writer_h264_input(tmp_path: Path) -> None:
    aus = _h264_annexb(_frames(10))
    out = tmp_path / "h264.mp4"
    w = Mp4Writer(out, FPS, W, H, 16000, encoding=pb.VIDEO_ENCODING_H264)
    for i, au in enumerate(aus):
        w.add_event(pb.VideoFrame(index=i, data=au))
    w.add_event(pb.AudioOut(start_sample=0, data=b"\x00\x10" * 6400))
    w.close()
    w.close()  # idempotent
    n_video, audio_s = _read_back(out)
    assert n_video == 10 and abs(audio_s - 0.4) < 0.15


def test_mp4_writer_creates_its_folders_or_names_the_path(tmp_path: Path) -> None:
    out = tmp_path / "not" / "yet" / "there.mp4"
    with Mp4Writer(out, FPS, W, H, 16000) as w:
        for ev in _synthetic_events(8):
            w.add_event(ev)
    assert _read_back(out)[0] == 8
    (tmp_path / "a-file").write_text("")
    blocked = tmp_path / "a-file" / "sub" / "x.mp4"
    with pytest.raises(OSError, match=f"cannot create the folder for {blocked}: Not a directory"):
        Mp4Writer(blocked, FPS, W, H, 16000)


def test_mp4_writer_audio_at_a_rate_aac_does_not_take(tmp_path: Path) -> None:
    # 8,025 Hz (a rate the server takes at 25 fps) is no AAC rate: written at 11,025 Hz, same duration.
    out = tmp_path / "8025.mp4"
    t = np.arange(8025) / 8025
    with Mp4Writer(out, FPS, W, H, 8025) as w:
        for i in range(25):
            w.add_rgb(np.zeros((H, W, 3), np.uint8), i)
        w.add_audio((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16), 0)
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.sample_rate == 11025
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert abs(pcm.shape[0] / 11025 - 1.0) < 0.1
    spectrum = np.abs(np.fft.rfft(pcm[2048:2048 + 8192]))
    assert abs(np.argmax(spectrum) * 11025 / 8192 - 440) < 5  # the tone kept its pitch


class _FakeSession:
    """Just what record_session uses: started, sample_rate, video_encoding and events()."""

    def __init__(self, events: list) -> None:  # type: ignore[type-arg]
        self.started = pb.SessionStarted(
            session_id="s1",
            fps=FPS,
            width=W,
            height=H,
            video_encoding=pb.VIDEO_ENCODING_RAW_RGB24,
            audio_sample_rate_hz=16000,
        )
        self.sample_rate = 16000
        self.video_encoding = pb.VIDEO_ENCODING_RAW_RGB24
        self._events = events

    async def events(self):  # type: ignore[no-untyped-def]
        for ev in self._events:
            await asyncio.sleep(0)
            yield ev


async def test_record_session(tmp_path: Path) -> None:
    evs = [*_synthetic_events(12), pb.Stats(frames_sent=12), pb.End(reason=pb.END_REASON_END_OF_AUDIO)]
    stats = await record_session(_FakeSession(evs), tmp_path / "rec.mp4")  # type: ignore[arg-type]
    assert stats.frames == 12 and stats.audio_samples == 2 * 4 * 640
    assert stats.end_reason == pb.END_REASON_END_OF_AUDIO
    assert stats.end_reason_name == "END_REASON_END_OF_AUDIO"
    assert stats.last_stats is not None and stats.last_stats.frames_sent == 12
    assert _read_back(tmp_path / "rec.mp4")[0] == 12

    stats = await record_session(
        _FakeSession(_synthetic_events(12)), tmp_path / "cut.mp4", max_frames=5  # type: ignore[arg-type]
    )
    assert stats.frames == 5 and stats.end_reason == pb.END_REASON_UNSPECIFIED


# -- automatic KeepAlive against a real server -----------------------------------------------------


async def test_listen_only_session_outlives_the_idle_timeout(make_app: Callable[..., Any], png: bytes) -> None:
    """A REALTIME session that sends nothing after its config stays up past 2 s with idle_timeout_s=0.6
    (the SDK sends KeepAlive), and ends with END_REASON_IDLE_TIMEOUT with auto_keepalive=False."""
    app = await make_app(idle_timeout_s=0.6)
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client:
        async with client.session(image=png, video_encoding=pb.VIDEO_ENCODING_RAW_RGB24) as s:
            assert s.started.idle_timeout_ms == 600 and s.keepalive_interval == pytest.approx(0.2)
            frames, t0 = 0, time.monotonic()
            async for ev in s.events():
                assert not isinstance(ev, pb.End), ev
                frames += isinstance(ev, pb.VideoFrame)
                if time.monotonic() - t0 > 2.2:
                    break
            assert frames >= 30, frames
        async with client.session(image=png, video_encoding=pb.VIDEO_ENCODING_RAW_RGB24, auto_keepalive=False) as s:
            assert s.keepalive_interval is None
            t0 = time.monotonic()
            async with asyncio.timeout(5):
                events = [ev async for ev in s.events()]
            assert isinstance(events[-1], pb.End) and events[-1].reason == pb.END_REASON_IDLE_TIMEOUT
            assert 0.5 < time.monotonic() - t0 < 2.0


# -- many targets: unary calls try them in turn ----------------------------------------------------


def _dead_address() -> str:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_unary_calls_try_the_targets_in_turn(make_app: Callable[..., Any], png: bytes) -> None:
    """With the first target down, server_info, register_avatar and create_session are answered by the
    second (as the client's docstring says); an answer other than UNAVAILABLE is raised at once; with every
    target down the last UNAVAILABLE is raised."""
    app = await make_app()
    live, dead = f"127.0.0.1:{app.port}", _dead_address()
    async with AvatarForcingClient([dead, live]) as client:
        info = await client.server_info(timeout=5)
        assert info.node_id == app.node_id and client._front == 1
        client._front = 0  # each call starts at the dead target again
        avatar = await client.register_avatar(png, timeout=5)
        assert avatar.startswith("av_")
        client._front = 0
        placed = await client.create_session(timeout=5)
        assert placed.node_id == app.node_id and placed.address == live
        async with client.session(avatar_id=avatar, video_encoding=pb.VIDEO_ENCODING_JPEG) as s:
            assert s.started.avatar_id == avatar
    # The live target's own answer (not UNAVAILABLE) is final: the dead one is not tried after it.
    async with AvatarForcingClient([live, dead]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await client.register_avatar(b"not an image", timeout=5)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with AvatarForcingClient([dead, _dead_address()]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await client.server_info(timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
