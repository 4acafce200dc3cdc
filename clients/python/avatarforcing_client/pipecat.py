"""Pipecat video service: an AvatarForcing session between a TTS service and ``transport.output()``.

Install with ``pip install 'avatarforcing-client[pipecat]'`` and then
``pip install --no-deps pipecat-ai==1.14.0`` (every pipecat-ai release pins ``protobuf<7``, which
the SDK's generated code cannot run with; pipecat's pipeline, frames and processors never import
protobuf, only its serializers do; the extra installs pipecat-ai's other dependencies). This module
imports ``pipecat``; ``import avatarforcing_client`` alone never does.

Use it where pipecat's own ``SimliVideoService`` goes::

    avatar = AvatarForcingVideoService(target="localhost:50051", image=open("face.png", "rb").read())
    pipeline = Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts, avatar,
                         transport.output(), context_aggregator.assistant()])

What it does with the frames (pipecat-ai 1.14.0):

- ``StartFrame``: opens one ``PACING_REALTIME`` session for the pipeline run (the placement runs
  in the background; TTS audio that arrives meanwhile is queued). From then on the server streams
  frames continuously: the avatar's idle face while nobody speaks.
- ``TTSAudioRawFrame``: consumed (never passed on). Mixed down to mono, resampled to the session's
  rate when it differs (``soxr``, a pipecat dependency), and sent as ``AudioChunk``.
- ``TTSStartedFrame`` / ``TTSStoppedFrame`` mark a turn. ``TTSStoppedFrame`` sends ``EndOfAudio``:
  in ``PACING_REALTIME`` the server then renders the turn's last partial block at once and the
  session keeps running (idle frames follow, more audio may come); it never ends a realtime
  session (only ``PACING_ASAP`` sessions end after ``EndOfAudio``).
- Output: each ``VideoFrame`` becomes an ``OutputImageRawFrame`` (RGB, the model's size) followed
  by that frame's share of the block's ``AudioOut`` as a ``TTSAudioRawFrame`` at the session's
  output rate: the server's re-timed audio, so the transport plays sound and lips together.
  Audio is pushed from a turn's first block with real samples to the block that plays its last
  one (silence the server inserted inside the turn included); idle blocks push video only, so
  the transport's bot-speaking detection follows the turn.
- Other frames pass through unchanged, but in order with the audio: a frame that arrives while
  audio sent before it has not been played yet waits until that audio has been pushed
  (``TTSTextFrame``, ``TTSStoppedFrame``, ``LLMFullResponseEndFrame``... so the transport sees
  them where the speech they belong to is). Upstream frames and system frames pass at once.
- ``InterruptionFrame`` (``StartInterruptionFrame`` in older pipecat): sends ``Interrupt`` (the
  server drops the audio it has not rendered, the avatar goes idle), drops the audio still
  queued for sending and the frames waiting for audio (uninterruptible ones are pushed after the
  interruption), and drops the frames and audio of the blocks the server had already rendered
  before it saw the ``Interrupt``: on ``Interrupt`` the server empties the blocks in its window,
  which then come back with ``real_samples == 0``; the first such block marks where the old audio
  ends (at most 16 blocks are dropped if none comes).
- ``EndFrame``: waits until the audio sent so far has been played out (at most ``end_timeout_s``
  beyond its duration), closes the session (its server slot is freed) and passes the ``EndFrame``
  on. ``CancelFrame`` closes the session at once.

If the session cannot be opened or fails, an ``ErrorFrame`` goes upstream (non fatal) and the
service passes every frame through unchanged from then on (the bot speaks without a face).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import pipecat.frames.frames as _frames
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        OutputImageRawFrame,
        StartFrame,
        SystemFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "avatarforcing_client.pipecat needs pipecat-ai: pip install 'avatarforcing-client[pipecat]' "
        "&& pip install --no-deps pipecat-ai==1.14.0"
    ) from e

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .client import AvatarForcingClient, Session
from .media import VideoDecoder

__all__ = ["AvatarForcingVideoService", "INTERRUPTION_FRAMES"]

log = logging.getLogger(__name__)

#: The interruption frame classes of the installed pipecat (``InterruptionFrame``; older releases
#: have ``StartInterruptionFrame``).
INTERRUPTION_FRAMES: tuple[type[Frame], ...] = tuple(
    c for c in (getattr(_frames, "InterruptionFrame", None), getattr(_frames, "StartInterruptionFrame", None))
    if isinstance(c, type)
)

_CHUNK_S = 0.5  # audio is sent in chunks of at most this long (the server takes at most 1 s)


@dataclass
class _Block:
    """One received block: its audio cut into one chunk per frame, and what to do with it."""

    index: int
    chunks: list[bytes]
    start_sample: int
    real: int
    play: bool  # push its audio
    mute: bool  # rendered before an interruption: push nothing
    epoch: int  # interruptions before it arrived: a later one drops the rest of it
    silent: bool
    next_chunk: int = 0


@dataclass
class _Held:
    frame: Frame
    direction: FrameDirection
    pos: int  # samples sent when it arrived: pushed once the audio up to here has been pushed


def _interruptible(frame: Frame) -> bool:
    if hasattr(frame, "interruptible"):
        return bool(frame.interruptible)
    cls = getattr(_frames, "UninterruptibleFrame", None)
    return not (isinstance(cls, type) and isinstance(frame, cls))


class AvatarForcingVideoService(FrameProcessor):
    """A pipecat ``FrameProcessor`` that turns TTS audio into the avatar's video and re-timed audio.

    Place it right after the TTS service, before ``transport.output()``. See the module docstring
    for the frames it handles.

    Args:
        target: the server (``host:port``), or a list of replicas; ignored when ``client`` is given.
        image: the reference face (PNG/JPEG bytes, or a path to one); or
        avatar_id: a registered avatar (``AvatarForcingClient.register_avatar``). Exactly one.
        token: bearer token (default: the ``AVATARFORCING_TOKEN`` environment variable).
        video_encoding: how frames travel (``pb.VIDEO_ENCODING_JPEG`` by default; ``RAW_RGB24``
            costs ~w*h*3 bytes a frame, fine on loopback; ``H264`` needs PyAV; fMP4 is refused).
        sample_rate: the session's rate; default: the pipeline's ``audio_out_sample_rate`` (when
            it is within the server's 8 to 48 kHz, else 24000). TTS audio at another rate is
            resampled to it; the audio pushed downstream is at the session's output rate.
        seed, jpeg_quality: passed to the session (``seed=0``: random noise).
        client: an :class:`~avatarforcing_client.AvatarForcingClient` to use (not closed here);
            by default one is made from ``target``, ``token`` and ``client_kwargs`` and closed
            with the session.
        client_kwargs: more :class:`AvatarForcingClient` arguments (``credentials``, timeouts...).
        session_kwargs: more ``AvatarForcingClient.session`` arguments.
        max_buffered_s: TTS audio sent but not yet played beyond this many seconds makes the
            service wait before taking more (the server buffers at most 60 s).
        end_timeout_s: on ``EndFrame``, how much longer than the audio still to play to wait.
        sync_with_audio: set ``OutputImageRawFrame.sync_with_audio`` (pipecat >= 1.x), so the
            transport shows each image after the audio pushed before it has been played.
    """

    def __init__(
        self,
        *,
        target: str | Sequence[str] = "localhost:50051",
        image: bytes | str | os.PathLike[str] | None = None,
        avatar_id: str | None = None,
        token: str | None = None,
        video_encoding: int = pb.VIDEO_ENCODING_JPEG,
        sample_rate: int | None = None,
        seed: int = 0,
        jpeg_quality: int = 0,
        client: AvatarForcingClient | None = None,
        client_kwargs: dict[str, Any] | None = None,
        session_kwargs: dict[str, Any] | None = None,
        max_buffered_s: float = 20.0,
        end_timeout_s: float = 5.0,
        sync_with_audio: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (image is None) == (avatar_id is None):
            raise ValueError("pass exactly one of image= (PNG/JPEG bytes or a path) and avatar_id=")
        if isinstance(image, str | os.PathLike):
            with open(image, "rb") as f:
                image = f.read()
        if video_encoding == pb.VIDEO_ENCODING_FMP4:
            raise ValueError("use VIDEO_ENCODING_JPEG, RAW_RGB24 or H264 with pipecat (fMP4 decodes only at the end)")
        if sample_rate is not None and sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if max_buffered_s <= 0:
            raise ValueError(f"max_buffered_s must be > 0, got {max_buffered_s}")
        self._target = target
        self._image = bytes(image) if image is not None else None
        self._avatar_id = avatar_id
        self._token = token
        self._video_encoding = int(video_encoding)
        self._want_rate = sample_rate
        self._seed = seed
        self._jpeg_quality = jpeg_quality
        self._client = client
        self._own_client = client is None
        self._client_kwargs = dict(client_kwargs or {})
        self._session_kwargs = dict(session_kwargs or {})
        self._max_buffered_s = max_buffered_s
        self._end_timeout_s = end_timeout_s
        self._sync_with_audio = sync_with_audio

        self._session: Session | None = None
        self._decoder: VideoDecoder | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopped = False
        self._failed = False
        self._push_lock = asyncio.Lock()

        #: Session geometry, known once it started (``started`` is the server's ``SessionStarted``).
        self.started: pb.SessionStarted | None = None
        self.sample_rate = 0  # the rate audio is sent at (chosen on StartFrame)
        self.output_sample_rate = 0
        self.width = self.height = self.frames_per_block = 0
        self.fps = 0.0
        self._spf = 0  # samples per frame at the output rate
        self._block_samples = 0

        # sending
        self._outq: deque[tuple[str, bytes]] = deque()
        self._out_ev = asyncio.Event()
        self._space_ev = asyncio.Event()
        self._resampler: Any = None
        self._resampler_rate = 0

        # accounting, in samples at the session rate, since the last idle point
        self._sent = 0  # queued for sending
        self._played = 0  # real samples of blocks pushed downstream
        self._lost = 0  # at most this many more were in blocks the server dropped (block_index gaps)
        self._turn_open = False
        self._playing = False  # a turn's audio is being pushed
        self._context_id: str | None = None
        self._held: deque[_Held] = deque()
        self._idle_ev = asyncio.Event()
        self._idle_ev.set()

        # output
        self._epoch = 0  # interruptions so far
        self._draining = False  # dropping the blocks rendered before the last interruption
        self._mute_upto: int | None = None  # ... those whose source_end_sample is at most this (None: all)
        self._mute_gen = 0  # the session's generation (resumes) the threshold belongs to
        self._last_block = -1
        self._block: _Block | None = None

        #: Counters, for logs and tests.
        self.samples_sent = 0  # samples queued for the server (session rate)
        self.turns = 0  # TTSStoppedFrames seen
        self.interrupts = 0
        self.blocks_received = 0
        self.real_samples_received = 0  # sum of AudioOut.real_samples over every block received
        self.muted_blocks = 0  # blocks with real samples dropped after an interruption
        self.images_pushed = 0
        self.audio_frames_pushed = 0
        self.audio_samples_pushed = 0
        self.error: BaseException | None = None

    # -- public helpers ----------------------------------------------------------------------

    @property
    def session(self) -> Session | None:
        """The session (``None`` before ``StartFrame``; closed once it failed or the pipeline ended)."""
        return self._session

    @property
    def failed(self) -> bool:
        """The session could not be opened or failed: frames now pass through unchanged."""
        return self._failed

    async def wait_started(self, timeout: float | None = None) -> pb.SessionStarted:
        """Wait until the session has started (raises the error when it failed to)."""
        async with asyncio.timeout(timeout):
            while not self._ready.is_set():
                if self._failed:
                    raise RuntimeError(f"the avatar session failed: {self.error!r}") from self.error
                await asyncio.sleep(0.02)
        assert self.started is not None
        return self.started

    # -- frames in ---------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)

        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._start(frame)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            self._held.clear()
            await self.push_frame(frame, direction)
        elif INTERRUPTION_FRAMES and isinstance(frame, INTERRUPTION_FRAMES):
            await self._interrupt(frame, direction)
        elif isinstance(frame, EndFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._end(frame, direction)
        elif self._failed or self._stopped or direction != FrameDirection.DOWNSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._on_tts_audio(frame)
        elif isinstance(frame, SystemFrame):
            await self.push_frame(frame, direction)
        else:
            if isinstance(frame, TTSStartedFrame):
                self._turn_open = True
                self._context_id = getattr(frame, "context_id", None)
            elif isinstance(frame, TTSStoppedFrame):
                self._end_turn()
            await self._pass(frame, direction)

    async def _pass(self, frame: Frame, direction: FrameDirection) -> None:
        """Push now, or hold until the audio sent before it has been pushed."""
        async with self._push_lock:
            if self._held or self._sent > self._played:
                self._held.append(_Held(frame, direction, self._sent))
                self._idle_ev.clear()
                return
            await self.push_frame(frame, direction)

    async def _on_tts_audio(self, frame: TTSAudioRawFrame) -> None:
        self._send_samples(self._convert(frame))
        limit = int(self._max_buffered_s * self.sample_rate)
        while self._sent - self._played > limit and not (self._failed or self._stopped):
            self._space_ev.clear()
            await self._space_ev.wait()

    def _end_turn(self) -> None:
        self._flush_resampler()
        self._queue("eoa")
        self._turn_open = False
        self.turns += 1

    def _convert(self, frame: TTSAudioRawFrame) -> np.ndarray:
        """The frame's audio, mono int16 at the session rate."""
        ch = max(1, int(frame.num_channels))
        x = np.frombuffer(frame.audio, dtype="<i2")
        n = x.size // ch
        x = x[: n * ch].astype(np.int16)
        if ch > 1:
            x = np.rint(x.reshape(n, ch).astype(np.float32).mean(axis=1)).astype(np.int16)
        rate = int(frame.sample_rate)
        if self._resampler is not None and rate != self._resampler_rate:
            self._flush_resampler()
        if rate == self.sample_rate:
            return x
        if self._resampler is None:
            import soxr  # a pipecat-ai dependency

            self._resampler = soxr.ResampleStream(rate, self.sample_rate, 1, dtype="int16")
            self._resampler_rate = rate
        return np.asarray(self._resampler.resample_chunk(x, last=False), dtype=np.int16).reshape(-1)

    def _flush_resampler(self) -> None:
        if self._resampler is None:
            return
        tail = np.asarray(self._resampler.resample_chunk(np.zeros(0, np.int16), last=True), dtype=np.int16)
        self._resampler = None
        self._resampler_rate = 0
        self._send_samples(tail.reshape(-1))

    def _send_samples(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        step = max(1, int(self.sample_rate * _CHUNK_S))
        for i in range(0, x.size, step):
            self._queue("audio", x[i : i + step].astype("<i2").tobytes())
        self._sent += int(x.size)
        self.samples_sent += int(x.size)
        self._idle_ev.clear()

    def _queue(self, kind: str, data: bytes = b"") -> None:
        self._outq.append((kind, data))
        self._out_ev.set()

    async def _interrupt(self, frame: Frame, direction: FrameDirection) -> None:
        if self._failed or self._stopped or self._run_task is None:
            await self.push_frame(frame, direction)
            return
        async with self._push_lock:
            self._epoch += 1
            self.interrupts += 1
            kept = [h for h in self._held if not _interruptible(h.frame)]
            self._held.clear()
            self._outq = deque(r for r in self._outq if r[0] not in ("audio", "eoa"))
            self._queue("interrupt")
            self._resampler = None
            self._resampler_rate = 0
            self._turn_open = False
            self._playing = False
            self._sent = self._played = self._lost = 0
            # The blocks the server rendered before it read the Interrupt still arrive (the block being
            # pushed now is dropped by its epoch): until the writer knows how much audio the stream
            # carried before the Interrupt, every block with real samples is old.
            self._draining = True
            self._mute_upto = None
            self._mute_gen = self._session.generation if self._session is not None else 0
            self._space_ev.set()
            self._idle_ev.set()
            await self.push_frame(frame, direction)
            for h in kept:
                await self.push_frame(h.frame, h.direction)

    async def _end(self, frame: EndFrame, direction: FrameDirection) -> None:
        """Let the audio sent so far play out, close the session, pass the EndFrame on."""
        self._flush_resampler()
        if self._turn_open:
            self._end_turn()
        rate = self.sample_rate or 16000
        timeout = self._end_timeout_s + max(0, self._sent - self._played) / rate
        if self.started is not None:
            timeout += self.started.latency_ms / 1000
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle_ev.wait()
        await self._stop()
        async with self._push_lock:
            while self._held:
                h = self._held.popleft()
                await self.push_frame(h.frame, h.direction)
            await self.push_frame(frame, direction)

    # -- the session -------------------------------------------------------------------------

    def _start(self, frame: StartFrame) -> None:
        if self._run_task is not None:
            return
        rate = self._want_rate
        if rate is None:
            out_rate = 0
            with contextlib.suppress(Exception):
                out_rate = int(self.processor_setup.audio_out_sample_rate)  # pipecat >= 1.8
            if not out_rate:
                out_rate = int(getattr(frame, "audio_out_sample_rate", 0) or 0)
            rate = out_rate if 8000 <= out_rate <= 48000 else 24000
        self.sample_rate = int(rate)
        self._run_task = self.create_task(self._run(), "avatarforcing-session")
        self._writer_task = self.create_task(self._write_loop(), "avatarforcing-writer")

    async def _run(self) -> None:
        session: Session | None = None
        try:
            if self._client is None:
                self._client = AvatarForcingClient(self._target, token=self._token, **self._client_kwargs)
            session = self._client.session(
                image=self._image, avatar_id=self._avatar_id, sample_rate=self.sample_rate,
                video_encoding=self._video_encoding, pacing=pb.PACING_REALTIME, seed=self._seed,
                jpeg_quality=self._jpeg_quality, **self._session_kwargs,
            )
            self._session = session
            started = await session.start()
            self.started = started
            self.width, self.height = int(started.width), int(started.height)
            self.fps = float(started.fps)
            self.frames_per_block = int(started.frames_per_block)
            self.output_sample_rate = int(session.output_sample_rate)
            self._block_samples = round(self.frames_per_block * self.output_sample_rate / self.fps)
            self._spf = self._block_samples // self.frames_per_block
            self._decoder = VideoDecoder(session.video_encoding, self.width, self.height, session.init_segment)
            log.info("avatar session %s started: %dx%d at %g fps, audio %d Hz, latency %.0f ms", started.session_id,
                     self.width, self.height, self.fps, self.output_sample_rate, started.latency_ms)
            self._ready.set()
            async with contextlib.aclosing(session.events()) as events:
                async for ev in events:
                    if isinstance(ev, pb.AudioOut):
                        await self._on_audio_out(ev)
                    elif isinstance(ev, pb.VideoFrame):
                        await self._on_video_frame(ev)
                    elif isinstance(ev, pb.End):
                        raise RuntimeError(f"the avatar session ended: {pb.EndReason.Name(ev.reason)} {ev.message}")
            if not self._stopped:
                raise RuntimeError("the avatar session's stream ended")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._stopped:
                await self._fail(e)

    async def _write_loop(self) -> None:
        try:
            await self._ready.wait()
            session = self._session
            assert session is not None
            while True:
                if not self._outq:
                    self._out_ev.clear()
                    await self._out_ev.wait()
                    continue
                kind, data = self._outq.popleft()
                if kind == "audio":
                    await session.send_audio(data)
                elif kind == "eoa":
                    await session.end_of_audio()
                elif kind == "interrupt":
                    # Blocks whose real audio ends at or before this point were rendered from audio sent
                    # before the Interrupt (AudioOut.source_end_sample counts the same samples).
                    self._mute_upto = session.stream_audio_sent
                    self._mute_gen = session.generation
                    await session.interrupt()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._stopped:
                await self._fail(e)

    async def _fail(self, e: BaseException) -> None:
        """The avatar is gone: say so upstream, release what waits, pass frames through from now on."""
        if self._failed:
            return
        self._failed = True
        self.error = e
        log.warning("avatar session failed, passing frames through: %r", e)
        self._outq.clear()
        self._space_ev.set()
        async with self._push_lock:
            while self._held:
                h = self._held.popleft()
                await self.push_frame(h.frame, h.direction)
            self._idle_ev.set()
        await self.push_error(error_msg=f"AvatarForcing session failed: {e}", exception=e if isinstance(e, Exception)
                              else None)
        if self._session is not None:
            await self._session.close()

    async def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._space_ev.set()
        for task in (self._writer_task, self._run_task):
            if task is not None and not task.done() and task is not asyncio.current_task():
                await self.cancel_task(task)
        self._writer_task = self._run_task = None
        if self._session is not None:
            await self._session.close()
        if self._own_client and self._client is not None:
            await self._client.close()
        self._idle_ev.set()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()

    # -- frames out --------------------------------------------------------------------------

    async def _on_audio_out(self, ev: pb.AudioOut) -> None:
        if self._block is not None:  # frames of the previous block were dropped
            await self._finish_block(self._block)
        self.blocks_received += 1
        data = bytes(ev.data)
        n = len(data) // 2
        real = max(0, min(int(ev.real_samples), n - int(ev.real_offset)))
        self.real_samples_received += real
        silent = real == 0
        j = int(ev.block_index)
        gap = j - self._last_block - 1 if self._last_block >= 0 else 0
        self._last_block = max(self._last_block, j)
        mute = play = False
        if self._draining:
            session = self._session
            if session is not None and session.generation != self._mute_gen:
                self._draining = False  # resumed: a new stream never re-sends audio voided by an Interrupt
            elif self._mute_upto is not None and int(ev.source_end_sample) > self._mute_upto:
                self._draining = False  # the first block cut after the Interrupt: everything old has come
        if self._draining and not silent:
            # Old audio: rendered before the server read the Interrupt (a block cut after it holds only
            # audio sent after it, so its source_end_sample is past the threshold).
            self.muted_blocks += 1
            mute = True
        else:
            if gap > 0 and (self._turn_open or self._sent > self._played):
                self._lost += gap * self._block_samples
            if silent:
                outstanding = self._turn_open or self._played + self._lost < self._sent
                play = self._playing and outstanding
            else:
                play = self._playing = True
        spf, fpb = self._spf, self.frames_per_block
        chunks = [data[2 * i * spf : 2 * (i + 1) * spf] for i in range(fpb)]
        if fpb * spf < n:
            chunks[-1] = data[2 * (fpb - 1) * spf :]
        self._block = _Block(index=j, chunks=chunks, start_sample=int(ev.start_sample), real=real, play=play,
                             mute=mute, epoch=self._epoch, silent=silent)

    async def _on_video_frame(self, ev: pb.VideoFrame) -> None:
        block = self._block
        if block is not None and int(ev.block_index) != block.index:
            await self._finish_block(block)
            block = self._block = None
        assert self._decoder is not None
        if self._video_encoding == pb.VIDEO_ENCODING_RAW_RGB24:
            images = self._decoder.decode(ev.data)
        else:
            images = await asyncio.to_thread(self._decoder.decode, ev.data)
        if block is not None and block.mute:
            return
        i = int(ev.index) - block.index * self.frames_per_block if block is not None else -1
        async with self._push_lock:
            if block is not None and block.epoch != self._epoch:
                return  # interrupted while the block played
            for rgb in images:
                img = OutputImageRawFrame(image=np.ascontiguousarray(rgb).tobytes(), size=(self.width, self.height),
                                          format="RGB")
                if self._sync_with_audio:
                    img.sync_with_audio = True
                img.metadata["avatarforcing"] = {"frame_index": int(ev.index), "pts_us": int(ev.pts_us),
                                                 "block_index": int(ev.block_index),
                                                 "real_samples": block.real if block is not None else 0}
                await self.push_frame(img)
                self.images_pushed += 1
            if block is not None:
                await self._push_chunks(block, min(i, len(block.chunks) - 1))
        if block is not None and block.next_chunk >= len(block.chunks):
            await self._finish_block(block)

    async def _push_chunks(self, block: _Block, upto: int) -> None:
        """Push the block's audio chunks up to frame ``upto`` (called with the push lock held)."""
        while block.next_chunk <= upto:
            k = block.next_chunk
            block.next_chunk += 1
            if not block.play or block.mute or block.epoch != self._epoch:
                continue
            chunk = block.chunks[k]
            frame = TTSAudioRawFrame(audio=chunk, sample_rate=self.output_sample_rate, num_channels=1)
            if self._context_id is not None and hasattr(frame, "context_id"):
                frame.context_id = self._context_id
            frame.metadata["avatarforcing"] = {"frame_index": block.index * self.frames_per_block + k,
                                               "audio_start_sample": block.start_sample + k * self._spf,
                                               "block_index": block.index}
            await self.push_frame(frame)
            self.audio_frames_pushed += 1
            self.audio_samples_pushed += len(chunk) // 2

    async def _finish_block(self, block: _Block) -> None:
        """The block has been pushed: count its audio as played, release what waited for it."""
        if self._block is block:
            self._block = None
        async with self._push_lock:
            if block.epoch != self._epoch or block.mute:
                return
            await self._push_chunks(block, len(block.chunks) - 1)
            self._played += block.real
            while self._held and (self._held[0].pos <= self._played
                                  or (block.silent and self._held[0].pos <= self._played + self._lost)):
                h = self._held.popleft()
                await self.push_frame(h.frame, h.direction)
            done = self._played >= self._sent or (block.silent and self._played + self._lost >= self._sent)
            if done and not self._turn_open:
                self._playing = False
            if done and not self._held:
                self._sent = self._played = self._lost = 0  # idle: count afresh
                self._idle_ev.set()
            self._space_ev.set()
