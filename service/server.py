"""The asyncio gRPC server: the Stream RPC, avatars, server info, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from avatarforcing import AnchorState, NoFreeSlotError, StreamEngine
from avatarforcing.checkpoint import LoadedModel, load_default
from avatarforcing.model import count_parameters
from avatarforcing_client.v1 import avatarforcing_pb2 as pb
from avatarforcing_client.v1 import avatarforcing_pb2_grpc as pb_grpc

from . import __version__
from .audio_in import SUPPORTED_RATES, AudioError, AudioInput, AudioOverflowError
from .codecs import SUPPORTED_ENCODINGS, UnsupportedEncodingError, make_encoder
from .config import ServerConfig
from .images import ImageError, load_reference_image
from .scheduler import Scheduler
from .session import Session, SessionFailure, Timeline
from .telemetry import Metrics

log = structlog.get_logger("avatarforcing.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AvatarForcing"].full_name


@dataclass
class Avatar:
    id: str
    name: str
    anchor: AnchorState
    digest: str


class AvatarRegistry:
    """Registered avatars (anchors computed once), least recently used evicted past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_id: collections.OrderedDict[str, Avatar] = collections.OrderedDict()
        self._by_digest: dict[str, str] = {}

    def get(self, avatar_id: str) -> Avatar | None:
        a = self._by_id.get(avatar_id)
        if a is not None:
            self._by_id.move_to_end(avatar_id)
        return a

    def by_digest(self, digest: str) -> Avatar | None:
        aid = self._by_digest.get(digest)
        return None if aid is None else self.get(aid)

    def add(self, name: str, anchor: AnchorState, digest: str) -> Avatar:
        a = Avatar("av_" + secrets.token_urlsafe(12), name, anchor, digest)
        self._by_id[a.id] = a
        self._by_digest[digest] = a.id
        while len(self._by_id) > self.capacity:
            _, old = self._by_id.popitem(last=False)
            self._by_digest.pop(old.digest, None)
        return a

    def __len__(self) -> int:
        return len(self._by_id)


def _abort_code(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, SessionFailure):
        return e.code, e.message
    if isinstance(e, AudioOverflowError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, AudioError | ImageError | UnsupportedEncodingError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}"


class AvatarForcingServicer(pb_grpc.AvatarForcingServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    # ---- unary ---------------------------------------------------------------------------------
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        return self.app.server_info()

    async def RegisterAvatar(self, request: pb.RegisterAvatarRequest,
                             context: grpc.aio.ServicerContext) -> pb.RegisterAvatarResponse:
        try:
            avatar = await self.app.avatar_from_image(request.image, request.name)
        except (ImageError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c = self.app.engine.cfg
        return pb.RegisterAvatarResponse(avatar_id=avatar.id, width=c.width, height=c.height)

    # ---- the stream ----------------------------------------------------------------------------
    async def Stream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        app = self.app
        session: Session | None = None
        reader: asyncio.Task[None] | None = None
        try:
            try:
                first = await asyncio.wait_for(anext(request_iterator), app.cfg.config_timeout_s)
            except TimeoutError:
                raise SessionFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"no SessionConfig within {app.cfg.config_timeout_s:g} s; the first message "
                                     "of a stream must be a SessionConfig") from None
            except StopAsyncIteration:
                raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                     "the stream closed before sending a SessionConfig") from None
            kind = first.WhichOneof("message")
            if kind != "config":
                raise SessionFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                     f"the first message must be a SessionConfig, got {kind or 'an empty message'}")
            session = await app.open_session(first.config)
            yield pb.StreamResponse(started=app.started_message(session))
            reader = asyncio.create_task(self._read(request_iterator, session))
            while True:
                item = await session.out.get()
                if item.end:
                    if session.failure is not None:
                        raise session.failure
                    if item.msg.WhichOneof("message"):
                        yield item.msg
                    app.metrics.sessions_ended.labels(pb.EndReason.Name(item.msg.end.reason).lower()).inc()
                    return
                if item.due is not None:
                    delay = item.due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                yield item.msg
                if item.frames:
                    app.on_frame_sent(session, item)
        except SessionFailure as e:
            app.metrics.sessions_rejected.labels(e.code.name.lower()).inc()
            if session is not None:
                session.log.info("session failed", code=e.code.name, reason=e.message)
            else:
                log.info("stream refused", code=e.code.name, reason=e.message)
            await context.abort(e.code, e.message, app.trailers_for(e))
        except asyncio.CancelledError:
            if session is not None:
                app.metrics.sessions_ended.labels("cancelled").inc()
                session.log.info("session cancelled by the client")
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                await app.scheduler.release(session)
                session.log.info("session closed", frames_sent=session.frames_sent,
                                 frames_dropped=session.frames_dropped, steps=session.steps)

    async def _read(self, it: AsyncIterator[pb.StreamRequest], s: Session) -> None:
        try:
            async for req in it:
                s.last_client_msg = time.monotonic()
                kind = req.WhichOneof("message")
                if kind == "audio":
                    if s.eoa and not s.realtime:
                        raise SessionFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                             "audio after EndOfAudio in PACING_ASAP; open a new session")
                    s.audio.push(req.audio.data, s.last_client_msg)
                    s.eoa = False
                elif kind == "interrupt":
                    s.audio.clear()
                    s.clear_requested = True
                    for b in s.pending:  # blocks in the window finish silent
                        b.pcm_in[:] = 0
                        b.real_samples = b.real_offset = 0
                    s.last_real_block = -1
                elif kind == "end_of_audio":
                    s.eoa = True
                    s.maybe_finish()
                elif kind == "keep_alive":
                    pass
                elif kind == "config":
                    raise SessionFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                         "SessionConfig may only be sent once, as the first message")
                else:
                    raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, "empty StreamRequest (no message set)")
                self.app.scheduler.kick()
            s.half_closed = True
            s.maybe_finish()
            self.app.scheduler.kick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            code, msg = _abort_code(e)
            s.fail(SessionFailure(code, msg))


