"""LiveKit Agents avatar adapter: an AvatarForcing session as a ``VideoGenerator``, and the
:class:`AvatarSession` that gives an agent its avatar in two lines, as LiveKit's avatar plugins do::

    avatar = AvatarSession(target="localhost:50051", image=open("face.png", "rb").read())
    await avatar.start(session, room=ctx.room)

Install with ``pip install 'avatarforcing-client[livekit]'`` (this module imports
``livekit-agents``; ``import avatarforcing_client`` alone never does).

`livekit-agents` (1.8.9) runs an avatar with ``livekit.agents.voice.avatar.AvatarRunner``: it
reads the agent's speech from an ``AudioReceiver`` (``DataStreamAudioReceiver`` when the agent
runs in another process, ``QueueAudioOutput`` in-process), pushes it into a ``VideoGenerator``
(``push_audio(rtc.AudioFrame | AudioSegmentEnd)``, ``clear_buffer()``) and publishes what the
generator yields (``rtc.VideoFrame``, ``rtc.AudioFrame``, ``AudioSegmentEnd``) through an
``rtc.AVSynchronizer``. An ``AudioSegmentEnd`` yielded by the generator makes the runner call
``notify_playback_finished(position, interrupted=False)``, where ``position`` is the duration of
the audio frames yielded since the segment started; on ``clear_buffer`` the runner itself calls
``notify_playback_finished(position, interrupted=True)`` after ``clear_buffer()`` returns.

:class:`AvatarForcingVideoGenerator` maps this onto one ``PACING_REALTIME`` session:

- ``push_audio(rtc.AudioFrame)``: int16 frames are mixed down to mono and, when their rate is not
  the session's, resampled with ``rtc.AudioResampler``; the PCM is sent as ``AudioChunk``.
- ``push_audio(AudioSegmentEnd())``: the resampler's tail is flushed and ``EndOfAudio`` is sent;
  the segment now waits for its audio to come back.
- ``clear_buffer()``: ``Interrupt`` is sent; queued segments are forgotten (no ``AudioSegmentEnd``
  is yielded for them: the runner has already reported the interruption, and a late one would end
  the next segment), and the audio the server had already rendered (the blocks queued for sending,
  up to ``max_blocks_ahead`` + 1 of them) is muted, from the middle of the block being yielded up
  to the first block with ``real_samples == 0``: on ``Interrupt`` the server empties the blocks in
  its window (they come out silent, ``real_samples == 0``), so that block marks where audio pushed
  after the interruption starts, and counting starts afresh there. A reply sent at once may follow the
  interrupted speech with no such block between (the server re-plans its window for it): muting also
  stops at the first block whose ``source_end_sample`` passes the audio sent before the ``Interrupt``.
  If neither comes, muting stops after 16 blocks.
- ``KeepAlive``: the SDK's :class:`~avatarforcing_client.Session` sends it when nothing was sent for
  a third of the server's idle timeout (``auto_keepalive``, on by default), so a quiet agent does
  not hit ``END_REASON_IDLE_TIMEOUT``.
- iterating: every ``VideoFrame`` becomes an ``rtc.VideoFrame`` (RGBA by default), each followed
  by that frame's share of the block's ``AudioOut`` as an ``rtc.AudioFrame`` (the server's
  re-timed audio, so lips and sound stay in sync). Idle blocks (``real_samples == 0`` while no
  segment is playing) yield video only, as the runner expects, so the playback position it
  reports counts the segment's audio and not the avatar's idle time.

**Segment end.** The server returns the client's own samples, bit for bit, inside blocks of
``in_block = frames_per_block * rate / fps`` samples, with silence inserted before speech that
starts mid-block and after speech that stalls or stops, and each ``AudioOut`` says exactly which of
its samples came from the client: ``data[real_offset : real_offset + real_samples]``. With ``C``
the number of samples pushed (at the session rate) up to a segment's ``AudioSegmentEnd``, counted
from the last point where the stream was idle, the segment has played out when the sum of
``real_samples`` over the same span reaches ``C``; ``AudioSegmentEnd`` is yielded right after the
audio of that block. This is exact whatever the audio holds (digital silence included) and however
the agent's audio stalls. A segment with no audio ends with the next block.

Blocks the server dropped for a slow reader (gaps in ``block_index``) never arrive, so their real
samples are unknown: they count as full blocks toward a bound, and a segment also ends at a block
with ``real_samples == 0`` once the exact count plus that bound reaches ``C``. Audio is yielded
from a segment's first block with real samples to its end (silence the server inserted inside it
included); the silent blocks before it (the service's latency) and after it yield video only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

try:
    from livekit import api, rtc
    from livekit.agents.job import get_job_context
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.voice.avatar import (
        AudioReceiver,
        AudioSegmentEnd,
        AvatarOptions,
        AvatarRunner,
        DataStreamAudioOutput,
        DataStreamAudioReceiver,
        QueueAudioOutput,
        VideoGenerator,
    )
    from livekit.agents.voice.avatar import AvatarSession as _AvatarSessionBase
    from livekit.agents.voice.io import AudioOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "avatarforcing_client.livekit needs livekit-agents (pip install 'avatarforcing-client[livekit]')"
    ) from e

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .client import AvatarForcingClient, Session
from .media import VideoDecoder
from .segments import SegmentLedger

if TYPE_CHECKING:
    from livekit.agents.voice import AgentSession

__all__ = [
    "AvatarSession",
    "AvatarMode",
    "DEFAULT_AVATAR_IDENTITY",
    "AvatarForcingVideoGenerator",
    "start_avatar_runner",
    "SUPPORTED_SAMPLE_RATES",
]

log = logging.getLogger(__name__)

#: Sample rates the service accepts (and returns AudioOut at).
SUPPORTED_SAMPLE_RATES = (8000, 16000, 24000, 48000)

_MAX_CHUNK_S = 0.5  # the server takes chunks of at most 1 s
_MAX_QUEUED = 256  # outgoing requests queued before push_audio waits
_MAX_DRAIN_BLOCKS = 16  # stop muting after this many blocks even if no block with real_samples == 0 came


@dataclass
class _BlockAudio:
    """The audio of one received block, cut into one chunk per video frame."""

    index: int
    chunks: list[np.ndarray]
    play: bool  # yield the audio (False: idle silence, or muted after clear_buffer)
    clears: int  # clear_buffer calls before this block arrived: a later one mutes the rest of it
    next_chunk: int = 0
    segment_ends: int = 0  # AudioSegmentEnds to yield once the block's audio has been yielded


class AvatarForcingVideoGenerator(VideoGenerator):
    """A ``livekit.agents.voice.avatar.VideoGenerator`` backed by an AvatarForcing session.

    Either wrap a started :class:`~avatarforcing_client.Session` opened with
    ``pacing=pb.PACING_REALTIME`` (and a ``RAW_RGB24``, ``JPEG`` or ``H264`` encoding), or use
    :meth:`open`, which opens one and closes it in :meth:`aclose`. See the module docstring for
    how segments end.

    Args:
        session: a started REALTIME session; the generator becomes its only reader and writer.
        buffer_type: ``rtc.VideoBufferType.RGBA`` (default; what LiveKit's own generators
            produce) or ``rtc.VideoBufferType.RGB24``.
        own_session: close the session in :meth:`aclose`.

    ``KeepAlive`` is the session's business: open it with ``auto_keepalive=True`` (the default).
    """

    def __init__(
        self,
        session: Session,
        *,
        buffer_type: rtc.VideoBufferType.ValueType = rtc.VideoBufferType.RGBA,
        own_session: bool = False,
    ) -> None:
        started = session.started  # raises if the session was not started
        if session.config.pacing != pb.PACING_REALTIME:
            raise ValueError("AvatarForcingVideoGenerator needs a session opened with pacing=pb.PACING_REALTIME")
        if session.video_encoding == pb.VIDEO_ENCODING_FMP4:
            raise ValueError("use VIDEO_ENCODING_RAW_RGB24, JPEG or H264 with LiveKit (fMP4 decodes only at the end)")
        if buffer_type not in (rtc.VideoBufferType.RGBA, rtc.VideoBufferType.RGB24):
            raise ValueError("buffer_type must be rtc.VideoBufferType.RGBA or RGB24")
        self.session = session
        self.width = int(started.width)
        self.height = int(started.height)
        self.fps = float(started.fps)
        self.frames_per_block = int(started.frames_per_block)
        self.sample_rate = int(session.output_sample_rate)
        self.block_samples = round(self.frames_per_block * self.sample_rate / self.fps)
        self._samples_per_frame = self.block_samples // self.frames_per_block
        self.buffer_type = buffer_type
        self._own_session = own_session
        self._decoder = VideoDecoder(session.video_encoding, self.width, self.height, session.init_segment)
        self._raw = session.video_encoding == pb.VIDEO_ENCODING_RAW_RGB24

        # input side
        self._resampler: Any = None  # rtc.AudioResampler
        self._resampler_rate = 0
        self._outq: deque[pb.StreamRequest] = deque()
        self._out_ev = asyncio.Event()
        self._space_ev = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._writer_error: BaseException | None = None

        # output side
        self._ledger = SegmentLedger(self.block_samples, _MAX_DRAIN_BLOCKS)  # segments, muting, counters
        self._iterating = False
        self._closed = False

        #: ``VideoFrame.pts_us`` / ``index`` of the last video frame yielded (-1 before the first).
        self.last_pts_us = -1
        self.last_frame_index = -1
        self._ensure_writer()

    @property
    def muting(self) -> bool:
        """True after :meth:`clear_buffer` until the audio rendered before it has gone by."""
        return self._ledger.muting

    # Counters, for logs and tests.

    @property
    def segments_ended(self) -> int:
        """``AudioSegmentEnd``s decided so far (segments whose audio has all come back)."""
        return self._ledger.segments_ended

    @property
    def interrupts(self) -> int:
        """:meth:`clear_buffer` calls so far."""
        return self._ledger.interrupts

    @property
    def muted_blocks(self) -> int:
        """Blocks with real samples muted after :meth:`clear_buffer`."""
        return self._ledger.muted_blocks

    @property
    def samples_sent(self) -> int:
        """Samples (session rate) sent over the session."""
        return self._ledger.samples_sent

    @property
    def samples_returned(self) -> int:
        """``AudioOut.real_samples`` summed over every block received: the pushed samples the server played
        back (after an interruption it is short of ``samples_sent`` by what the server dropped)."""
        return self._ledger.samples_returned

    # -- construction ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        client: AvatarForcingClient,
        *,
        image: bytes | None = None,
        avatar_id: str | None = None,
        sample_rate: int = 24000,
        video_encoding: int = pb.VIDEO_ENCODING_RAW_RGB24,
        buffer_type: rtc.VideoBufferType.ValueType = rtc.VideoBufferType.RGBA,
        seed: int = 0,
        **session_kwargs: Any,
    ) -> AvatarForcingVideoGenerator:
        """Open a REALTIME session on ``client`` and wrap it (closed again by :meth:`aclose`).

        ``sample_rate`` is the rate of the session (8000, 16000, 24000 or 48000): pick the
        agent's TTS rate to avoid resampling (frames at other rates are resampled to it); the
        audio yielded back is at this rate too (``AvatarOptions.audio_sample_rate``).
        """
        if sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SUPPORTED_SAMPLE_RATES}, got {sample_rate}")
        session = client.session(
            image=image, avatar_id=avatar_id, sample_rate=sample_rate, video_encoding=video_encoding,
            pacing=pb.PACING_REALTIME, seed=seed, **session_kwargs,
        )
        await session.start()
        try:
            return cls(session, buffer_type=buffer_type, own_session=True)
        except BaseException:
            await session.close()
            raise

    def avatar_options(self) -> AvatarOptions:
        """``AvatarOptions`` for an ``AvatarRunner`` publishing this generator's output."""
        return AvatarOptions(
            video_width=self.width, video_height=self.height, video_fps=self.fps,
            audio_sample_rate=self.sample_rate, audio_channels=1,
        )

    async def __aenter__(self) -> AvatarForcingVideoGenerator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop sending; close the session when the generator opened it (or ``own_session``)."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
        if self._own_session:
            await self.session.close()

    # -- VideoGenerator: input ---------------------------------------------------------------

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """Forward one agent frame (any rate, any channel count) or end the current segment."""
        self._check_writer()
        if isinstance(frame, AudioSegmentEnd):
            self._flush_resampler()
            self._queue(pb.StreamRequest(end_of_audio=pb.EndOfAudio()))
            self._ledger.end_segment()
            return
        self._ledger.open_segment()
        self._send_samples(self._convert(frame))
        while len(self._outq) > _MAX_QUEUED and self._writer_error is None and not self._closed:
            self._space_ev.clear()
            await self._space_ev.wait()
        self._check_writer()

    def clear_buffer(self) -> None:
        """Interrupt: the server drops the audio it has not rendered; what it has rendered is muted.

        Synchronous, so that the ``Interrupt`` is queued before any audio pushed afterwards.
        """
        self._outq = deque(r for r in self._outq if r.WhichOneof("message") not in ("audio", "end_of_audio"))
        self._queue(pb.StreamRequest(interrupt=pb.Interrupt()))
        self._resampler = None
        self._resampler_rate = 0
        # The blocks the server had rendered before the Interrupt still arrive; the blocks in its
        # window come back with real_samples == 0, so the first such block ends the old audio. The
        # interrupt count also mutes the rest of the block being yielded (see _BlockAudio.clears).
        self._ledger.interrupt()
        self._space_ev.set()

    def _convert(self, frame: rtc.AudioFrame) -> np.ndarray:
        channels = max(1, int(frame.num_channels))
        n = int(frame.samples_per_channel)
        x = np.frombuffer(frame.data, dtype=np.int16, count=n * channels)
        if channels > 1:
            x = np.rint(x.reshape(n, channels).astype(np.float32).mean(axis=1)).astype(np.int16)
        rate = int(frame.sample_rate)
        if rate == self.sample_rate and self._resampler is None:
            return x.copy()
        if self._resampler is not None and rate != self._resampler_rate:
            self._flush_resampler()
        if rate == self.sample_rate:
            return x.copy()
        if self._resampler is None:
            self._resampler = rtc.AudioResampler(
                input_rate=rate, output_rate=self.sample_rate, num_channels=1,
                quality=rtc.AudioResamplerQuality.MEDIUM,
            )
            self._resampler_rate = rate
        mono = rtc.AudioFrame(x.tobytes(), rate, 1, n)
        out = [np.frombuffer(f.data, dtype=np.int16).copy() for f in self._resampler.push(mono)]
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def _flush_resampler(self) -> None:
        if self._resampler is None:
            return
        tail = [np.frombuffer(f.data, dtype=np.int16).copy() for f in self._resampler.flush()]
        self._resampler = None
        self._resampler_rate = 0
        if tail:
            self._send_samples(np.concatenate(tail))

    def _send_samples(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        step = max(1, int(self.sample_rate * _MAX_CHUNK_S))
        for i in range(0, x.size, step):
            self._queue(pb.StreamRequest(audio=pb.AudioChunk(data=x[i : i + step].astype("<i2").tobytes())))
        self._ledger.samples_pushed(int(x.size))

    # -- sending -----------------------------------------------------------------------------

    def _queue(self, req: pb.StreamRequest) -> None:
        self._ensure_writer()
        self._outq.append(req)
        self._out_ev.set()

    def _ensure_writer(self) -> None:
        if self._writer is None and not self._closed:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # started by the first call made inside the event loop
            self._writer = asyncio.create_task(self._write_loop(), name="avatarforcing-livekit-writer")

    def _check_writer(self) -> None:
        if self._closed:
            raise RuntimeError("the generator is closed")
        if self._writer_error is not None:
            raise RuntimeError(f"sending to the avatar session failed: {self._writer_error!r}") from self._writer_error

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._outq:
                    self._out_ev.clear()
                    await self._out_ev.wait()
                    continue
                req = self._outq.popleft()
                if len(self._outq) <= _MAX_QUEUED:
                    self._space_ev.set()
                if req.HasField("audio"):
                    await self.session.send_audio(req.audio.data)
                elif req.HasField("end_of_audio"):
                    await self.session.end_of_audio()
                elif req.HasField("interrupt"):
                    self._ledger.interrupt_sent(self.session.stream_audio_sent, self.session.generation)
                    await self.session.interrupt()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the session ended or failed: surface it on the next push
            self._writer_error = e
            self._space_ev.set()
            log.debug("avatar session writer stopped: %r", e)

    # -- VideoGenerator: output --------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self) -> AsyncGenerator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd, None]:
        if self._iterating:
            raise RuntimeError("the generator is already being iterated")
        self._iterating = True
        self._ensure_writer()
        block: _BlockAudio | None = None
        try:
            async with contextlib.aclosing(self.session.events()) as events:
                async for ev in events:
                    if isinstance(ev, pb.AudioOut):
                        if block is not None:  # frames of the previous block were dropped
                            for item in self._finish_block(block):
                                yield item
                        block = self._on_audio_out(ev)
                        for _ in range(self._take_immediate_ends(block)):
                            yield AudioSegmentEnd()
                    elif isinstance(ev, pb.VideoFrame):
                        if block is not None and ev.block_index != block.index:
                            for item in self._finish_block(block):
                                yield item
                            block = None
                        for rgb in await self._decode(ev.data):
                            self.last_pts_us = int(ev.pts_us)
                            self.last_frame_index = int(ev.index)
                            yield self._video_frame(rgb)
                        if block is not None:
                            i = int(ev.index) - block.index * self.frames_per_block
                            while block.next_chunk <= min(i, len(block.chunks) - 1):
                                chunk = block.chunks[block.next_chunk]
                                block.next_chunk += 1
                                if block.play and block.clears == self.interrupts:
                                    yield self._audio_frame(chunk)
                            if block.next_chunk >= len(block.chunks):
                                for item in self._finish_block(block):
                                    yield item
                                block = None
                    elif isinstance(ev, pb.End):
                        log.info("avatar session ended: %s %s", pb.EndReason.Name(ev.reason), ev.message)
                if block is not None:
                    for item in self._finish_block(block):
                        yield item
        finally:
            self._iterating = False

    def _finish_block(self, block: _BlockAudio) -> list[rtc.AudioFrame | AudioSegmentEnd]:
        out: list[rtc.AudioFrame | AudioSegmentEnd] = []
        if block.clears != self.interrupts:  # clear_buffer was called while the block played
            block.play = False
            block.segment_ends = 0
        if block.play:
            out.extend(self._audio_frame(c) for c in block.chunks[block.next_chunk :])
        block.next_chunk = len(block.chunks)
        out.extend(AudioSegmentEnd() for _ in range(block.segment_ends))
        block.segment_ends = 0
        return out

    def _take_immediate_ends(self, block: _BlockAudio) -> int:
        """Segment ends that need not wait for this block's audio (it is not played)."""
        if block.play:
            return 0
        n, block.segment_ends = block.segment_ends, 0
        return n

    def _on_audio_out(self, ev: pb.AudioOut) -> _BlockAudio:
        """Bookkeeping for one block: whether to yield its audio, and which segments it ends."""
        pcm = np.frombuffer(ev.data, dtype="<i2").astype(np.int16)
        j = int(ev.block_index)
        plan = self._ledger.block(j, int(ev.real_samples), int(ev.real_offset), int(pcm.shape[0]),
                                  int(ev.source_end_sample), self.session.generation)
        spf = self._samples_per_frame
        chunks = [pcm[i * spf : (i + 1) * spf] for i in range(self.frames_per_block)]
        if self.frames_per_block * spf < pcm.shape[0]:
            chunks[-1] = pcm[(self.frames_per_block - 1) * spf :]
        return _BlockAudio(index=j, chunks=chunks, play=plan.play, clears=self.interrupts,
                           segment_ends=plan.segment_ends)

    async def _decode(self, data: bytes) -> list[np.ndarray]:
        if self._raw:
            return self._decoder.decode(data)
        return await asyncio.to_thread(self._decoder.decode, data)

    def _video_frame(self, rgb: np.ndarray) -> rtc.VideoFrame:
        if self.buffer_type == rtc.VideoBufferType.RGB24:
            data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
        else:
            rgba = np.empty((self.height, self.width, 4), dtype=np.uint8)
            rgba[..., :3] = rgb
            rgba[..., 3] = 255
            data = rgba.tobytes()
        return rtc.VideoFrame(self.width, self.height, self.buffer_type, data)

    def _audio_frame(self, chunk: np.ndarray) -> rtc.AudioFrame:
        return rtc.AudioFrame(chunk.astype("<i2").tobytes(), self.sample_rate, 1, int(chunk.shape[0]))


async def start_avatar_runner(
    room: rtc.Room,
    generator: AvatarForcingVideoGenerator,
    *,
    audio_recv: AudioReceiver | None = None,
) -> AvatarRunner:
    """Create and start an ``AvatarRunner`` that publishes ``generator`` in ``room``.

    ``audio_recv`` defaults to ``DataStreamAudioReceiver(room)``: the agent runs elsewhere and
    streams its speech to this participant (``DataStreamAudioOutput`` on the agent's side). Pass a
    ``QueueAudioOutput`` to drive the avatar from an ``AgentSession`` in the same process. The
    tracks are published when the first frame is ready (the room must be connected by then).
    Stop with ``await runner.aclose()`` and ``await generator.aclose()``.
    """
    runner = AvatarRunner(
        room,
        audio_recv=audio_recv if audio_recv is not None else DataStreamAudioReceiver(room),
        video_gen=generator,
        options=generator.avatar_options(),
    )
    await runner.start()
    return runner


AvatarMode = Literal["in_process", "participant"]

#: The identity the avatar joins the room with in ``mode="participant"``.
DEFAULT_AVATAR_IDENTITY = "avatarforcing-avatar"


class AvatarSession(_AvatarSessionBase):
    """An AvatarForcing avatar for a LiveKit ``AgentSession``, as the vendor avatar plugins are::

        avatar = AvatarSession(target="localhost:50051", image=open("face.png", "rb").read())
        await avatar.start(session, room=ctx.room)  # before session.start(...)

    ``start()`` opens a ``PACING_REALTIME`` session on the AvatarForcing server, wraps it in an
    :class:`AvatarForcingVideoGenerator` run by livekit-agents' ``AvatarRunner``, and makes the
    agent's speech go to the avatar instead of being published directly. Two modes:

    - ``mode="in_process"`` (the default): the avatar runs in the agent's process and publishes its
      video track and the re-timed audio track as the agent's own participant. The agent session's
      audio output becomes a ``QueueAudioOutput`` the runner reads. Needs no LiveKit credentials.
    - ``mode="participant"``: the avatar joins the room as its own participant
      (``avatar_participant_identity``, kind ``agent``, attribute ``lk.publish_on_behalf`` = the
      agent's identity, so frontends and the agent's RoomIO treat its tracks as the agent's), with a
      token it mints from the API key and secret given to :meth:`start` (or ``LIVEKIT_API_KEY`` /
      ``LIVEKIT_API_SECRET``; the URL from ``LIVEKIT_URL``). The agent's audio output becomes a
      ``DataStreamAudioOutput`` that streams the speech to that participant, which reports
      playback back over RPC.

    Either way an interruption (the agent session clears its audio output) reaches
    :meth:`AvatarForcingVideoGenerator.clear_buffer`, which sends ``Interrupt``: the server drops the
    speech it has not rendered and the audio it had rendered is muted; the runner reports the
    interrupted playback (``playback_finished`` with ``interrupted=True``) to the agent.

    Args:
        target: the AvatarForcing server (``host:port``, or several for failover; see
            :class:`~avatarforcing_client.AvatarForcingClient`).
        image: the face, PNG/JPEG bytes or a path to the file. Exactly one of ``image`` and ``avatar_id``.
        avatar_id: an avatar registered with ``AvatarForcingClient.register_avatar``.
        token: bearer token for the server (default ``$AVATARFORCING_TOKEN``).
        mode: ``"in_process"`` or ``"participant"`` (see above).
        avatar_participant_identity / avatar_participant_name: the avatar's participant in
            ``mode="participant"``.
        sample_rate: the session's rate (8000, 16000, 24000 or 48000); the agent's TTS audio is
            resampled to it by the agent session, and the avatar publishes its audio at this rate.
        video_encoding: how frames travel from the server (``pb.VIDEO_ENCODING_JPEG`` by default:
            independent frames at a modest bandwidth; ``RAW_RGB24`` for a server on the same host,
            ``H264`` for the least bandwidth).
        seed: the session's noise seed (0: random).
        client: an :class:`~avatarforcing_client.AvatarForcingClient` to use (not closed here)
            instead of opening one on ``target``.
        client_options: more keyword arguments for ``AvatarForcingClient`` (``credentials``, ...).
        session_options: more keyword arguments for ``client.session`` (``jpeg_quality``, ...).
    """

    def __init__(
        self,
        *,
        target: str | Sequence[str] | None = None,
        image: bytes | str | os.PathLike[str] | None = None,
        avatar_id: str | None = None,
        token: str | None = None,
        mode: AvatarMode = "in_process",
        avatar_participant_identity: str = DEFAULT_AVATAR_IDENTITY,
        avatar_participant_name: str = "AvatarForcing avatar",
        sample_rate: int = 24000,
        video_encoding: int = pb.VIDEO_ENCODING_JPEG,
        seed: int = 0,
        client: AvatarForcingClient | None = None,
        client_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("in_process", "participant"):
            raise ValueError(f"mode must be 'in_process' or 'participant', got {mode!r}")
        if (image is None) == (avatar_id is None):
            raise ValueError("give exactly one of image= (PNG/JPEG bytes or a path) and avatar_id=")
        if client is None and not target:
            raise ValueError("give target= (the AvatarForcing server, host:port) or client=")
        if sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SUPPORTED_SAMPLE_RATES}, got {sample_rate}")
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        self._target = target
        self._image = image
        self._avatar_id = avatar_id
        self._token = token
        self._mode: AvatarMode = mode
        self._identity = avatar_participant_identity
        self._name = avatar_participant_name
        self._sample_rate = sample_rate
        self._video_encoding = video_encoding
        self._seed = seed
        self._client = client
        self._own_client = client is None
        self._client_options = dict(client_options or {})
        self._session_options = dict(session_options or {})

        self._agent_identity: str | None = None
        self._avatar_room: rtc.Room | None = None
        self._generator: AvatarForcingVideoGenerator | None = None
        self._runner: AvatarRunner | None = None
        self._audio_output: AudioOutput | None = None
        self._runner_start: asyncio.Task[None] | None = None
        self._starting = False
        self._closed = False

    # -- the AvatarSession contract ------------------------------------------------------------

    @property
    def avatar_identity(self) -> str:
        """The participant that publishes the avatar: the agent itself in ``mode="in_process"``."""
        if self._mode == "participant":
            return self._identity
        if self._room is not None and self._room.isconnected():
            return self._room.local_participant.identity
        return self._agent_identity or self._identity

    @property
    def provider(self) -> str:
        return "avatarforcing"

    @property
    def mode(self) -> AvatarMode:
        return self._mode

    @property
    def generator(self) -> AvatarForcingVideoGenerator | None:
        """The generator (its session, counters) once started."""
        return self._generator

    @property
    def runner(self) -> AvatarRunner | None:
        return self._runner

    @property
    def audio_output(self) -> AudioOutput | None:
        """The audio output this avatar installed in the agent session (``playback_finished`` events)."""
        return self._audio_output

    @property
    def avatar_room(self) -> rtc.Room | None:
        """The avatar's own room connection in ``mode="participant"``."""
        return self._avatar_room

    async def start(
        self,
        agent_session: AgentSession,
        room: rtc.Room,
        *,
        livekit_url: str | None = None,
        livekit_api_key: str | None = None,
        livekit_api_secret: str | None = None,
    ) -> None:
        """Start the avatar and route ``agent_session``'s speech to it; call before ``session.start``.

        ``livekit_url``, ``livekit_api_key`` and ``livekit_api_secret`` are used in
        ``mode="participant"`` only (default: ``LIVEKIT_URL``, ``LIVEKIT_API_KEY``,
        ``LIVEKIT_API_SECRET``, which an agent worker has anyway).
        """
        if self._starting or self._closed:
            raise RuntimeError("AvatarSession.start() may be called once; create a new AvatarSession")
        self._starting = True
        if self._mode == "participant":
            url = livekit_url or os.environ.get("LIVEKIT_URL")
            key = livekit_api_key or os.environ.get("LIVEKIT_API_KEY")
            secret = livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET")
            missing = [n for n, v in (("livekit_url (LIVEKIT_URL)", url), ("livekit_api_key (LIVEKIT_API_KEY)", key),
                                      ("livekit_api_secret (LIVEKIT_API_SECRET)", secret)) if not v]
            if missing:
                raise ValueError("AvatarSession(mode='participant') needs " + ", ".join(missing))
        job = get_job_context(required=False)
        room_name = ""
        if room.isconnected():
            self._agent_identity = room.local_participant.identity
            room_name = room.name
        elif job is not None:
            self._agent_identity = job.local_participant_identity
            room_name = job.job.room.name
        elif self._mode == "participant":
            raise RuntimeError("connect the agent's room before AvatarSession.start() (outside an agent job)")
        await super().start(agent_session, room)
        try:
            if self._client is None:
                self._client = AvatarForcingClient(self._target or "", token=self._token, **self._client_options)
            self._generator = await AvatarForcingVideoGenerator.open(
                self._client, image=self._image, avatar_id=self._avatar_id, sample_rate=self._sample_rate,
                video_encoding=self._video_encoding, seed=self._seed, **self._session_options,
            )
            if self._mode == "in_process":
                queue = QueueAudioOutput(sample_rate=self._sample_rate, wait_playback_start=True)
                self._runner = AvatarRunner(room, audio_recv=queue, video_gen=self._generator,
                                            options=self._generator.avatar_options())
                await self._runner.start()
                self._audio_output = queue
            else:
                assert url and key and secret and self._agent_identity
                self._avatar_room = rtc.Room()
                await self._avatar_room.connect(url, self._mint_token(key, secret, room_name, self._agent_identity),
                                                rtc.RoomOptions(auto_subscribe=False))
                receiver = DataStreamAudioReceiver(self._avatar_room, sender_identity=self._agent_identity)
                self._runner = AvatarRunner(self._avatar_room, audio_recv=receiver, video_gen=self._generator,
                                            options=self._generator.avatar_options())
                if room.isconnected():
                    await self._runner.start()
                else:  # the receiver waits for the agent to join the room: do not hold up session.start()
                    self._runner_start = asyncio.create_task(self._start_runner_later(self._runner),
                                                             name="avatarforcing-runner-start")
                self._audio_output = DataStreamAudioOutput(
                    room, destination_identity=self._identity, sample_rate=self._sample_rate,
                    wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True,
                )
            agent_session.output.replace_audio_tail(self._audio_output)
        except BaseException:
            await self.aclose()
            raise
        log.info("avatar started (%s): session %s, %dx%d at %g fps", self._mode, self._generator.session.session_id,
                 self._generator.width, self._generator.height, self._generator.fps)

    def _mint_token(self, key: str, secret: str, room_name: str, agent_identity: str) -> str:
        """A token for the avatar's participant: this room only, publishing on the agent's behalf."""
        return (
            api.AccessToken(key, secret)
            .with_kind("agent")
            .with_identity(self._identity)
            .with_name(self._name)
            .with_grants(api.VideoGrants(room_join=True, room=room_name, can_publish=True, can_subscribe=True,
                                         can_publish_data=True))
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
            .to_jwt()
        )

    @staticmethod
    async def _start_runner_later(runner: AvatarRunner) -> None:
        try:
            await runner.start()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the avatar could not start")

    async def aclose(self) -> None:
        """Stop the avatar: its runner, its AvatarForcing session and (``mode="participant"``) its participant."""
        if self._closed:
            return
        self._closed = True
        if self._runner_start is not None:
            self._runner_start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner_start
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.aclose()
        if self._generator is not None:
            with contextlib.suppress(Exception):
                await self._generator.aclose()
        if self._client is not None and self._own_client:
            with contextlib.suppress(Exception):
                await self._client.close()
        if self._avatar_room is not None:
            with contextlib.suppress(Exception):
                await self._avatar_room.disconnect()
        if self._mode == "in_process" and self._room is not None:
            # The base class removes the avatar's participant from the room on close: in this mode
            # that participant is the agent itself, which stays.
            self._room.off("connection_state_changed", self._on_connection_state_changed)
            self._room = None
        await super().aclose()
