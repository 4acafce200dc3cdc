"""The LiveKit Agents avatar adapter (avatarforcing_client.livekit) against a real server.

The generator is driven with livekit's own classes (rtc.AudioFrame, AudioSegmentEnd, the
VideoGenerator contract). The real-room test also runs livekit-server (a binary: set
LIVEKIT_SERVER_BIN or put livekit-server on PATH; `go install
github.com/livekit/livekit-server/cmd/server@v1.9.11` builds one, named `server`), with the
AvatarRunner, DataStreamAudioReceiver and DataStreamAudioOutput of livekit-agents.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed (pip install '.[dev]')")

from livekit import api, rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioOutput, VideoGenerator  # noqa: E402

from avatarforcing_client import AvatarForcingClient, pb, write_wav  # noqa: E402
from avatarforcing_client.livekit import AvatarForcingVideoGenerator  # noqa: E402
from avatarforcing_service.server import App  # noqa: E402

from .conftest import png_bytes, speechlike_pcm  # noqa: E402

AppFactory = Callable[..., "asyncio.Future[App]"]
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "clients" / "python" / "README.md"
BLOCK = 2560  # samples per 160 ms block at 16 kHz (tiny model: 4 frames at 25 fps)


def agent_frames(pcm: np.ndarray, rate: int, channels: int = 1, ms: int = 20) -> list[rtc.AudioFrame]:
    """``pcm``: int16 [n] or [n, channels]; cut into the 20 ms frames an agent pushes."""
    x = pcm.reshape(len(pcm), channels)
    step = rate * ms // 1000
    return [rtc.AudioFrame(x[i : i + step].tobytes(), rate, channels, len(x[i : i + step]))
            for i in range(0, len(x), step)]


def tone(seconds: float, rate: int) -> np.ndarray:
    """A deterministic voiced signal (no noise), the same waveform at any rate."""
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t - np.pi / 2)) + 0.05
    x = env * (np.sin(2 * np.pi * 150 * t) + 0.4 * np.sin(2 * np.pi * 450 * t))
    return (x / np.abs(x).max() * 10000).astype(np.int16)


@dataclass
class Item:
    t: float
    kind: str  # "video", "audio" or "end"
    obj: Any
    pts_us: int = -1


class Recorder:
    """Iterates a generator in a task, as AvatarRunner's video loop does, and records what it yields."""

    def __init__(self, gen: AvatarForcingVideoGenerator) -> None:
        self.gen = gen
        self.items: list[Item] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async for it in self.gen:
            if isinstance(it, rtc.VideoFrame):
                self.items.append(Item(loop.time(), "video", it, self.gen.last_pts_us))
            elif isinstance(it, rtc.AudioFrame):
                self.items.append(Item(loop.time(), "audio", it))
            else:
                assert isinstance(it, AudioSegmentEnd), type(it)
                self.items.append(Item(loop.time(), "end", it))
            self._changed.set()

    async def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"generator stopped while waiting for {what}")
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"timed out waiting for {what}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.task.done():
            self.task.result()

    def of(self, kind: str, start: int = 0) -> list[Item]:
        return [i for i in self.items[start:] if i.kind == kind]

    def audio(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        frames = [np.frombuffer(i.obj.data, np.int16) for i in self.items[start:stop] if i.kind == "audio"]
        return np.concatenate(frames) if frames else np.zeros(0, np.int16)

    def seconds(self, start: int = 0, stop: int | None = None) -> float:
        return sum(i.obj.duration for i in self.items[start:stop] if i.kind == "audio")

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest_asyncio.fixture
async def target(make_app: AppFactory) -> str:
    app = await make_app()
    return f"127.0.0.1:{app.port}"


async def open_gen(client: AvatarForcingClient, **kw: Any) -> AvatarForcingVideoGenerator:
    return await AvatarForcingVideoGenerator.open(client, image=png_bytes(), seed=7, **kw)


def check_video(rec: Recorder, buffer_type: int) -> None:
    videos = rec.of("video")
    bpp = 4 if buffer_type == rtc.VideoBufferType.RGBA else 3
    for v in videos:
        f = v.obj
        assert (f.width, f.height, f.type) == (128, 128, buffer_type)
        assert len(f.data) == 128 * 128 * bpp
    if buffer_type == rtc.VideoBufferType.RGBA:
        assert np.all(np.frombuffer(videos[-1].obj.data, np.uint8)[3::4] == 255)
    pts = [v.pts_us for v in videos]
    assert np.all(np.diff(pts) == 40_000), "one frame per 1/25 s on the session's timeline, no gaps"
    rate = (len(videos) - 1) / (videos[-1].t - videos[0].t)
    assert 18 < rate < 32, f"frames should arrive at about 25 fps, got {rate:.1f}"


# ---- the VideoGenerator contract against a real server ------------------------------------------------
def test_generator_is_a_livekit_video_generator() -> None:
    assert issubclass(AvatarForcingVideoGenerator, VideoGenerator)
    assert not getattr(AvatarForcingVideoGenerator, "__abstractmethods__", None)


def test_sdk_import_does_not_import_livekit() -> None:
    code = ("import sys, avatarforcing_client\n"
            "bad = [m for m in sys.modules if m == 'livekit' or m.startswith('livekit.')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("enc,buffer_type", [
    (pb.VIDEO_ENCODING_RAW_RGB24, rtc.VideoBufferType.RGBA),
    (pb.VIDEO_ENCODING_JPEG, rtc.VideoBufferType.RGB24),
    (pb.VIDEO_ENCODING_H264, rtc.VideoBufferType.RGBA),
], ids=["raw-rgba", "jpeg-rgb24", "h264-rgba"])
async def test_utterance_yields_video_synced_audio_and_one_segment_end(target: str, enc: int,
                                                                        buffer_type: int) -> None:
    pcm = speechlike_pcm(2.0)
    async with AvatarForcingClient(target) as client:
        gen = await open_gen(client, sample_rate=16000, video_encoding=enc, buffer_type=buffer_type)
        assert gen.avatar_options().audio_sample_rate == 16000 and gen.avatar_options().video_fps == 25.0
        rec = Recorder(gen)
        try:
            await rec.wait(lambda: len(rec.of("video")) >= 5, 10, "idle frames")
            assert not rec.of("audio"), "an idle avatar yields video only"
            start = len(rec.items)
            for f in agent_frames(pcm, 16000):  # as fast as a TTS produces it
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: bool(rec.of("end")), 10, "AudioSegmentEnd")
            await rec.sleep(0.6)
        finally:
            await rec.close()
            await gen.aclose()
    items = rec.items[start:]
    ends = [k for k, i in enumerate(items) if i.kind == "end"]
    assert len(ends) == 1, "exactly one AudioSegmentEnd for one segment"
    end = start + ends[0]
    # The audio yielded is the pushed audio, bit for bit, on the frames' timeline.
    audio = rec.audio(start, end)
    assert np.array_equal(np.trim_zeros(audio), np.trim_zeros(pcm))
    for a in rec.of("audio", start):
        assert (a.obj.sample_rate, a.obj.num_channels, a.obj.samples_per_channel) == (16000, 1, 640)
    # Audio interleaves with video (one 40 ms chunk per frame), and nothing is yielded after the end.
    kinds = "".join(i.kind[0] for i in rec.items[start:end])
    assert "aa" not in kinds.strip("v")
    assert not rec.of("audio", end), "no audio after the segment ended (idle again)"
    # The end comes right after the block holding the last sample: within one block of it.
    nz = np.flatnonzero(audio)
    assert len(audio) - 1 - nz[-1] < BLOCK
    assert 2.0 <= rec.seconds(start, end) <= 2.0 + 2 * BLOCK / 16000
    check_video(rec, buffer_type)
    assert gen.segments_ended == 1 and gen.samples_sent == len(pcm)


