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

Liveness (a replica that freezes instead of dying): every channel sends HTTP/2 keepalive pings
(``keepalive_time_s``), so a connection whose peer stopped answering is closed by gRPC; a started
``PACING_REALTIME`` session whose stream delivers nothing for ``stall_timeout`` seconds (the server
sends frames continuously in that pacing, silence included) is treated as broken and resumed like one
that failed with ``UNAVAILABLE``; each ``CreateSession`` attempt and each stream attach
(``attach_timeout``) has its own deadline inside ``placement_timeout``/``resume_timeout``, so
:meth:`Session.start` and a resume end in time even when a replica accepts connections but never
answers. A stream refused because the replica does not know the session's avatar (``NOT_FOUND``) is
opened again once after the client registered the avatar again from the image it kept
(``avatar_cache_size``).

Layout: this module holds the client (channels, unary calls to the targets in turn) and :class:`Session`
(sending, resuming, reading); the pieces they use live next to it, each with one concern: :mod:`.placement`
(placing a session and opening its stream on the replica named, with the retries and the server's hints),
:mod:`.stream` (the ``Stream`` call: opening it, reading it within a limit), :mod:`.resume` (what is kept and
deduplicated for a resume, a plain object), :mod:`.liveness` (channel keepalive, the automatic ``KeepAlive``,
the stall limit) and :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import collections
import numbers
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, Collection, Iterable, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb
from avatarforcing_proto.v1 import avatarforcing_pb2_grpc as pb_grpc

from .audio import pcm_chunks, read_wav
from .errors import ProtocolError, SessionClosedError, StreamStalledError, status_error
from .liveness import CLOSE_WAIT_S, KeepAliveSender, keepalive_options, stall_limit
from .placement import RESUMABLE, TRY_NEXT_TARGET, Placement
from .resume import ResumeState
from .stream import read_within

__all__ = [
    "AvatarForcingClient",
    "Session",
    "Event",
    "SessionClosedError",
    "ProtocolError",
    "StreamStalledError",
    "DEFAULT_CHANNEL_OPTIONS",
    "keepalive_options",
]

#: One payload of a ``StreamResponse`` after ``SessionStarted``, as yielded by :meth:`Session.events`.
Event: TypeAlias = pb.VideoFrame | pb.AudioOut | pb.Stats | pb.End

#: Channel options used unless overridden: raw RGB frames and reference images can exceed
#: gRPC's default 4 MiB message limit.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def _merge_options(*groups: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Channel options with later groups overriding earlier ones key by key (gRPC itself does not say
    which of two equal keys wins)."""
    merged: dict[str, Any] = {}
    for group in groups:
        for k, v in group:
            merged.pop(k, None)
            merged[k] = v
    return tuple(merged.items())


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
        options: extra gRPC channel options; they override :data:`DEFAULT_CHANNEL_OPTIONS` and the
            keepalive options key by key.
        token: bearer token sent as ``authorization: Bearer <token>`` with every call (default: the
            environment variable ``AVATARFORCING_TOKEN``, if set).
        placement_timeout: the longest :meth:`Session.start` takes: it keeps retrying placement while
            every replica is full, unreachable or does not answer, then raises the last status
            (``DEADLINE_EXCEEDED`` when the time ran out inside an attempt).
        resume_timeout: the longest a broken session keeps trying to resume (``UNAVAILABLE``, full
            replicas and silent replicas are retried; ``NOT_FOUND`` is final); 0 turns resuming off.
        keepalive_time_s: HTTP/2 keepalive: every channel the client dials pings its server after this
            many seconds without activity, also while no call runs, so a connection to a replica that
            froze or vanished behind a network fault is closed (its calls fail with ``UNAVAILABLE``)
            instead of waiting for TCP. ``None`` or 0: no pings. The AvatarForcing server accepts a
            ping every 5 s or more (see :func:`keepalive_options`).
        keepalive_timeout_s: how long a keepalive ping may go unanswered before the connection is
            closed.
        stall_timeout: a started ``PACING_REALTIME`` session whose stream delivers no message at all
            for this many seconds (never less than two blocks of frames; the first message after
            ``SessionStarted`` may take ``latency_ms`` longer) counts as broken: it resumes on
            another replica as after ``UNAVAILABLE``, or, when it cannot resume, :meth:`Session.events`
            raises :class:`StreamStalledError`. Only the time :meth:`Session.events` spends waiting
            counts. ``None`` or 0: no watchdog. ``PACING_ASAP`` sessions never use it (the server may
            pause their stream while the reader is slow).
        attach_timeout: the longest one stream attach (config sent, ``SessionStarted`` received) may
            take inside placement or resume; an attach that runs out is cancelled and placement is
            asked again, as after ``UNAVAILABLE``. Each ``CreateSession`` attempt gets up to 2 s. Both
            are cut to the time left of ``placement_timeout`` (``resume_timeout``).
        avatar_cache_size: how many avatars registered with :meth:`register_avatar` the client keeps
            (image and text context, least recently used dropped first) so that a stream refused
            because a replica lost the avatar (``NOT_FOUND`` naming the avatar) can register it again
            and attach once more; 0 keeps none.
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
        keepalive_time_s: float | None = 10.0,
        keepalive_timeout_s: float = 5.0,
        stall_timeout: float | None = 1.0,
        attach_timeout: float = 3.0,
        avatar_cache_size: int = 64,
    ) -> None:
        if attach_timeout <= 0:
            raise ValueError(f"attach_timeout must be > 0, got {attach_timeout}")
        if stall_timeout is not None and stall_timeout < 0:
            raise ValueError(f"stall_timeout must be >= 0 (0 or None: off), got {stall_timeout}")
        if avatar_cache_size < 0:
            raise ValueError(f"avatar_cache_size must be >= 0, got {avatar_cache_size}")
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
        self._options = _merge_options(DEFAULT_CHANNEL_OPTIONS,
                                       keepalive_options(keepalive_time_s, keepalive_timeout_s), options)
        self.placement_timeout = placement_timeout
        self.resume_timeout = resume_timeout
        self.stall_timeout = stall_timeout or None
        self.attach_timeout = attach_timeout
        self.avatar_cache_size = avatar_cache_size
        # avatar_id -> (image, name, text_context) of the avatars this client registered (LRU).
        self._avatars: collections.OrderedDict[str, tuple[bytes, str, bytes]] = collections.OrderedDict()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.AvatarForcingStub | None = None
        self._replicas: dict[str, tuple[grpc.aio.Channel, pb_grpc.AvatarForcingStub]] = {}
        self._front = 0  # index of the target that answered last

    # -- channel lifecycle -------------------------------------------------------------------

    @property
    def channel_options(self) -> tuple[tuple[str, Any], ...]:
        """The options every channel of this client is dialed with (defaults, keepalive, ``options``)."""
        return self._options

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

    async def _unary(self, method: str, request: Any, timeout: float | None, *, deadline: float | None = None,
                     avoid: Collection[str] = (), failed: set[str] | None = None) -> Any:
        """One unary call, to each target in turn (starting with the one that answered last) while the
        target is unreachable (``UNAVAILABLE``: connection refused, reset, no route, ...) or does not answer
        in time (``DEADLINE_EXCEEDED``); any other status is the answer and is raised at once. When every
        target failed, the last target's error is raised.

        ``timeout`` bounds each attempt; ``deadline`` (``time.monotonic()``) bounds them all: an attempt gets
        at most the time left, and none starts after it (``DEADLINE_EXCEEDED`` when none could). Targets in
        ``avoid`` (a replica that just stopped answering) are tried last; targets that did not answer are
        added to ``failed``."""
        err: grpc.aio.AioRpcError | None = None
        targets = tuple(self.targets)  # a snapshot: the caller may replace the list while this call runs
        n = len(targets)
        order = [(self._front + i) % n for i in range(n)]
        if avoid:
            order.sort(key=lambda k: targets[k] in avoid)  # stable: the others keep their turn
        for k in order:
            t = timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                t = left if t is None else min(t, left)
            stub = self._stub_for(targets[k])
            try:
                resp = await getattr(stub, method)(request, metadata=self._metadata, timeout=t)
            except grpc.aio.AioRpcError as e:
                if e.code() not in TRY_NEXT_TARGET:
                    raise
                if failed is not None:
                    failed.add(targets[k])
                err = e
                continue
            self._front = k
            return resp
        if err is None:
            raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: no time left to call any target")
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

        The client keeps the image and context of the last ``avatar_cache_size`` avatars it registered:
        when a session's stream is refused because a replica no longer knows the avatar (its routing
        store lost it), the session registers it again and attaches once more by itself.
        """
        if not isinstance(image, bytes | bytearray | memoryview) or len(image) == 0:
            raise ValueError("image must be non-empty PNG or JPEG bytes")
        return await self._register(bytes(image), name, bytes(text_context), timeout)

    async def _register(self, image: bytes, name: str, text_context: bytes, timeout: float | None, *,
                        deadline: float | None = None) -> str:
        resp: pb.RegisterAvatarResponse = await self._unary(
            "RegisterAvatar", pb.RegisterAvatarRequest(image=image, name=name, text_context=text_context),
            timeout, deadline=deadline)
        self._keep_avatar(resp.avatar_id, (image, name, text_context))
        return resp.avatar_id

    def _keep_avatar(self, avatar_id: str, entry: tuple[bytes, str, bytes]) -> None:
        if self.avatar_cache_size <= 0 or not avatar_id:
            return
        self._avatars[avatar_id] = entry
        self._avatars.move_to_end(avatar_id)
        while len(self._avatars) > self.avatar_cache_size:
            self._avatars.popitem(last=False)

    async def _reregister(self, avatar_id: str, deadline: float) -> str | None:
        """Registers a kept avatar again (``RegisterAvatar`` on the targets, as usual); returns its id
        (normally ``avatar_id`` itself: ids derive from the content), or None when it was not kept."""
        entry = self._avatars.get(avatar_id)
        if entry is None:
            return None
        new_id = await self._register(*entry, self.attach_timeout, deadline=deadline)
        if new_id != avatar_id:
            self._keep_avatar(avatar_id, entry)  # sessions configured with the old id still find it
        return new_id

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
            sample_rate: sample rate of the PCM16LE mono audio you will send: any rate from
                8000 to 48000 Hz with a whole number of samples per video frame at the model's
                fps (at 25 fps a multiple of 25 Hz: 16000, 22050, 24000, 44100, 48000...; the
                server refuses others with INVALID_ARGUMENT). The server resamples to the
                model's rate; ``AudioOut`` comes back at this rate.
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
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or not (
            8000 <= int(sample_rate) <= 48000
        ):
            raise ValueError(
                f"sample_rate must be an integer from 8000 to 48000 Hz (16000, 22050, 24000, 44100, 48000...), "
                f"got {sample_rate!r}"
            )
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
        self._keepalive = KeepAliveSender(self.keep_alive, self._keepalive_done)
        self._call: Any = None  # grpc.aio.StreamStreamCall
        self._started: pb.SessionStarted | None = None
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._reading = False
        self._end: pb.End | None = None
        self._finished = False  # End received or server closed the stream
        # Routing and resume.
        self._placement = Placement(client, config)
        self.resumes = 0  #: how many times the session resumed after its stream broke
        self.generation = 0  #: incremented by each resume
        self._resume_lock = asyncio.Lock()
        self._state = ResumeState(config.audio_format.sample_rate_hz, resume_buffer_s)
        self._awaiting_first = True  # no response read yet on the current stream (stall watchdog)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> pb.SessionStarted:
        """Place the session (``CreateSession``), open the stream on the replica that owns it,
        send the config and wait for ``SessionStarted``.

        It takes at most the client's ``placement_timeout`` (plus the moment it takes to cancel the
        attempt that was running), replicas that accept connections but never answer included: each
        ``CreateSession`` attempt and each attach has its own deadline (see ``attach_timeout``), after
        which the next target is tried or placement is asked again. When the replica answers that it
        does not know the session's ``avatar_id`` (``NOT_FOUND``) and the client registered that
        avatar itself, it is registered again and the attach is tried once more.

        Raises:
            grpc.aio.AioRpcError: the server refused the session (e.g. ``RESOURCE_EXHAUSTED``
                when every replica stayed full for ``placement_timeout`` seconds,
                ``DEADLINE_EXCEEDED`` when no replica answered in time, ``INVALID_ARGUMENT`` for a
                bad config, ``UNAUTHENTICATED`` without a valid token).
            ProtocolError: the server's first message was not ``SessionStarted``.
        """
        if self._call is not None:
            raise RuntimeError("session already started")
        if self._closed:
            raise SessionClosedError("session is closed")
        try:
            started, call = await self._placement.place_and_open(resume=False)
        except BaseException:
            self._closed = True
            raise
        self._call = call
        self._started = started
        self._awaiting_first = True
        self._placement.adopt(started)
        self._keepalive.start(self.keepalive_interval, self._keepalive_name)
        return started

    # -- resume ------------------------------------------------------------------------------

    def _resume_block(self) -> int:
        """The first block not fully received: the resumed stream starts there."""
        return self._state.resume_block(self._started.frames_per_block if self._started else 0)

    def _can_resume(self) -> bool:
        p = self._placement
        return p.routed and self._client.resume_timeout > 0 and not self._closed and bool(p.token)

    async def _resume(self, broken: Any, cause: BaseException, avoid: Collection[str] = ()) -> None:
        """Moves the session to a new stream (another replica if the old one is gone), once per break.
        ``avoid``: replicas asked for placement last (the one that stalled)."""
        async with self._resume_lock:
            if self._call is not broken:
                return  # another task resumed it already
            if not self._can_resume():
                raise cause
            broken.cancel()
            started, call = await self._placement.place_and_open(True, self._resume_block(), avoid)
            async with self._write_lock:
                self._call = call
                self._started = started
                self._awaiting_first = True
                self.generation += 1
                self.resumes += 1
                # The audio not covered by frames received yet, then EndOfAudio if it had been sent.
                replay = self._state.begin_stream()
                for _, pcm in replay.audio:
                    await call.write(pb.StreamRequest(audio=pb.AudioChunk(data=pcm)))
                if replay.end_of_audio:
                    await call.write(pb.StreamRequest(end_of_audio=pb.EndOfAudio()))
                self._keepalive.touch()
            self._keepalive.start(self.keepalive_interval, self._keepalive_name)

    def _on_event(self, which: str, payload: Any) -> bool:
        """Bookkeeping for resume; False: a duplicate of something yielded before a resume."""
        if which == "frame":
            return self._state.on_frame(payload.index, self._started.frames_per_block if self._started else 0)
        if which == "audio":
            return self._state.on_audio_out(payload.block_index, payload.source_end_sample)
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
        self._keepalive.stop()
        call = self._call
        if call is None:
            return
        try:
            # A write blocked by flow control (a server that stopped reading) must not block
            # close(): give up on the graceful half-close after a short wait and cancel.
            async with asyncio.timeout(CLOSE_WAIT_S), self._write_lock:
                if not call.done():
                    await call.done_writing()
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            if not call.done():
                call.cancel()
            await self._keepalive.join()

    @property
    def address(self) -> str:
        """The replica the stream runs on, as placement named it ("" before, or on a server without routing)."""
        return self._placement.address

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
    def stream_audio_sent(self) -> int:
        """Samples handed to the current stream (re-sent audio of a resume included): what
        ``AudioOut.source_end_sample`` counts against. A resume starts a new stream."""
        return self._state.stream_audio_sent

    @property
    def stream_start_sample(self) -> int:
        """Where the current stream's audio starts in the session's audio (samples from the first sent; 0
        until a resume): ``stream_start_sample + AudioOut.source_end_sample`` is a position that holds across
        resumes, comparable with the samples sent over the whole session."""
        return self._state.stream_base

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
            if self._finished:
                # Never write to a finished call: grpc's aio client turns such a write into an INTERNAL status that
                # replaces the call's real one (and the SDK would try to resume a session that ended for good).
                end = f" ({pb.EndReason.Name(self._end.reason)})" if self._end is not None else ""
                raise SessionClosedError(f"the session has ended{end}")
            which = req.WhichOneof("message")
            if which == "audio":
                self._state.on_audio_sent(req.audio.data)
            elif which == "end_of_audio":
                self._state.on_end_of_audio_sent()
            elif which == "interrupt":
                self._state.on_interrupt_sent()
            try:
                await call.write(req)
                self._keepalive.touch()
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
        # The call's own status, not the write's: grpc's aio client reports a write that races the server's status
        # as INTERNAL, which would resume (or surface as a server fault) a stream the server refused for a reason.
        code = await call.code()
        if self._resume_lock.locked() or (code in RESUMABLE and self._can_resume()):
            await self._resume(call, broken)
            return
        if isinstance(broken, grpc.aio.AioRpcError) and broken.code() == code:
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

    @property
    def _keepalive_name(self) -> str:
        return f"avatarforcing-keepalive-{self.session_id}"

    def _keepalive_done(self) -> bool:
        return self._closed or self._finished or self._call is None or self._call.done()

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
        """Send a 16-bit PCM WAV file in ``chunk_ms`` chunks (see :meth:`stream_pcm`).

        A stereo (multi-channel) file is mixed down to mono (:func:`read_wav`). The file's sample
        rate must equal the session's (open the session with ``sample_rate=`` the file's rate);
        no resampling is done here. Returns the number of samples sent.
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

        A broken stream is resumed here (see the module docstring), and so is a ``PACING_REALTIME``
        stream that delivered nothing for the client's ``stall_timeout`` while this generator waited
        (a frozen replica); when such a stream cannot be resumed, :class:`StreamStalledError` is raised
        and the session's stream is cancelled.
        """
        if self._call is None:
            raise RuntimeError("session not started")
        if self._reading:
            raise RuntimeError("events() is already being consumed by another task")
        self._reading = True
        try:
            while not self._finished:
                call = self._call
                limit = stall_limit(self._client.stall_timeout, self.config.pacing, self._started,
                                    self._awaiting_first)
                try:
                    resp, stalled = await read_within(call, limit)
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
                    if self._call is not call or (e.code() in RESUMABLE and self._can_resume()):
                        await self._resume(call, e)
                        continue
                    raise
                if stalled:
                    assert limit is not None
                    if self._closed:
                        return
                    if self._call is not call:
                        continue  # resumed by another task meanwhile
                    stall = StreamStalledError(self.address, limit)
                    if not self._can_resume():
                        call.cancel()
                        self._finished = True
                        raise stall
                    await self._resume(call, stall, avoid=(self.address,) if self.address else ())
                    continue
                if call is self._call:
                    self._awaiting_first = False
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
