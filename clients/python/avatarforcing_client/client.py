"""Asyncio client for the AvatarForcing Serve gRPC API.

Typical use::

    async with AvatarForcingClient("localhost:50051") as client:
        async with client.session(image=png_bytes, pacing=pb.PACING_ASAP) as s:
            sender = asyncio.create_task(s.stream_wav("speech_16k.wav", realtime=False))
            async for ev in s.events():
                if isinstance(ev, pb.VideoFrame):
                    ...
            await sender

A :class:`Session` wraps one ``Stream`` call: it sends the ``SessionConfig``, waits for
``SessionStarted``, and then lets several tasks send audio and control messages (writes are
serialised by a lock) while one task reads the responses with :meth:`Session.events`. While the
session is open it sends ``KeepAlive`` by itself whenever nothing was sent for a third of the
server's idle timeout (``SessionStarted.idle_timeout_ms``), so a client that only listens is not
ended with ``END_REASON_IDLE_TIMEOUT``; ``client.session(..., auto_keepalive=False)`` turns that off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio

from .audio import pcm_chunks, read_wav
from .v1 import avatarforcing_pb2 as pb
from .v1 import avatarforcing_pb2_grpc as pb_grpc

__all__ = [
    "AvatarForcingClient",
    "Session",
    "Event",
    "SessionClosedError",
    "ProtocolError",
    "DEFAULT_CHANNEL_OPTIONS",
]

#: One payload of a ``StreamResponse`` after ``SessionStarted``, as yielded by :meth:`Session.events`.
Event: TypeAlias = pb.VideoFrame | pb.AudioOut | pb.Stats | pb.End

#: Channel options used unless overridden: raw RGB frames and reference images can exceed
#: gRPC's default 4 MiB message limit.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


_CLOSE_WAIT_S = 1.0


class SessionClosedError(RuntimeError):
    """Raised when sending on a session that was closed or whose stream has finished."""


class ProtocolError(RuntimeError):
    """Raised when the server's responses do not follow the protocol (e.g. no SessionStarted)."""