async def test_stereo_48k_agent_audio_is_mixed_down_and_resampled(target: str) -> None:
    """Frames at 48 kHz stereo into a 16 kHz session, pushed in real time (as a slow TTS would)."""
    x48 = tone(1.5, 48000)
    ref16 = tone(1.5, 16000).astype(np.float64)
    stereo = np.stack([x48, x48], axis=1)
    async with AvatarForcingClient(target) as client:
        gen = await open_gen(client, sample_rate=16000)
        # The mix-down itself: the mean of the channels.
        lr = np.array([[1000, -200], [-3000, -1001]], np.int16)
        assert gen._convert(rtc.AudioFrame(lr.tobytes(), 16000, 2, 2)).tolist() == [400, -2000]
        rec = Recorder(gen)
        try:
            start = len(rec.items)
            t0 = time.monotonic()
            for k, f in enumerate(agent_frames(stereo, 48000, channels=2)):
                await asyncio.sleep(max(0.0, t0 + k * 0.02 - time.monotonic()))
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: bool(rec.of("end")), 10, "AudioSegmentEnd")
            await rec.sleep(0.4)
        finally:
            await rec.close()
            await gen.aclose()
    assert len(rec.of("end")) == 1 and not rec.of("audio", rec.items.index(rec.of("end")[0]))
    assert abs(gen.samples_sent - len(ref16)) <= 16, gen.samples_sent
    # The server returns these samples, possibly split by silence it inserted when a chunk came late.
    out = rec.audio(start).astype(np.float64)
    runs = np.flatnonzero(np.diff(np.concatenate([[1], (out != 0).astype(int), [1]])))
    keep = np.ones(len(out), bool)
    for a, b in zip(runs[::2], runs[1::2], strict=True):
        if b - a >= 8:  # inserted silence (speech has no runs of exact zeros this long)
            keep[a:b] = False
    speech = out[keep]
    assert abs(len(speech) - len(ref16)) <= 0.01 * len(ref16), (len(speech), len(ref16))
    n = min(len(speech), len(ref16)) - 200
    best = max(np.corrcoef(speech[100 + lag : 100 + lag + n - 200], ref16[100 : 100 + n - 200])[0, 1]
               for lag in range(-80, 81, 2))
    assert best > 0.95, best


