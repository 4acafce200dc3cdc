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

Routing and resume (many replicas, docs/routing.md): :meth:`Session.start` first asks any replica
(``CreateSession``) where the session should run, then opens the stream on that replica; a full
deployment (``RESOURCE_EXHAUSTED``) is retried for up to ``placement_timeout`` seconds. When the
stream breaks (the replica died: ``UNAVAILABLE``; or it drained: ``END_REASON_SERVER_SHUTDOWN``) the
session resumes by itself on another replica with the same session id and avatar: a fresh window
from the anchor, frame indices continuing after the last frame received, and the audio not yet
covered by received frames sent again from a bounded buffer (``resume_buffer_s``). Frames and
``AudioOut`` of a block already received are not yielded twice. :attr:`Session.resumes` counts the
resumes. A session that cannot be resumed within ``resume_timeout`` seconds raises the last status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
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
#: Trailing metadata of FAILED_PRECONDITION: the replica that owns the session.
OWNER_ADDRESS_KEY = "avatarforcing-owner-address"
_RETRY_PLACEMENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED)
#: Unary-call failures after which the next target is tried (the target is unreachable or silent).
_TRY_NEXT_TARGET = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Stream failures after which a session resumes on another replica.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def _trailer(e: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in e.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def _retry_after(e: grpc.aio.AioRpcError, default: float) -> float:
    v = _trailer(e, "retry-after-ms")
    try:
        return float(v) / 1000 if v else default
    except ValueError:
        return default


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
        target: ``host:port`` (or any gRPC target string) of the server, or of the load balancer in
            front of many replicas; a list of addresses is tried in turn for placement
            (``CreateSession``) and for the unary RPCs when one does not answer.
        credentials: channel credentials for TLS; ``None`` for a plaintext channel.
        metadata: ``(key, value)`` pairs sent with every call.
        options: extra gRPC channel options, appended to :data:`DEFAULT_CHANNEL_OPTIONS`.
        token: bearer token sent as ``authorization: Bearer <token>`` with every call (default: the
            environment variable ``AVATARFORCING_TOKEN``, if set).
        placement_timeout: seconds :meth:`Session.start` keeps retrying placement while every
            replica is full or unreachable.
        resume_timeout: seconds a broken session keeps trying to resume; 0 turns resuming off.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        placement_timeout: float = 10.0,
        resume_timeout: float = 15.0,
    ) -> None:
        self.targets: tuple[str, ...] = (target,) if isinstance(target, str) else tuple(target)
        if not self.targets:
            raise ValueError("target must name at least one address")
        self.target = self.targets[0]
        self._credentials = credentials
        token = token if token is not None else os.environ.get("AVATARFORCING_TOKEN")
        md = [(str(k), str(v)) for k, v in metadata]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(md)
        self._options = tuple(DEFAULT_CHANNEL_OPTIONS) + tuple(options)
        self.placement_timeout = placement_timeout
        self.resume_timeout = resume_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AvatarForcingStub | None = None
        self._replicas: dict[str, tuple[grpc.aio.Channel, pb_grpc.AvatarForcingStub]] = {}
        self._front = 0  # index of the target that answered last

    # -- channel lifecycle -------------------------------------------------------------------

    def _dial(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        return grpc.aio.secure_channel(address, self._credentials, options=self._options)

    def _ensure_stub(self) -> pb_grpc.AvatarForcingStub:
        if self._stub is None:
            self._channel = self._dial(self.target)
            self._stub = pb_grpc.AvatarForcingStub(self._channel)
        return self._stub

    def _stub_for(self, address: str) -> pb_grpc.AvatarForcingStub:
        """The stub of one replica (a channel per address, kept until :meth:`close`)."""
        if address == self.target:
            return self._ensure_stub()
        if address not in self._replicas:
            ch = self._dial(address)
            self._replicas[address] = (ch, pb_grpc.AvatarForcingStub(ch))
        return self._replicas[address][1]

    async def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        """One unary call, to each target in turn (starting with the one that answered last) while the
        target is unreachable (``UNAVAILABLE``: connection refused, reset, no route, ...) or does not answer
        in time (``DEADLINE_EXCEEDED``); any other status is the answer and is raised at once. When every
        target failed, the last target's error is raised."""
        err: grpc.aio.AioRpcError | None = None
        n = len(self.targets)
        for i in range(n):
            k = (self._front + i) % n
            stub = self._stub_for(self.targets[k])
            try:
                resp = await getattr(stub, method)(request, metadata=self._metadata, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() not in _TRY_NEXT_TARGET:
                    raise
                err = e
                continue
            self._front = k
            return resp
        assert err is not None
        raise err

    async def create_session(
        self, resume_session_id: str = "", session_token: str = "", *, timeout: float | None = 5.0
    ) -> pb.CreateSessionResponse:
        """Placement (``CreateSession``): which replica runs a new session, or where an existing one
        resumes. Tries each target in turn while one is ``UNAVAILABLE``. :meth:`Session.start` calls
        it for you."""
        resp: pb.CreateSessionResponse = await self._unary(
            "CreateSession",
            pb.CreateSessionRequest(resume_session_id=resume_session_id, session_token=session_token),
            timeout,
        )
        return resp

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
        replicas, self._replicas = self._replicas, {}
        for ch, _ in replicas.values():
            await ch.close(grace)
        if channel is not None:
            await channel.close(grace)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the channel is connected; raises :class:`asyncio.TimeoutError` on timeout."""
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    # -- unary RPCs --------------------------------------------------------------------------

    async def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """Return the server's model/stream configuration and capacity (``GetServerInfo``), from the
        first target that answers (see ``target``)."""
        info: pb.ServerInfo = await self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout)
        return info

    async def register_avatar(self, image: bytes, name: str = "", *, text_context: bytes = b"",
                              timeout: float | None = None) -> str:
        """Upload a PNG/JPEG reference image once and return its ``avatar_id``.

        The id can then be passed to :meth:`session` instead of the image, which saves
        re-uploading it and recomputing the avatar's style anchor for every session.
        ``text_context``: for a server running the published model, the bytes of a context file
        from ``avatarforcing encode-prompt`` (a prompt describing this person); sessions on the
        avatar attend to it instead of the server's default prompt.
        """
        if not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0:
            raise ValueError("image must be non-empty PNG or JPEG bytes")
        resp: pb.RegisterAvatarResponse = await self._unary(
            "RegisterAvatar",
            pb.RegisterAvatarRequest(image=bytes(image), name=name, text_context=bytes(text_context)),
            timeout,
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
        resume_buffer_s: float = 30.0,
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
            resume_buffer_s: audio kept for resuming on another replica: the audio sent but not yet
                covered by received frames, at most this many seconds (older audio is not re-sent).
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
        return Session(self, config, auto_keepalive=auto_keepalive, resume_buffer_s=resume_buffer_s)


class Session:
    """One ``Stream`` call: a lip-synced avatar session.

    Create it with :meth:`AvatarForcingClient.session` and enter it with ``async with``.
    Sending methods may be called concurrently from several tasks; :meth:`events` must be
    consumed by one task at a time. With ``auto_keepalive`` (the default) a background task
    started by :meth:`start` sends ``KeepAlive`` whenever nothing was sent for a third of
    ``SessionStarted.idle_timeout_ms``; it stops when the session is closed or has finished.
    """

    def __init__(self, client: AvatarForcingClient, config: pb.SessionConfig, *, auto_keepalive: bool = True,
                 resume_buffer_s: float = 30.0) -> None:
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
        # Routing and resume.
        self._session_id = ""
        self._token = ""
        self._routed = False  # placed by CreateSession (the server supports resuming)
        self.address = ""  # the replica the stream runs on
        self.resumes = 0  #: how many times the session resumed after its stream broke
        self.generation = 0  #: incremented by each resume
        self._resume_lock = asyncio.Lock()
        self._resume_buffer_s = resume_buffer_s
        self._sent = 0  # client samples sent (absolute position)
        self._consumed = 0  # client samples covered by fully received blocks
        self._buf: collections.deque[tuple[int, bytes]] = collections.deque()  # (start sample, pcm)
        self._eoa_sent = False
        self._end_by_block: dict[int, int] = {}  # AudioOut.source_end_sample of blocks not yet complete
        self._stream_base = 0  # client sample position where the current stream's audio starts
        self._last_index = -1  # last frame index yielded
        self._last_audio_block = -1

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> pb.SessionStarted:
        """Place the session (``CreateSession``), open the stream on the replica that owns it,
        send the config and wait for ``SessionStarted``.

        Raises:
            grpc.aio.AioRpcError: the server refused the session (e.g. ``RESOURCE_EXHAUSTED``
                when every replica stayed full for ``placement_timeout`` seconds,
                ``INVALID_ARGUMENT`` for a bad config, ``UNAUTHENTICATED`` without a valid token).
            ProtocolError: the server's first message was not ``SessionStarted``.
        """
        if self._call is not None:
            raise RuntimeError("session already started")
        if self._closed:
            raise SessionClosedError("session is closed")
        try:
            started, call = await self._place_and_open(resume=False)
        except BaseException:
            self._closed = True
            raise
        self._call = call
        self._started = started
        if started.session_token:  # placed implicitly by the server: its token resumes it
            self._token = started.session_token
            self._session_id = started.session_id
        self._start_keepalive()
        return started

    async def _open(self, stub: Any, resume_block: int) -> tuple[pb.SessionStarted, Any]:
        """One Stream call: config, then SessionStarted. Raises the call's status on refusal."""
        config = pb.SessionConfig()
        config.CopyFrom(self.config)
        if self._routed:
            config.session_id, config.session_token = self._session_id, self._token
            config.resume_block = resume_block
        call = stub.Stream(metadata=self._client.metadata)
        try:
            try:
                await call.write(pb.StreamRequest(config=config))
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                pass  # the call already failed; the read below raises the real status
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ProtocolError("server closed the stream without sending SessionStarted")
            which = resp.WhichOneof("message")
            if which != "started":
                raise ProtocolError(f"expected SessionStarted as the first response, got {which!r}")
            return resp.started, call
        except BaseException:
            call.cancel()
            raise

    async def _place_and_open(self, resume: bool) -> tuple[pb.SessionStarted, Any]:
        """Placement, then the stream on the replica it names; retries while replicas are full,
        unreachable or the session is owned elsewhere, up to the client's time limit."""
        client = self._client
        front = client._ensure_stub()
        if not resume and getattr(front, "CreateSession", None) is None:
            return await self._open(front, 0)  # a stand-in stub without routing
        limit = client.resume_timeout if resume else client.placement_timeout
        deadline = time.monotonic() + limit
        resume_block = self._resume_block() if resume else 0
        delay = 0.05
        address: str | None = None
        while True:
            try:
                if address is None:
                    try:
                        placed = await client.create_session(self._session_id if resume else "",
                                                             self._token if resume else "")
                    except grpc.aio.AioRpcError as e:
                        if e.code() != grpc.StatusCode.UNIMPLEMENTED or resume:
                            raise
                        return await self._open(front, 0)  # a server without routing
                    if not resume:
                        self._session_id, self._token = placed.session_id, placed.session_token
                    self._routed = True
                    address = placed.address
                started, call = await self._open(client._stub_for(address), resume_block)
                self.address = address
                return started, call
            except grpc.aio.AioRpcError as e:
                owner = _trailer(e, OWNER_ADDRESS_KEY) if e.code() == grpc.StatusCode.FAILED_PRECONDITION else None
                if owner is None and e.code() not in _RETRY_PLACEMENT:
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                address = owner  # dial the owner next; otherwise ask for placement again
                wait = _retry_after(e, delay) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else delay
                await asyncio.sleep(min(wait, max(deadline - time.monotonic(), 0)) * (0.5 + random.random()))
                delay = min(delay * 2, 0.5)

    # -- resume ------------------------------------------------------------------------------

    def _resume_block(self) -> int:
        """The first block not fully received: the resumed stream starts there."""
        if self._started is None or not self._started.frames_per_block:
            return 0
        return (self._last_index + 1) // self._started.frames_per_block

    def _can_resume(self) -> bool:
        return self._routed and self._client.resume_timeout > 0 and not self._closed and bool(self._token)

    async def _resume(self, broken: Any, cause: BaseException) -> None:
        """Moves the session to a new stream (another replica if the old one is gone), once per break."""
        async with self._resume_lock:
            if self._call is not broken:
                return  # another task resumed it already
            if not self._can_resume():
                raise cause
            broken.cancel()
            started, call = await self._place_and_open(resume=True)
            async with self._write_lock:
                self._call = call
                self._started = started
                self.generation += 1
                self.resumes += 1
                # The audio not covered by frames received yet, then EndOfAudio if it had been sent.
                self._stream_base = self._consumed
                self._end_by_block.clear()
                for start, pcm in list(self._buf):
                    skip = max(self._consumed - start, 0) * 2
                    if skip < len(pcm):
                        await call.write(pb.StreamRequest(audio=pb.AudioChunk(data=pcm[skip:])))
                if self._eoa_sent:
                    await call.write(pb.StreamRequest(end_of_audio=pb.EndOfAudio()))
                self._last_write = time.monotonic()
            if self._keepalive_task is not None and self._keepalive_task.done():
                self._keepalive_task = None  # it stopped when the old stream finished
            self._start_keepalive()

    def _track_audio(self, data: bytes) -> None:
        n = len(data) // 2
        self._buf.append((self._sent, data))
        self._sent += n
        self._eoa_sent = False
        self._trim()

    def _trim(self) -> None:
        rate = self.sample_rate or 16000
        keep_from = max(self._consumed, self._sent - int(self._resume_buffer_s * rate))
        while self._buf and self._buf[0][0] + len(self._buf[0][1]) // 2 <= keep_from:
            self._buf.popleft()

    def _on_event(self, which: str, payload: Any) -> bool:
        """Bookkeeping for resume; False: a duplicate of something yielded before a resume."""
        if which == "frame":
            if payload.index <= self._last_index:
                return False
            self._last_index = payload.index
            fpb = self._started.frames_per_block if self._started else 0
            if fpb and payload.index % fpb == fpb - 1:  # the block is complete: its audio is covered
                b = payload.index // fpb
                end = self._end_by_block.pop(b, None)
                for k in [k for k in self._end_by_block if k < b]:
                    del self._end_by_block[k]
                if end is not None:
                    self._consumed = max(self._consumed, self._stream_base + end)
                    self._trim()
        elif which == "audio":
            if payload.block_index <= self._last_audio_block:
                return False
            self._last_audio_block = payload.block_index
            self._end_by_block[payload.block_index] = payload.source_end_sample
        return True

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
        async with self._write_lock:
            call = self._call
            if self._closed:
                raise SessionClosedError("session is closed")
            which = req.WhichOneof("message")
            if which == "audio":
                self._track_audio(req.audio.data)
            elif which == "end_of_audio":
                self._eoa_sent = True
            elif which == "interrupt":  # the audio sent so far is void: never re-send it
                self._consumed = self._sent
                self._buf.clear()
            try:
                await call.write(req)
                self._last_write = time.monotonic()
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and not (task and task.cancelling()):
                    # The call was cancelled by close() from another task, not this task.
                    raise SessionClosedError("session was closed while sending") from None
                if self._call is not call and not (task and task.cancelling()):
                    pass  # cancelled by a resume in another task: handled below
                else:
                    raise
                broken: BaseException = asyncio.InvalidStateError("stream replaced")
            except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as e:
                broken = e
        # The stream broke. Audio is in the resume buffer and EndOfAudio is replayed; KeepAlive and
        # Interrupt need no replay (a resumed stream starts with an empty server-side buffer).
        if self._call is not call:
            return  # already resumed by another task, which replayed what this write carried
        code = broken.code() if isinstance(broken, grpc.aio.AioRpcError) else await call.code()
        if self._resume_lock.locked() or (code in _RESUMABLE and self._can_resume()):
            await self._resume(call, broken)
            return
        if isinstance(broken, grpc.aio.AioRpcError):
            raise broken
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            raise grpc.aio.AioRpcError(
                code,
                await call.initial_metadata(),
                await call.trailing_metadata(),
                await call.details(),
                await call.debug_error_string(),
            ) from broken
        raise SessionClosedError(f"the session's stream has finished ({code.name})") from broken

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
        self._reading = True
        try:
            while not self._finished:
                call = self._call
                try:
                    resp = await call.read()
                except asyncio.CancelledError as e:
                    task = asyncio.current_task()
                    if task and task.cancelling():
                        raise
                    if self._closed:
                        return  # closed locally by another task: end of events
                    if not self._can_resume():
                        raise
                    await self._resume(call, e)  # cancelled by a resume in another task: wait for it
                    continue
                except asyncio.InvalidStateError as e:
                    if self._closed:
                        return
                    if not self._can_resume():
                        raise
                    await self._resume(call, e)
                    continue
                except grpc.aio.AioRpcError as e:
                    if self._closed and e.code() == grpc.StatusCode.CANCELLED:
                        return  # our own cancellation, seen as a status
                    if self._call is not call or (e.code() in _RESUMABLE and self._can_resume()):
                        await self._resume(call, e)
                        continue
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
                    if resp.end.reason == pb.END_REASON_SERVER_SHUTDOWN and self._can_resume():
                        # The replica drains or stops: go on on another one.
                        await self._resume(call, ProtocolError(resp.end.message))
                        continue
                    self._end = resp.end
                    self._finished = True
                elif not self._on_event(which, payload):
                    continue
                yield payload
        finally:
            self._reading = False