class AvatarForcingClient:
    """Async client owning one ``grpc.aio`` channel to an AvatarForcing server.

    Use it as an async context manager (``async with AvatarForcingClient(target) as c:``) or
    call :meth:`close` yourself. The channel is created lazily, inside the running event loop,
    on the first RPC (or on ``__aenter__``), so constructing the client never connects.

    Args:
        target: ``host:port`` (or any gRPC target string) of the server.
        credentials: channel credentials for TLS; ``None`` for a plaintext channel.
        metadata: ``(key, value)`` pairs sent with every call (e.g. an auth token).
        options: extra gRPC channel options, appended to :data:`DEFAULT_CHANNEL_OPTIONS`.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._credentials = credentials
        self._metadata: tuple[tuple[str, str], ...] = tuple((str(k), str(v)) for k, v in metadata)
        self._options = tuple(DEFAULT_CHANNEL_OPTIONS) + tuple(options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AvatarForcingStub | None = None

    # -- channel lifecycle -------------------------------------------------------------------

    def _ensure_stub(self) -> pb_grpc.AvatarForcingStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._options
                )
            self._stub = pb_grpc.AvatarForcingStub(self._channel)
        return self._stub

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel (created on first access; must be inside the event loop)."""
        self._ensure_stub()
        assert self._channel is not None
        return self._channel

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent with every call."""
        return self._metadata

    async def __aenter__(self) -> AvatarForcingClient:
        self._ensure_stub()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (cancelling calls still running after ``grace`` seconds)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; raises :class:`asyncio.TimeoutError` on timeout."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    # -- unary RPCs --------------------------------------------------------------------------

    async def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """Return the server's model/stream configuration and capacity (``GetServerInfo``)."""
        stub = self._ensure_stub()
        info: pb.ServerInfo = await stub.GetServerInfo(
            pb.GetServerInfoRequest(), metadata=self._metadata, timeout=timeout
        )
        return info

    async def register_avatar(self, image: bytes, name: str = "", *, timeout: float | None = None) -> str:
        """Upload a PNG/JPEG reference image once and return its ``avatar_id``.

        The id can then be passed to :meth:`session` instead of the image, which saves
        re-uploading it and recomputing the avatar's style anchor for every session.
        """
        if not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0:
            raise ValueError("image must be non-empty PNG or JPEG bytes")
        stub = self._ensure_stub()
        resp: pb.RegisterAvatarResponse = await stub.RegisterAvatar(
            pb.RegisterAvatarRequest(image=bytes(image), name=name),
            metadata=self._metadata,
            timeout=timeout,
        )
        return resp.avatar_id

    # -- sessions ----------------------------------------------------------------------------

    def session(
        self,
        *,
        image: bytes | None = None,
        avatar_id: str | None = None,
        sample_rate: int = 16000,
        video_encoding: int = pb.VIDEO_ENCODING_H264,
        pacing: int = pb.PACING_REALTIME,
        utterance_id: str = "",
        seed: int = 0,
        jpeg_quality: int = 0,
        video_bitrate_bps: int = 0,
        auto_keepalive: bool = True,
    ) -> Session:
        """Prepare a streaming session; open it with ``async with client.session(...) as s:``.

        Exactly one of ``image`` (PNG/JPEG bytes) and ``avatar_id`` (from
        :meth:`register_avatar`) must be given; otherwise :class:`ValueError` is raised here,
        before any RPC. Nothing is sent until the session is entered (or :meth:`Session.start`
        is awaited).

        Args:
            sample_rate: sample rate of the PCM16LE mono audio you will send (8000, 16000,
                24000 or 48000); ``AudioOut`` comes back at the same rate.
            video_encoding: a ``pb.VideoEncoding`` value for the returned frames.
            pacing: ``pb.PACING_REALTIME`` (wall-clock frames, idles on silence) or
                ``pb.PACING_ASAP`` (as fast as possible; the stream ends after end_of_audio).
            utterance_id: optional caller id echoed in ``Stats`` and server logs.
            seed: noise seed (0: random); same seed and audio give the same video.
            jpeg_quality: 1..100 for ``VIDEO_ENCODING_JPEG`` (0: server default).
            video_bitrate_bps: H.264/fMP4 target bitrate (0: encoder default).
            auto_keepalive: send ``KeepAlive`` whenever nothing was sent for a third of the
                server's idle timeout (``SessionStarted.idle_timeout_ms``), from a background
                task that lives as long as the session; ``False``: call
                :meth:`Session.keep_alive` yourself if you may be quiet that long.
        """
        if (image is None) == (avatar_id is None):
            raise ValueError("pass exactly one of image= (PNG/JPEG bytes) and avatar_id=")
        if image is not None and (not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0):
            raise ValueError("image must be non-empty PNG or JPEG bytes")
        if avatar_id is not None and (not isinstance(avatar_id, str) or not avatar_id):
            raise ValueError("avatar_id must be a non-empty string")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if not 0 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 0..100, got {jpeg_quality}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        config = pb.SessionConfig(
            audio_format=pb.AudioFormat(
                encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=int(sample_rate), channels=1
            ),
            video_encoding=video_encoding,  # type: ignore[arg-type]
            pacing=pacing,  # type: ignore[arg-type]
            utterance_id=utterance_id,
            jpeg_quality=int(jpeg_quality),
            video_bitrate_bps=int(video_bitrate_bps),
            seed=int(seed),
        )
        if image is not None:
            config.reference_image = bytes(image)
        else:
            assert avatar_id is not None
            config.avatar_id = avatar_id
        return Session(self, config, auto_keepalive=auto_keepalive)