async def test_clear_buffer_mutes_at_once_and_the_next_segment_ends_normally(target: str) -> None:
    pcm = speechlike_pcm(3.0)
    pcm2 = speechlike_pcm(1.0, seed=5)
    async with AvatarForcingClient(target) as client:
        gen = await open_gen(client, sample_rate=16000)
        rec = Recorder(gen)
        try:
            await rec.wait(lambda: len(rec.of("video")) >= 3, 10, "idle frames")
            start = len(rec.items)
            for f in agent_frames(pcm, 16000):
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: rec.seconds(start) >= 0.5, 10, "0.5 s of audio")
            gen.clear_buffer()  # what AvatarRunner calls on an interruption
            t_clear = asyncio.get_running_loop().time()
            cleared = len(rec.items)
            await rec.wait(lambda: not gen.muting, 4 * 0.16 + 1.0, "the rendered audio to go by")
            t_quiet = asyncio.get_running_loop().time()
            await rec.sleep(0.5)
            # The service dropped the rest: at most the blocks it had rendered ahead, within the window.
            assert gen.muted_blocks <= 4, gen.muted_blocks
            assert t_quiet - t_clear <= 4 * 0.16 + 0.3
            assert not rec.of("audio", cleared), "clear_buffer stops the audio at once"
            assert not rec.of("end"), "no AudioSegmentEnd for an interrupted segment (the runner reports it)"
            assert len(rec.of("video", cleared)) >= 20, "video goes on"
            played = rec.audio(start)
            assert 0.5 <= len(played) / 16000 < 1.0
            assert np.array_equal(played[np.flatnonzero(played)[0]:], pcm[: len(played) - np.flatnonzero(played)[0]])
            # A new segment after the interruption is counted from scratch.
            second = len(rec.items)
            for f in agent_frames(pcm2, 16000):
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: bool(rec.of("end")), 10, "the second segment's AudioSegmentEnd")
            await rec.sleep(0.4)
        finally:
            await rec.close()
            await gen.aclose()
    assert len(rec.of("end")) == 1
    end = rec.items.index(rec.of("end")[0])
    assert np.array_equal(np.trim_zeros(rec.audio(second, end)), np.trim_zeros(pcm2))
    assert 1.0 <= rec.seconds(second, end) <= 1.0 + 2 * BLOCK / 16000
    assert not rec.of("audio", end)
    assert gen.interrupts == 1 and gen.segments_ended == 1


