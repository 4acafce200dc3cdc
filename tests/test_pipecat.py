"""The Pipecat video service (avatarforcing_client.pipecat) in real Pipecat pipelines against a real server.

A PipelineWorker runs ``[AvatarForcingVideoService, Recorder]``; TTS turns are queued into it as a
TTS service pushes them (TTSStartedFrame, TTSTextFrame, 20 ms TTSAudioRawFrames faster than real
time, TTSStoppedFrame). The server returns the client's samples bit for bit inside its re-timed
blocks, so each turn's audio is recognisable downstream: turn 1 and turn 3 are positive samples,
the interrupted turn 2 negative ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai is not installed (scripts/bootstrap.sh installs it)")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from avatarforcing_client import pb, write_wav  # noqa: E402
from avatarforcing_client.pipecat import AvatarForcingVideoService  # noqa: E402
from avatarforcing_service.server import App  # noqa: E402

from .conftest import png_bytes  # noqa: E402

AppFactory = Callable[..., "asyncio.Future[App]"]
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "clients" / "python" / "README.md"
RATE = 16000


def readme_pipecat_block() -> str:
    section = re.search(r"^## Pipecat\n(.*?)(?=^## |\Z)", README.read_text(), re.S | re.M)
    assert section, "clients/python/README.md has no '## Pipecat' section"
    (code,) = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    return code


def test_readme_pipecat_is_three_lines() -> None:
    code = readme_pipecat_block()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert lines[:2] == [
        "from avatarforcing_client.pipecat import AvatarForcingVideoService",
        'avatar = AvatarForcingVideoService(target="localhost:50051", image=open("face.png", "rb").read())',
    ]
    assert len(lines) == 3
    assert re.fullmatch(r"pipeline = Pipeline\(\[.*tts, avatar, transport\.output\(\).*\]\)", lines[2])
    item = re.search(r"\*\*Pipecat\*\*.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert item and textwrap.dedent(item.group(1)) == code  # the project README shows the same lines


def readme_avatar(target: str) -> AvatarForcingVideoService:
    """The README's first two lines, run with the test server's address (face.png in the working directory)."""
    code = "\n".join(readme_pipecat_block().splitlines()[:3]).replace('"localhost:50051"', repr(target))
    ns: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), ns)
    avatar = ns["avatar"]
    assert isinstance(avatar, AvatarForcingVideoService)
    return avatar


def turn_pcm(seconds: float, sign: int, rate: int = RATE) -> np.ndarray:
    """A voiced-sounding signal whose every sample has the given sign (never zero)."""
    t = np.arange(int(seconds * rate)) / rate
    env = 0.55 + 0.45 * np.sin(2 * np.pi * 3 * t)
    x = env * (0.6 + 0.4 * np.sin(2 * np.pi * 150 * t))
    return (sign * np.maximum(1, np.round(x * 12000))).astype(np.int16)


async def run_worker(worker: PipelineWorker) -> None:
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def tts_turn(pcm: np.ndarray, text: str, rate: int = RATE) -> list[Frame]:
    step = rate // 50
    frames: list[Frame] = [TTSStartedFrame(), TTSTextFrame(text, "sentence")]
    frames += [TTSAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1) for i in range(0, len(pcm), step)]
    frames.append(TTSStoppedFrame())
    return frames


class Recorder(FrameProcessor):
    """Stands in for transport.output(): records what reaches it, in order, and passes it on."""

    def __init__(self, name: str = "recorder") -> None:
        super().__init__(name=name)
        self.frames: list[Frame] = []
        self.upstream: list[Frame] = []
        self._changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        (self.frames if direction == FrameDirection.DOWNSTREAM else self.upstream).append(frame)
        self._changed.set()
        await self.push_frame(frame, direction)

    async def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not pred():
            left = deadline - loop.time()
            assert left > 0, f"timed out waiting for {what}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def count(self, cls: type, start: int = 0) -> int:
        return sum(isinstance(f, cls) for f in self.frames[start:])

    def index(self, cls: type, start: int = 0) -> int:
        return next(i for i in range(start, len(self.frames)) if isinstance(self.frames[i], cls))

    def audio(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        frames = self.frames[start:stop]
        parts = [np.frombuffer(f.audio, np.int16) for f in frames if isinstance(f, OutputAudioRawFrame)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def check_turn(rec: Recorder, start: int, stop: int, pcm: np.ndarray, avatar: AvatarForcingVideoService) -> None:
    """Frames [start, stop) hold one whole turn: images and their audio, interleaved and in sync."""
    w, h, fps, spf = avatar.width, avatar.height, avatar.fps, avatar.output_sample_rate / avatar.fps
    images = [f for f in rec.frames[start:stop] if isinstance(f, OutputImageRawFrame)]
    for f in images:
        assert f.size == (w, h) and f.format == "RGB" and len(f.image) == w * h * 3
    audio = rec.audio(start, stop)
    # The server hands the client's samples back bit for bit; the rest is silence it inserted.
    assert np.array_equal(audio[audio != 0], pcm), (int((audio != 0).sum()), len(pcm))
    # Each audio frame is the share of the image pushed right before it: the same frame index, one
    # frame long, so the turn's audio lasts exactly as long as the images it plays with.
    last_image: dict[str, Any] | None = None
    paired = 0
    for fr in rec.frames[start:stop]:
        meta = fr.metadata.get("avatarforcing")
        if isinstance(fr, OutputImageRawFrame):
            last_image = meta
        elif isinstance(fr, TTSAudioRawFrame):
            assert meta is not None and last_image is not None, "audio before any image"
            assert meta["frame_index"] == last_image["frame_index"], (meta, last_image)
            assert len(fr.audio) // 2 == spf and fr.sample_rate == avatar.output_sample_rate
            assert meta["audio_start_sample"] / avatar.output_sample_rate == pytest.approx(meta["frame_index"] / fps)
            paired += 1
    assert paired * spf == len(audio)
    assert len(audio) / avatar.output_sample_rate == pytest.approx(paired / fps)
    assert len(audio) >= len(pcm)


async def test_pipecat_turns_interruption_and_end(make_app: AppFactory) -> None:
    app = await make_app()
    capacity = app.engine.free_slots
    avatar = AvatarForcingVideoService(target=f"127.0.0.1:{app.port}", image=png_bytes(),
                                       video_encoding=pb.VIDEO_ENCODING_JPEG, seed=7)
    front, rec = Recorder("front"), Recorder()
    worker = PipelineWorker(Pipeline([front, avatar, rec]), params=PipelineParams(audio_out_sample_rate=RATE),
                            enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None)
    run = asyncio.create_task(run_worker(worker))
    try:
        started = await avatar.wait_started(20)
        assert avatar.sample_rate == RATE and avatar.output_sample_rate == RATE
        assert app.engine.free_slots == capacity - 1
        # The session streams the idle face before anybody speaks: video only.
        await rec.wait(lambda: rec.count(OutputImageRawFrame) >= 8, 15, "idle frames")
        assert rec.count(OutputAudioRawFrame) == 0

        # Turn 1, whole: every sample comes back, with the images, in sync; the TTSStoppedFrame waits
        # in the service until the turn's audio has been pushed (check_turn: all of it comes before).
        pcm1 = turn_pcm(1.0, +1)
        t1 = len(rec.frames)
        await worker.queue_frames(tts_turn(pcm1, "one"))
        await rec.wait(lambda: rec.count(TTSStoppedFrame, t1) == 1, 20, "the end of turn 1")
        stop1 = rec.index(TTSStoppedFrame, t1)
        check_turn(rec, t1, stop1, pcm1, avatar)
        assert rec.index(TTSStartedFrame, t1) < rec.index(TTSAudioRawFrame, t1)
        assert avatar.real_samples_received == len(pcm1)

        # Turn 2, interrupted once some of it has played.
        pcm2 = turn_pcm(4.0, -1)
        t2 = len(rec.frames)
        real_before = avatar.real_samples_received
        await worker.queue_frames(tts_turn(pcm2, "two"))
        await rec.wait(lambda: (rec.audio(t2) < 0).sum() >= RATE // 2, 20, "half a second of turn 2")
        await worker.queue_frame(InterruptionFrame())
        await rec.wait(lambda: rec.count(InterruptionFrame, t2) == 1, 10, "the interruption")
        cut = rec.index(InterruptionFrame, t2)
        played2 = rec.audio(t2, cut)
        assert np.array_equal(played2[played2 != 0], pcm2[: int((played2 != 0).sum())])  # a prefix of turn 2
        # The avatar stays up, idle: frames go on, none with turn 2's audio or speech in it.
        await rec.wait(lambda: rec.count(OutputImageRawFrame, cut) >= 25, 20, "idle frames after the interruption")
        after = rec.frames[cut:]
        assert rec.count(OutputAudioRawFrame, cut) == 0
        assert not any(isinstance(f, TTSTextFrame | TTSStoppedFrame) for f in after), "turn 2's held frames"
        images = [f for f in after if isinstance(f, OutputImageRawFrame)]
        assert all(f.metadata["avatarforcing"]["real_samples"] == 0 for f in images)
        # The server dropped the rest of turn 2: it rendered (sent back) only what was in its window
        # and queue when the Interrupt came, not the 4 s that had been sent.
        rendered2 = avatar.real_samples_received - real_before
        print(f"turn 2: {len(pcm2)} samples sent, {int((played2 != 0).sum())} pushed before the interruption, "
              f"{rendered2} rendered by the server, {avatar.muted_blocks} blocks dropped after it; "
              f"latency {started.latency_ms:.0f} ms, {avatar.frames_per_block} frames/block at {avatar.fps:g} fps")
        assert 0 < rendered2 < len(pcm2) // 2, (rendered2, len(pcm2))
        assert avatar.interrupts == 1 and avatar.samples_sent == len(pcm1) + len(pcm2)

        # Turn 3 after the interruption: whole and in sync again.
        pcm3 = turn_pcm(0.6, +1)
        t3 = len(rec.frames)
        await worker.queue_frames(tts_turn(pcm3, "three"))
        await rec.wait(lambda: rec.count(TTSStoppedFrame, t3) == 1, 20, "the end of turn 3")
        stop3 = rec.index(TTSStoppedFrame, t3)
        check_turn(rec, t3, stop3, pcm3, avatar)
        assert (rec.audio(cut) < 0).sum() == 0

        # EndFrame: the session closes and its slot is free again; the EndFrame reaches the end.
        session = avatar.session
        assert session is not None and session.session_id == started.session_id
        await worker.queue_frame(EndFrame())
        await asyncio.wait_for(run, 20)
        assert rec.count(EndFrame) == 1 and session.closed
        deadline = time.monotonic() + 10
        while app.engine.free_slots != capacity and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert app.engine.free_slots == capacity
        assert not avatar.failed and not [f for f in front.upstream if isinstance(f, ErrorFrame)]
    finally:
        if not run.done():
            await worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(run, 10)


async def test_pipecat_end_waits_for_the_turn_and_unreachable_server_passes_audio(
        make_app: AppFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An EndFrame right after a turn lets it play out; without a server the TTS audio passes through."""
    app = await make_app()
    capacity = app.engine.free_slots
    # The README's lines make the service; a 24 kHz TTS into a 16 kHz pipeline: it resamples.
    (tmp_path / "face.png").write_bytes(png_bytes())
    monkeypatch.chdir(tmp_path)
    avatar = readme_avatar(f"127.0.0.1:{app.port}")
    rec = Recorder()
    worker = PipelineWorker(Pipeline([avatar, rec]), params=PipelineParams(audio_out_sample_rate=RATE),
                            enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None)
    pcm = turn_pcm(0.8, +1, rate=24000)
    await worker.queue_frames([*tts_turn(pcm, "bye", rate=24000), EndFrame()])
    await asyncio.wait_for(run_worker(worker), 30)
    stop = rec.index(TTSStoppedFrame)
    assert rec.index(EndFrame) > stop
    spoken = rec.audio(0, stop)
    assert abs(int((spoken > 0).sum()) - len(pcm) * 2 // 3) < 200  # all of it, at 16 kHz
    assert avatar.samples_sent == pytest.approx(len(pcm) * 2 / 3, abs=2)
    while app.engine.free_slots != capacity:
        await asyncio.sleep(0.05)

    # No server there: an ErrorFrame goes upstream and the TTS audio reaches the transport unchanged.
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    avatar = AvatarForcingVideoService(target=dead, image=png_bytes(), client_kwargs={"placement_timeout": 1.0})
    front, rec = Recorder("front"), Recorder()
    worker = PipelineWorker(Pipeline([front, avatar, rec]), params=PipelineParams(audio_out_sample_rate=RATE),
                            enable_rtvi=False, enable_turn_tracking=False, idle_timeout_secs=None)
    run = asyncio.create_task(run_worker(worker))
    with pytest.raises(RuntimeError, match="failed"):
        await avatar.wait_started(15)
    pcm = turn_pcm(0.3, +1)
    await worker.queue_frames([*tts_turn(pcm, "no face"), EndFrame()])
    await asyncio.wait_for(run, 20)
    assert np.array_equal(rec.audio(), pcm) and rec.count(OutputImageRawFrame) == 0
    assert avatar.failed and any(isinstance(f, ErrorFrame) and "AvatarForcing" in str(f.error) for f in front.upstream)


async def test_pipecat_bot_example_writes_an_mp4(make_app: AppFactory, tmp_path: Path) -> None:
    """examples/pipecat_bot.py against a real server: an MP4 with the avatar's video and the speech."""
    av = pytest.importorskip("av")
    app = await make_app()
    wav = tmp_path / "say.wav"
    write_wav(wav, turn_pcm(1.5, +1), RATE)
    out = tmp_path / "sub" / "bot.mp4"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "pipecat_bot.py"), "--target", f"127.0.0.1:{app.port}",
        "--wav", str(wav), "--out", str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stdout[-3000:]
    m = re.search(r"wrote .*: (\d+) frames at ([\d.]+) fps, ([\d.]+) s of audio at 24000 Hz", stdout)
    assert m, stdout[-3000:]
    fps = float(m.group(2))
    assert float(m.group(3)) >= 1.5  # the whole utterance (the pipeline's 24 kHz: resampled from 16 kHz)
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(out)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert frames == int(m.group(1)) and frames / fps >= 1.5
    assert np.abs(pcm).max() > 0.05  # the speech is in the file