class Session:
    """One ``Stream`` call: a lip-synced avatar session.

    Create it with :meth:`AvatarForcingClient.session` and enter it with ``async with``.
    Sending methods may be called concurrently from several tasks; :meth:`events` must be
    consumed by one task at a time. With ``auto_keepalive`` (the default) a background task
    started by :meth:`start` sends ``KeepAlive`` whenever nothing was sent for a third of
    ``SessionStarted.idle_timeout_ms``; it stops when the session is closed or has finished.
    """

    def __init__(self, client: AvatarForcingClient, config: pb.SessionConfig, *, auto_keepalive: bool = True) -> None:
        self._client = client
        self.config = config
        self.auto_keepalive = auto_keepalive
        self._last_write = time.monotonic()  # when the last message was handed to the stream
        self._keepalive_task: asyncio.Task[None] | None = None
        self._stop_keepalive = asyncio.Event()
        self._call: Any = None  # grpc.aio.StreamStreamCall
        self._started: pb.SessionStarted | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._reading = False
        self._end: pb.End | None = None
        self._finished = False  # End received or server closed the stream

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> pb.SessionStarted:
        """Open the stream, send the config and wait for ``SessionStarted``.

        Raises:
            grpc.aio.AioRpcError: the server refused the session (e.g. ``RESOURCE_EXHAUSTED``
                when it has no free slot, ``INVALID_ARGUMENT`` for a bad config).
            ProtocolError: the server's first message was not ``SessionStarted``.
        """
        if self._call is not None:
            raise RuntimeError("session already started")
        if self._closed:
            raise SessionClosedError("session is closed")
        stub = self._client._ensure_stub()
        call = stub.Stream(metadata=self._client.metadata)
        self._call = call
        try:
            try:
                await call.write(pb.StreamRequest(config=self.config))
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                # The call already failed; the read below raises the real status.
                pass
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ProtocolError("server closed the stream without sending SessionStarted")
            which = resp.WhichOneof("message")
            if which != "started":
                raise ProtocolError(f"expected SessionStarted as the first response, got {which!r}")
            self._started = resp.started
            self._start_keepalive()
            return resp.started
        except BaseException:
            self._closed = True
            call.cancel()
            raise

    async def close(self) -> None:
        """Half-close the request stream and cancel the call if it is still running.

        Idempotent; called when leaving the ``async with`` block. A concurrent :meth:`events`
        loop then ends quietly and later sends raise :class:`SessionClosedError`. If a send
        stays blocked (the server stopped reading) the half-close is skipped after one second.
        """
        if self._closed:
            return
        self._closed = True
        self._stop_keepalive.set()
        call = self._call
        if call is None:
            return
        try:
            # A write blocked by flow control (a server that stopped reading) must not block
            # close(): give up on the graceful half-close after a short wait and cancel.
            async with asyncio.timeout(_CLOSE_WAIT_S), self._write_lock:
                if not call.done():
                    await call.done_writing()
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            if not call.done():
                call.cancel()
            await self._join_keepalive()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (or start failed)."""
        return self._closed

    # -- SessionStarted ----------------------------------------------------------------------

    @property
    def started(self) -> pb.SessionStarted:
        """The server's ``SessionStarted`` message."""
        if self._started is None:
            raise RuntimeError("session not started; use 'async with client.session(...) as s'")
        return self._started

    @property
    def session_id(self) -> str:
        return self.started.session_id

    @property
    def fps(self) -> float:
        return self.started.fps

    @property
    def width(self) -> int:
        return self.started.width

    @property
    def height(self) -> int:
        return self.started.height

    @property
    def video_encoding(self) -> int:
        """The encoding of ``VideoFrame.data`` (from ``SessionStarted``, else the config)."""
        if self._started is not None and self._started.video_encoding:
            return self._started.video_encoding
        return self.config.video_encoding

    @property
    def init_segment(self) -> bytes:
        """fMP4 initialization segment (empty for other encodings)."""
        return self.started.init_segment

    @property
    def sample_rate(self) -> int:
        """Sample rate of the audio sent (as configured)."""
        return self.config.audio_format.sample_rate_hz

    @property
    def output_sample_rate(self) -> int:
        """Sample rate of ``AudioOut.data`` (from ``SessionStarted``, else the input rate)."""
        if self._started is not None and self._started.audio_sample_rate_hz:
            return self._started.audio_sample_rate_hz
        return self.sample_rate

    @property
    def end(self) -> pb.End | None:
        """The ``End`` message once received, else ``None``."""
        return self._end

    # -- sending -----------------------------------------------------------------------------

    async def _write(self, req: pb.StreamRequest) -> None:
        if self._call is None:
            raise RuntimeError("session not started")
        if self._closed:
            raise SessionClosedError("session is closed")
        call = self._call
        async with self._write_lock:
            if self._closed:
                raise SessionClosedError("session is closed")
            try:
                await call.write(req)
                self._last_write = time.monotonic()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and not (task and task.cancelling()):
                    # The call was cancelled by close() from another task, not this task.
                    raise SessionClosedError("session was closed while sending") from None
                raise
            except asyncio.InvalidStateError as e:
                # The RPC finished: surface the server's error status if there is one.
                code = await call.code()
                if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                    raise grpc.aio.AioRpcError(
                        code,
                        await call.initial_metadata(),
                        await call.trailing_metadata(),
                        await call.details(),
                        await call.debug_error_string(),
                    ) from e
                raise SessionClosedError(f"the session's stream has finished ({code.name})") from e

    # -- automatic KeepAlive -----------------------------------------------------------------

    @property
    def keepalive_interval(self) -> float | None:
        """Seconds of quiet after which the automatic ``KeepAlive`` goes out (a third of the
        server's idle timeout), or ``None`` when none is sent (``auto_keepalive=False``, the
        server announced no idle timeout, or the session has not started)."""
        if not self.auto_keepalive or self._started is None or self._started.idle_timeout_ms <= 0:
            return None
        return self._started.idle_timeout_ms / 1000.0 / 3.0

    def _start_keepalive(self) -> None:
        interval = self.keepalive_interval
        if interval is not None and self._keepalive_task is None:
            self._last_write = time.monotonic()  # the config was just written
            self._keepalive_task = asyncio.create_task(
                self._keepalive_loop(interval), name=f"avatarforcing-keepalive-{self.session_id}"
            )

    def _keepalive_done(self) -> bool:
        return self._closed or self._finished or self._call is None or self._call.done()

    async def _keepalive_loop(self, interval: float) -> None:
        """Send ``KeepAlive`` whenever nothing was written for ``interval`` seconds."""
        try:
            while not self._keepalive_done():
                wait = self._last_write + interval - time.monotonic()
                if wait > 0:
                    # Woken early by close(); otherwise re-check when the quiet period would end.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._stop_keepalive.wait()
                    continue
                await self.keep_alive()
        except (SessionClosedError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the session ended: events() or the next send reports how

    async def _join_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is None or task is asyncio.current_task():
            return
        if not task.done():
            # It wakes on _stop_keepalive; a KeepAlive it is writing ends with the call.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), _CLOSE_WAIT_S)
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def send_audio(self, pcm: bytes) -> None:
        """Send PCM16LE mono audio at the session's sample rate.

        Raises :class:`ValueError` if ``pcm`` has an odd number of bytes. Empty chunks are
        ignored.
        """
        if not isinstance(pcm, bytes | bytearray | memoryview):
            raise TypeError(f"pcm must be bytes, got {type(pcm).__name__}")
        data = bytes(pcm)
        if len(data) % 2:
            raise ValueError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
        if not data:
            return
        await self._write(pb.StreamRequest(audio=pb.AudioChunk(data=data)))

    async def interrupt(self) -> None:
        """Drop the audio buffered on the server and not yet rendered; the avatar goes idle."""
        await self._write(pb.StreamRequest(interrupt=pb.Interrupt()))

    async def end_of_audio(self) -> None:
        """Tell the server no more audio is coming for now (ASAP sessions then end)."""
        await self._write(pb.StreamRequest(end_of_audio=pb.EndOfAudio()))

    async def keep_alive(self) -> None:
        """Reset the session's idle timer."""
        await self._write(pb.StreamRequest(keep_alive=pb.KeepAlive()))

    async def stream_pcm(
        self,
        chunks: AsyncIterable[bytes] | Iterable[bytes],
        *,
        realtime: bool = True,
        end: bool = True,
    ) -> int:
        """Send a sequence of PCM16LE chunks; returns the number of samples sent.

        With ``realtime=True`` the audio goes out no faster than real time: each chunk is sent
        when the monotonic clock, measured from the first chunk, reaches the duration of the
        audio sent before it. Chunks of odd length are re-joined so that only whole samples
        are sent; a dangling byte at the very end raises :class:`ValueError`. With
        ``end=True`` :meth:`end_of_audio` is sent afterwards.
        """
        rate = self.sample_rate
        sent = 0
        t0: float | None = None
        carry = b""

        async def send(data: bytes) -> None:
            nonlocal sent, t0
            if not data:
                return
            if realtime:
                if t0 is None:
                    t0 = time.monotonic()
                else:
                    delay = t0 + sent / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
            await self.send_audio(data)
            sent += len(data) // 2

        async def handle(chunk: bytes) -> None:
            nonlocal carry
            data = carry + bytes(chunk)
            cut = len(data) - (len(data) % 2)
            carry = data[cut:]
            await send(data[:cut])

        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                await handle(chunk)
        else:
            for chunk in chunks:
                await handle(chunk)
        if carry:
            raise ValueError("PCM16 audio ended with a dangling byte (odd total length)")
        if end:
            await self.end_of_audio()
        return sent

    async def stream_wav(
        self,
        path: str | os.PathLike[str],
        *,
        realtime: bool = True,
        chunk_ms: int = 20,
        end: bool = True,
    ) -> int:
        """Send a mono 16-bit WAV file in ``chunk_ms`` chunks (see :meth:`stream_pcm`).

        The file's sample rate must equal the session's; no resampling is done. Returns the
        number of samples sent.
        """
        samples, rate = await asyncio.to_thread(read_wav, path)
        if rate != self.sample_rate:
            raise ValueError(
                f"{os.fspath(path)} is sampled at {rate} Hz but the session was opened with "
                f"sample_rate={self.sample_rate}; resample the file or open the session with "
                f"sample_rate={rate}"
            )
        return await self.stream_pcm(pcm_chunks(samples, rate, chunk_ms), realtime=realtime, end=end)

    # -- receiving ---------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[Event, None]:
        """Yield the session's responses in order: ``pb.VideoFrame``, ``pb.AudioOut``,
        ``pb.Stats`` and finally ``pb.End``.

        Stops after ``End``, when the server closes the stream, or when the session is closed
        from another task. Raises :class:`grpc.aio.AioRpcError` if the RPC fails.
        """
        if self._call is None:
            raise RuntimeError("session not started")
        if self._reading:
            raise RuntimeError("events() is already being consumed by another task")
        call = self._call
        self._reading = True
        try:
            while not self._finished:
                try:
                    resp = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed and not (task and task.cancelling()):
                        return  # closed locally by another task: end of events
                    raise
                except asyncio.InvalidStateError:
                    if self._closed:
                        return
                    raise
                except grpc.aio.AioRpcError as e:
                    if self._closed and e.code() == grpc.StatusCode.CANCELLED:
                        return  # our own cancellation, seen as a status
                    raise
                if resp is grpc.aio.EOF:
                    self._finished = True
                    return
                which = resp.WhichOneof("message")
                if which is None:
                    continue  # a message type newer than this client
                if which == "started":
                    raise ProtocolError("unexpected second SessionStarted")
                payload: Event = getattr(resp, which)
                if which == "end":
                    self._end = resp.end
                    self._finished = True
                yield payload
        finally:
            self._reading = False