async def test_back_to_back_segments_each_end_after_their_own_audio(target: str) -> None:
    a, b = speechlike_pcm(0.9, seed=1), speechlike_pcm(0.7, seed=2)
    async with AvatarForcingClient(target) as client:
        gen = await open_gen(client, sample_rate=16000)
        rec = Recorder(gen)
        try:
            for seg in (a, b):
                for f in agent_frames(seg, 16000):
                    await gen.push_audio(f)
                await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: len(rec.of("end")) == 2, 10, "two AudioSegmentEnds")
            await rec.sleep(0.3)
        finally:
            await rec.close()
            await gen.aclose()
    ends = [k for k, i in enumerate(rec.items) if i.kind == "end"]
    assert len(ends) == 2
    both = np.trim_zeros(rec.audio(0, ends[1]))
    assert np.array_equal(both, np.trim_zeros(np.concatenate([a, b])))
    # The first end comes after a's last sample and before b's last block.
    first = rec.audio(0, ends[0])
    lead = np.flatnonzero(first)[0]
    assert len(first) - lead >= len(a)
    assert len(first) - lead < len(a) + BLOCK


# The segment-end and muting rules block by block: tests/test_livekit_segments.py (SegmentLedger, no server).


async def test_a_quiet_generator_is_kept_alive_by_the_session(make_app: AppFactory) -> None:
    """The SDK's Session sends KeepAlive: a generator that hears nothing outlives the idle timeout."""
    app = await make_app(idle_timeout_s=0.6)
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client:
        gen = await open_gen(client, sample_rate=16000)
        assert gen.session.keepalive_interval == pytest.approx(0.2)
        rec = Recorder(gen)
        try:
            await rec.sleep(2.0)
            n = len(rec.of("video"))
            assert n >= 25, n
            pcm = speechlike_pcm(0.5, seed=4)
            for f in agent_frames(pcm, 16000):
                await gen.push_audio(f)
            await gen.push_audio(AudioSegmentEnd())
            await rec.wait(lambda: bool(rec.of("end")), 10, "AudioSegmentEnd")
        finally:
            await rec.close()
            await gen.aclose()
    assert gen.session.end is None, gen.session.end
    assert len(rec.of("end")) == 1


async def test_rejects_sessions_it_cannot_drive(target: str) -> None:
    async with AvatarForcingClient(target) as client:
        async with client.session(image=png_bytes(), pacing=pb.PACING_ASAP) as s:
            with pytest.raises(ValueError, match="PACING_REALTIME"):
                AvatarForcingVideoGenerator(s)
        async with client.session(image=png_bytes(), video_encoding=pb.VIDEO_ENCODING_FMP4) as s:
            with pytest.raises(ValueError, match="fMP4"):
                AvatarForcingVideoGenerator(s)
        with pytest.raises(ValueError, match="sample_rate"):
            await AvatarForcingVideoGenerator.open(client, image=png_bytes(), sample_rate=44100)


# ---- the README's snippets -----------------------------------------------------------------------------
def readme_livekit_blocks() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## LiveKit\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "clients/python/README.md has no '## LiveKit' section"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


def readme_livekit_block(defines: str) -> str:
    """The LiveKit section's block that defines ``defines``."""
    (code,) = [b for b in readme_livekit_blocks() if f"def {defines}(" in b]
    return code


def load_snippet(code: str) -> dict[str, Any]:
    ns: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(code, str(README), "exec"), ns)
    return ns


