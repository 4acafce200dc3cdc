"""A Pipecat pipeline whose TTS speaks through an AvatarForcing avatar, recorded to an MP4.

Needs ``pip install 'avatarforcing-client[pipecat,mp4]'`` then ``pip install --no-deps
pipecat-ai==1.14.0`` (see clients/python/README.md), and an AvatarForcing server::

    avatarforcing serve &                                   # localhost:50051
    python examples/pipecat_bot.py --out out/pipecat_bot.mp4
    python examples/pipecat_bot.py --text "Hello from Pipecat"   # spoken by espeak-ng, if installed

The pipeline is ``[tts, avatar, recorder]``, as a bot's is ``[..., tts, avatar, transport.output(),
...]``. It runs without any provider's or transport's keys: ``SpeakerTTS`` stands in for a TTS
service (a ``TTSSpeakFrame`` becomes ``TTSStartedFrame``, ``TTSTextFrame``, 20 ms
``TTSAudioRawFrame``s and ``TTSStoppedFrame``, spoken by espeak-ng or read from a WAV file), and
``Mp4Recorder`` stands in for ``transport.output()``: it writes the avatar's image frames and the
re-timed audio that follows them to an MP4. The avatar line is marked below.

Environment (or the options of the same meaning):
    AVATARFORCING_TARGET  the AvatarForcing server (default localhost:50051)
    AVATARFORCING_TOKEN   its bearer token, if it wants one
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from avatarforcing_client import Mp4Writer, read_wav
from avatarforcing_client.pipecat import AvatarForcingVideoService

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.workers.runner import WorkerRunner
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner as WorkerRunner  # type: ignore[no-redef]
    from pipecat.pipeline.task import PipelineParams  # type: ignore[no-redef]
    from pipecat.pipeline.task import PipelineTask as PipelineWorker  # type: ignore[no-redef]

ASSETS = Path(__file__).resolve().parent.parent / "avatarforcing" / "assets"


def speak(text: str | None, wav: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng when it is installed (and text is given), else the WAV file."""
    espeak = shutil.which("espeak-ng")
    if text and espeak:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "tts.wav"
            subprocess.run([espeak, "-w", str(out), text], check=True)
            return read_wav(out)
    if text:
        print("espeak-ng is not installed: playing the WAV file instead", file=sys.stderr)
    return read_wav(wav)


class SpeakerTTS(FrameProcessor):
    """Stands in for a TTS service: turns each ``TTSSpeakFrame`` into a TTS turn (20 ms frames, sent
    faster than real time, as a streaming TTS does)."""

    def __init__(self, wav: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._wav = wav

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, TTSSpeakFrame):
            await self.push_frame(frame, direction)
            return
        samples, rate = await asyncio.to_thread(speak, frame.text, self._wav)
        await self.push_frame(TTSStartedFrame())
        await self.push_frame(TTSTextFrame(frame.text or "", "sentence"))
        step = rate // 50
        for i in range(0, len(samples), step):
            await self.push_frame(TTSAudioRawFrame(samples[i : i + step].tobytes(), rate, 1))
        await self.push_frame(TTSStoppedFrame())


class Mp4Recorder(FrameProcessor):
    """Stands in for ``transport.output()``: writes image frames and the audio after them to an MP4."""

    def __init__(self, path: str | os.PathLike[str], avatar: AvatarForcingVideoService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = Path(path)
        self.avatar = avatar
        self.writer: Mp4Writer | None = None
        self._first = -1  # frame index of the first image: the file starts there
        self._audio_at = 0  # where the next audio frame goes (samples), after the last image

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        meta = frame.metadata.get("avatarforcing", {}) if direction == FrameDirection.DOWNSTREAM else {}
        if isinstance(frame, OutputImageRawFrame) and "frame_index" in meta:
            if self.writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                width, height = frame.size
                self.writer = Mp4Writer(self.path, self.avatar.fps, width, height, self.avatar.output_sample_rate)
                self._first = meta["frame_index"]
            rgb = np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3)
            self.writer.add_rgb(rgb, meta["frame_index"] - self._first)
            self._audio_at = round((meta["frame_index"] - self._first) * self.writer.sample_rate / self.writer.fps)
        elif isinstance(frame, OutputAudioRawFrame) and self.writer is not None:
            self.writer.add_audio(frame.audio, self._audio_at)  # the audio of the image before it
            self._audio_at += len(frame.audio) // 2
        elif isinstance(frame, EndFrame) and self.writer is not None:
            self.writer.close()
            w = self.writer
            print(f"wrote {self.path}: {w.frames_written} frames at {w.fps:g} fps, "
                  f"{w.audio_samples / w.sample_rate:.2f} s of audio at {w.sample_rate} Hz")
        await self.push_frame(frame, direction)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=os.environ.get("AVATARFORCING_TARGET", "localhost:50051"))
    ap.add_argument("--image", default=str(ASSETS / "reference_face.png"), help="the face (PNG or JPEG)")
    ap.add_argument("--wav", default=str(ASSETS / "speech_16k.wav"), help="what the bot says (16-bit PCM WAV)")
    ap.add_argument("--text", help="say this with espeak-ng instead (the WAV when espeak-ng is missing)")
    ap.add_argument("--out", default="out/pipecat_bot.mp4")
    ap.add_argument("--rate", type=int, default=24000, help="the pipeline's audio_out_sample_rate")
    args = ap.parse_args()

    # The avatar line: a video service between the TTS and transport.output().
    avatar = AvatarForcingVideoService(target=args.target, image=args.image)

    pipeline = Pipeline([SpeakerTTS(args.wav), avatar, Mp4Recorder(args.out, avatar)])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=args.rate),
                            enable_rtvi=False, idle_timeout_secs=None)
    # Say it, then end: the EndFrame waits in the avatar until the speech has played out.
    await worker.queue_frames([TTSSpeakFrame(args.text or ""), EndFrame()])
    runner = WorkerRunner(handle_sigint=True)
    if hasattr(runner, "add_workers"):  # pipecat >= 1.3
        await runner.add_workers(worker)
        await runner.run()
    else:
        await runner.run(worker)
    if avatar.failed:
        raise SystemExit(f"the avatar session failed: {avatar.error}")


if __name__ == "__main__":
    asyncio.run(main())