def drift_floor(meta: dict[str, Any]) -> float | None:
    """The anchor-similarity floor calibrated on the checkpoint (``avatarforcing eval`` measures
    the similarity over held-out streams; the floor is its mean minus 4 standard deviations)."""
    cal = meta.get("drift_calibration", {}).get("anchor_similarity")
    if not cal:
        return None
    return float(cal["mean"]) - 4.0 * float(cal["std"])


class App:
    """Everything one replica runs: engine, scheduler, avatars, metrics, the gRPC server."""

    def __init__(self, cfg: ServerConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.loaded = loaded or load_default(cfg.checkpoint or None, cfg.preset)
        device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
        self.engine = StreamEngine(self.loaded.model, self.loaded.vae, self.loaded.stream_cfg,
                                   max_sessions=cfg.max_sessions, device=device, dtype=dtype)
        self.metrics = Metrics()
        self.metrics.sessions_capacity.set(cfg.max_sessions)
        self.metrics.slot_bytes.set(self.engine.slot_bytes())
        self.scheduler: Scheduler = None  # type: ignore[assignment]  # made in start()
        self.avatars = AvatarRegistry(cfg.max_avatars)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self.draining = False
        self.stopped = False
        self._watchdog: asyncio.Task[None] | None = None
        c = self.engine.cfg
        self.timeline = Timeline(c.fps, self.engine.frames_per_block, self.engine.L, cfg.processing_budget_ms / 1000)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.loaded.trained:
            log.warning("no trained checkpoint found: serving a RANDOMLY INITIALISED model; the video will not "
                        "look like a face. Train one (see README) or pass --checkpoint.",
                        checkpoint=self.loaded.source)
        floor = drift_floor(self.loaded.meta)
        self.metrics.anchor_similarity_floor.set(floor or 0.0)
        self.scheduler = Scheduler(self.engine, self.metrics, max_batch=self.cfg.max_batch, drift_floor=floor)
        self.scheduler.start()
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.cfg.max_image_bytes + 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        pb_grpc.add_AvatarForcingServicer_to_server(AvatarForcingServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.cfg.host, self.cfg.metrics_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self.watchdog(), name="watchdog")
        log.info("serving", address=f"{self.cfg.host}:{self.port}", metrics_port=self.metrics_port,
                 model=self.loaded.model_cfg.name, checkpoint=self.loaded.source, trained=self.loaded.trained,
                 device=str(self.engine.device), dtype=str(self.engine.dtype).replace("torch.", ""),
                 capacity=self.cfg.max_sessions, slot_bytes=self.engine.slot_bytes(),
                 lookahead_ms=round(self.lookahead_ms(), 1), latency_ms=round(self.timeline.latency_s * 1000, 1),
                 config=self.cfg.to_json())

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new sessions, let live ones finish within the grace
        period, then end the rest with END_REASON_SERVER_SHUTDOWN."""
        if self.stopped:
            return
        grace = self.cfg.grace_s if grace is None else grace
        self.draining = True
        await self.health.enter_graceful_shutdown()
        log.info("shutting down", live_sessions=len(self.scheduler.sessions), grace_s=grace)
        deadline = time.monotonic() + grace
        while self.scheduler.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.scheduler.sessions.values()):
            s.end(pb.END_REASON_SERVER_SHUTDOWN, "the server is shutting down; reconnect to another replica")
        t_end = time.monotonic() + 2.0
        while self.scheduler.sessions and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        assert self.server is not None
        await self.server.stop(1.0)
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.scheduler.stop()
        self.metrics.close()
        self.stopped = True
        log.info("stopped")

    # ---- sessions ------------------------------------------------------------------------------
    def lookahead_ms(self) -> float:
        e = self.engine
        return e.frames_per_block * (e.L - 1) / e.cfg.fps * 1000

    async def avatar_from_image(self, data: bytes, name: str = "") -> Avatar:
        digest = hashlib.sha256(data).hexdigest()
        known = self.avatars.by_digest(digest)
        if known is not None:
            return known
        c = self.engine.cfg
        img = load_reference_image(data, c.width, c.height, max_bytes=self.cfg.max_image_bytes,
                                   max_pixels=self.cfg.max_image_pixels)
        anchor = await self.scheduler.in_engine(self.engine.prepare_anchor, img)
        avatar = self.avatars.add(name, anchor, digest)
        log.info("avatar registered", avatar_id=avatar.id, name=name)
        return avatar

    async def open_session(self, sc: pb.SessionConfig) -> Session:
        if self.draining:
            raise SessionFailure(grpc.StatusCode.UNAVAILABLE, "this replica is shutting down; connect to another")
        af = sc.audio_format
        if af.encoding not in (pb.AUDIO_ENCODING_PCM16LE, pb.AUDIO_ENCODING_UNSPECIFIED):
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"audio encoding {af.encoding} is not supported; use AUDIO_ENCODING_PCM16LE")
        if af.channels not in (0, 1):
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"audio has {af.channels} channels; send mono (channels = 1)")
        rate = af.sample_rate_hz or self.engine.cfg.audio_sample_rate
        if rate not in SUPPORTED_RATES:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"sample rate {rate} Hz is not supported; use one of {list(SUPPORTED_RATES)}")
        if sc.video_encoding not in SUPPORTED_ENCODINGS:
            names = ", ".join(pb.VideoEncoding.Name(v) for v in SUPPORTED_ENCODINGS)
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"video encoding {sc.video_encoding} is not supported; use one of {names}")
        if sc.pacing not in (pb.PACING_UNSPECIFIED, pb.PACING_REALTIME, pb.PACING_ASAP):
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"pacing {sc.pacing} is unknown; use PACING_REALTIME or PACING_ASAP")
        if sc.jpeg_quality > 100:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, "jpeg_quality must be 1..100 (0: default)")
        ref = sc.WhichOneof("reference")
        if ref == "avatar_id":
            avatar = self.avatars.get(sc.avatar_id)
            if avatar is None:
                raise SessionFailure(grpc.StatusCode.NOT_FOUND,
                                     f"avatar {sc.avatar_id!r} is not registered on this replica; register it "
                                     "with RegisterAvatar or send reference_image")
        elif ref == "reference_image":
            try:
                avatar = await self.avatar_from_image(sc.reference_image)
            except ImageError as e:
                raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        else:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                 "SessionConfig needs a reference: reference_image (PNG/JPEG bytes) or avatar_id")
        c = self.engine.cfg
        try:
            audio = AudioInput(rate, c.audio_sample_rate, self.engine.frames_per_block, c.fps,
                               self.cfg.max_chunk_ms, self.cfg.max_buffered_s)
        except AudioError as e:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        seed = sc.seed or secrets.randbits(63)
        try:
            slot = await self.scheduler.allocate(avatar.anchor, seed)
        except NoFreeSlotError:
            raise SessionFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"all {self.cfg.max_sessions} session slots of this replica are in use; retry "
                                 "later or on another replica") from None
        try:
            encoder = make_encoder(sc.video_encoding, c.width, c.height, c.fps, jpeg_quality=sc.jpeg_quality,
                                   bitrate_bps=sc.video_bitrate_bps)
        except Exception as e:
            await self.scheduler.in_engine(self.engine.free, slot)
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, f"cannot create the video encoder: {e}") from None
        sid = "s_" + secrets.token_urlsafe(12)
        s = Session(id=sid, config=sc, slot=slot, audio=audio, encoder=encoder, timeline=self.timeline,
                    queue_frames=self.cfg.queue_frames, max_blocks_ahead=self.cfg.max_blocks_ahead,
                    avatar_id=avatar.id)
        s.log = log.bind(session_id=sid, utterance_id=sc.utterance_id or None, avatar_id=avatar.id)
        self.scheduler.add(s)
        self.metrics.sessions_started.inc()
        s.log.info("session started", slot=slot, sample_rate=rate, encoding=pb.VideoEncoding.Name(sc.video_encoding),
                   pacing=pb.Pacing.Name(sc.pacing or pb.PACING_REALTIME))
        return s

    def started_message(self, s: Session) -> pb.SessionStarted:
        c = self.engine.cfg
        lat = self.timeline.latency_s * 1000 if s.realtime else self.lookahead_ms() + s.timeline.block_s * 1000
        return pb.SessionStarted(
            session_id=s.id, fps=c.fps, width=c.width, height=c.height, frames_per_block=self.engine.frames_per_block,
            lookahead_ms=self.lookahead_ms(), latency_ms=lat, video_encoding=s.config.video_encoding,
            init_segment=s.encoder.init_segment, audio_sample_rate_hz=s.audio.rate, avatar_id=s.avatar_id,
            idle_timeout_ms=self.cfg.idle_timeout_s * 1000)

    def on_frame_sent(self, s: Session, item: Any) -> None:
        now = time.monotonic()
        m = self.metrics
        m.frames_emitted.inc()
        m.queue_depth.observe(s.out.frames)
        if s.first_frame_at is None:
            s.first_frame_at = now
            m.time_to_first_frame.observe(now - s.t_start)
        elif s.last_frame_at is not None:
            m.inter_frame_gap.observe(now - s.last_frame_at)
        s.last_frame_at = now
        s.frames_sent += 1
        if item.arrival is not None:
            m.frame_latency.observe(now - item.arrival)

    def trailers_for(self, e: SessionFailure) -> tuple[tuple[str, str], ...]:
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            ms = str(int(self.timeline.block_s * 1000 * 4))
            return (("grpc-retry-pushback-ms", ms), ("retry-after-ms", ms))
        return ()

    def server_info(self) -> pb.ServerInfo:
        e, lm = self.engine, self.loaded
        c, st = e.cfg, e.stream
        return pb.ServerInfo(
            version=__version__,
            model=pb.ModelInfo(name=c.name, checkpoint=lm.source, trained=lm.trained, layers=c.layers, width=c.dim,
                               heads=c.heads, parameters=count_parameters(e.model), device=str(e.device),
                               dtype=str(e.dtype).replace("torch.", "")),
            stream=pb.StreamInfo(mode=st.mode, block_latent_frames=st.block_frames, window_blocks=st.window_blocks,
                                 noise_levels=list(st.levels), history_latent_frames=st.history_frames, fps=c.fps,
                                 width=c.width, height=c.height, frames_per_block=e.frames_per_block,
                                 lookahead_ms=self.lookahead_ms()),
            capacity_sessions=e.capacity, free_slots=e.free_slots, active_sessions=len(self.scheduler.sessions),
            supported_sample_rates_hz=list(SUPPORTED_RATES),
            supported_video_encodings=cast(list[pb.VideoEncoding], list(SUPPORTED_ENCODINGS)),
            registered_avatars=len(self.avatars))

    async def watchdog(self) -> None:
        """Idle timeout and maximum session length."""
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for s in list(self.scheduler.sessions.values()):
                if s.ending:
                    continue
                if now - s.last_client_msg > self.cfg.idle_timeout_s:
                    s.out.clear_media()
                    s.end(pb.END_REASON_IDLE_TIMEOUT,
                          f"no message from the client for {self.cfg.idle_timeout_s:g} s (send KeepAlive)")
                elif now - s.t_start > self.cfg.max_session_s:
                    s.end(pb.END_REASON_MAX_DURATION, f"sessions are limited to {self.cfg.max_session_s:g} s")


async def run_app(app: App) -> None:
    """Runs until cancelled or signalled, then shuts down gracefully."""
    import signal

    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await app.stop()