def test_readme_python_blocks_compile() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4
    for code in blocks:  # the AvatarSession lines run inside an agent's entrypoint: top-level await
        compile(code, str(README), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    assert len(readme_livekit_blocks()) == 4


async def test_readme_speak_snippet_runs_against_a_real_server(target: str, tmp_path: Path) -> None:
    ns = load_snippet(readme_livekit_block("speak"))
    wav = tmp_path / "hello.wav"
    write_wav(wav, speechlike_pcm(1.0, rate=24000), 24000)
    frames, seconds = await asyncio.wait_for(ns["speak"](target, png_bytes(), str(wav)), 20)
    assert frames >= 25 and 1.0 <= seconds <= 1.0 + 0.32


# ---- a real LiveKit room ---------------------------------------------------------------------------------
def _livekit_server_bin() -> str | None:
    built = ROOT / ".tools" / "bin" / "livekit-server"  # scripts/install_livekit_server.sh
    return (os.environ.get("LIVEKIT_SERVER_BIN") or shutil.which("livekit-server")
            or (str(built) if os.access(built, os.X_OK) else None))


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


API_KEY, API_SECRET = "devkey", "avatarforcing-test-secret-0123456789abcdef"


@pytest_asyncio.fixture
async def livekit_url(tmp_path: Path) -> AsyncIterator[str]:
    binary = _livekit_server_bin()
    if not binary:
        pytest.skip("no livekit-server binary (scripts/install_livekit_server.sh builds one into .tools/bin; "
                    "or set LIVEKIT_SERVER_BIN, or put livekit-server on PATH)")
    port, tcp, udp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    config = (f"port: {port}\nbind_addresses: ['127.0.0.1']\n"
              f"rtc: {{tcp_port: {tcp}, udp_port: {udp}, use_external_ip: false, node_ip: 127.0.0.1}}\n"
              f"keys: {{{API_KEY}: {API_SECRET}}}\nlogging: {{level: warn}}\n")
    log = (tmp_path / "livekit-server.log").open("w")
    proc = subprocess.Popen([binary, "--config-body", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "livekit-server.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "livekit-server did not start"
            await asyncio.sleep(0.1)
        yield f"ws://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def token(identity: str, kind: str | None = None) -> str:
    t = api.AccessToken(API_KEY, API_SECRET).with_identity(identity).with_grants(
        api.VideoGrants(room_join=True, room="avatar-test"))
    if kind:
        t = t.with_kind(kind)  # type: ignore[arg-type]
    return t.to_jwt()


async def test_real_room_agent_to_avatar_worker(livekit_url: str, target: str) -> None:
    """An agent participant streams speech (DataStreamAudioOutput) to the README's avatar worker
    (AvatarRunner + DataStreamAudioReceiver + this generator) and watches the tracks it publishes."""
    run_avatar_worker = load_snippet(readme_livekit_block("run_avatar_worker"))["run_avatar_worker"]
    agent, avatar = rtc.Room(), rtc.Room()
    video: list[tuple[float, int, int]] = []
    loud: list[float] = []
    watchers: list[asyncio.Task[None]] = []

    async def watch(track: rtc.Track) -> None:
        if track.kind == rtc.TrackKind.KIND_VIDEO:
            async for ev in rtc.VideoStream(track):
                video.append((time.monotonic(), ev.frame.width, ev.frame.height))
        else:
            async for aev in rtc.AudioStream(track, sample_rate=24000, num_channels=1):
                if np.abs(np.frombuffer(aev.frame.data, np.int16)).mean() > 300:
                    loud.append(time.monotonic())

    agent.on("track_subscribed", lambda track, *_: watchers.append(asyncio.create_task(watch(track))))
    await agent.connect(livekit_url, token("agent", "agent"))
    await avatar.connect(livekit_url, token("avatar"))
    worker = asyncio.create_task(run_avatar_worker(avatar, target, png_bytes()))
    out = DataStreamAudioOutput(agent, destination_identity="avatar", sample_rate=24000, wait_playback_start=True)
    started: list[float] = []
    out.on("playback_started", lambda ev: started.append(time.monotonic()))
    try:
        async def say(pcm: np.ndarray) -> None:
            for f in agent_frames(pcm, 24000):
                await out.capture_frame(f)
            out.flush()

        await say(speechlike_pcm(2.0, rate=24000))
        done = await asyncio.wait_for(out.wait_for_playout(), 20)
        assert not done.interrupted and 2.0 <= done.playback_position <= 2.0 + 0.32, done
        assert started and video and loud
        assert {(w, h) for _, w, h in video} == {(128, 128)}

        await say(speechlike_pcm(3.0, rate=24000, seed=3))
        await asyncio.sleep(1.5)
        out.clear_buffer()
        cut = await asyncio.wait_for(out.wait_for_playout(), 10)
        assert cut.interrupted and 0.1 < cut.playback_position < 1.5, cut
        n = len(video)
        await asyncio.sleep(1.0)
        assert len(video) > n, "the avatar keeps publishing (idle) video after the interruption"
        assert not [t for t in loud if t > time.monotonic() - 0.5], "and its audio went quiet"
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        for w in watchers:
            w.cancel()
        await agent.disconnect()
        await avatar.disconnect()
