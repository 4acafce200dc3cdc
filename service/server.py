"""The asyncio gRPC server: the Stream RPC, avatars, server info, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, cast

import grpc
import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from avatarforcing import StreamEngine
from avatarforcing.checkpoint import LoadedModel, choose_decoder, drift_floor, load_default
from avatarforcing.model import count_parameters
from avatarforcing_proto.v1 import avatarforcing_pb2 as pb
from avatarforcing_proto.v1 import avatarforcing_pb2_grpc as pb_grpc
from avatarforcing_proto.wire import RETRY_AFTER_TRAILER, retry_trailers

from . import __version__, messages
from .audio_in import AudioError, AudioOverflowError, rates_for
from .avatar_source import AvatarSource
from .avatars import Avatar, AvatarRegistry, RateLimited
from .codecs import SUPPORTED_ENCODINGS, UnsupportedEncodingError
from .config import ServerConfig
from .failure import SessionFailure
from .images import ImageError
from .opening import SessionOpener
from .ownership import FreezeGuard
from .routing import LocalRouter, NodeInfo, Router, RoutingError, RoutingLimits
from .scheduler import Scheduler
from .security import (
    DEFAULT_TENANT,
    AuthConfigError,
    AuthError,
    AuthInterceptor,
    Tenant,
    TokenTable,
    drain_refusal,
    server_credentials,
)
from .session import Session, Timeline
from .telemetry import Metrics, log_format
from .wire import add_guarded_servicer

log = structlog.get_logger("avatarforcing.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AvatarForcing"].full_name


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

    def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        try:
            return self.app.tokens.authenticate(context.invocation_metadata())
        except AuthError as e:  # the interceptor refuses these first; kept as a second guard
            raise SessionFailure(e.code, str(e)) from None

    # ---- unary ---------------------------------------------------------------------------------
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        """The caller's view: its own tenant's sessions and avatars, and no file path unless it is an admin."""
        try:
            tenant = self._tenant(context)
        except SessionFailure as f:
            await context.abort(f.code, f.message)
        return self.app.server_info(tenant)

    async def RegisterAvatar(self, request: pb.RegisterAvatarRequest,
                             context: grpc.aio.ServicerContext) -> pb.RegisterAvatarResponse:
        tenant = self._tenant(context)
        try:
            avatar = await self.app.avatar_from_image(request.image, request.name, tenant.name,
                                                      text_context=request.text_context)
        except (ImageError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RateLimited as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_trailers(e.retry_after_s))
        # Other replicas load the avatar from the routing store (or the avatar volume) when a session names it.
        await self.app.store_avatar(avatar)
        c = self.app.engine.cfg
        return pb.RegisterAvatarResponse(avatar_id=avatar.id, width=c.width, height=c.height)

    async def CreateSession(self, request: pb.CreateSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.CreateSessionResponse:
        app = self.app
        try:
            tenant = self._tenant(context)
            if request.resume_session_id:
                if not request.session_token:
                    raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                         "resume_session_id needs the session's session_token")
                pl = await app.router.resume(request.resume_session_id, request.session_token, tenant.name,
                                             app.tenant_limit(tenant))
            else:
                if request.session_token:
                    raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT,
                                         "session_token without resume_session_id; leave both empty for a new session")
                pl = await app.router.create(tenant.name, app.tenant_limit(tenant))
        except RoutingError as e:
            f = SessionFailure(e.code, e.message, e.trailers)
            app.metrics.sessions_rejected.labels(f.code.name.lower()).inc()
            app.metrics.placements.labels("refused").inc()
            log.info("placement refused", code=f.code.name, reason=f.message)
            await context.abort(f.code, f.message, app.trailers_for(f))
        except SessionFailure as f:
            await context.abort(f.code, f.message, app.trailers_for(f))
        app.metrics.placements.labels(
            "resumed" if pl.resumed else "local" if pl.node_id == app.node_id else "remote").inc()
        log.info("session placed", session_id=pl.session_id, node_id=pl.node_id, address=pl.address,
                 resumed=pl.resumed)
        return pb.CreateSessionResponse(session_id=pl.session_id, session_token=pl.token, address=pl.address,
                                        node_id=pl.node_id, reservation_ttl_ms=pl.ttl_s * 1000, resumed=pl.resumed)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        app = self.app
        try:
            tenant = self._tenant(context)
        except SessionFailure as f:
            await context.abort(f.code, f.message)
        refused = drain_refusal(tenant, context.peer() or "", app.tokens.enabled, app.admin_tenants)
        if refused is not None:
            log.warning("drain refused", peer=context.peer(), tenant=tenant.name, auth=app.tokens.enabled)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        if request.deadline_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deadline_s must be >= 0 (0: the server's grace)")
        deadline = request.deadline_s or app.cfg.grace_s
        live = await app.drain(deadline)
        return pb.DrainResponse(live_sessions=live, deadline_s=deadline)

    # ---- the stream ----------------------------------------------------------------------------
    async def Stream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        app = self.app
        session: Session | None = None
        reader: asyncio.Task[None] | None = None
        try:
            tenant = self._tenant(context)
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
            session = await app.open_session(first.config, tenant)
            yield pb.StreamResponse(started=app.started_message(session))
            reader = asyncio.create_task(self._read(request_iterator, session))
            while True:
                item = await session.out.get()
                if item.end:
                    if session.failure is not None:
                        raise session.failure
                    if item.msg.WhichOneof("message"):
                        await app._hook("end", session)
                        yield item.msg
                        # Ended for good once its End went out, except by a drain or shutdown (the client resumes
                        # elsewhere). Only then: a client that vanishes half-closes its requests before gRPC cancels
                        # this handler, so its session ends too, with an End that reaches no one; the yield does not
                        # return and the session stays resumable.
                        session.set_resumable(item.msg.end.reason == messages.SERVER_SHUTDOWN)
                    app.metrics.sessions_ended.labels(messages.end_reason_label(item.msg)).inc()
                    return
                if item.due is not None:
                    delay = item.due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if item.frames and not app.freeze.owns_for_sure():
                    # This process was frozen (SIGSTOP, a stalled loop): while it slept, the session may have been
                    # resumed elsewhere. No frame goes out before the store confirms that it is still ours.
                    await app.freeze.confirm_ownership()
                if session.failure is not None:  # failed (moved away, say) with frames still queued: none goes out
                    raise session.failure
                if item.frames:  # when this replica decided to send it (the send may end after a freeze)
                    session.stamp_send(time.time())
                yield session.message(item)
                if item.frames:
                    app.on_frame_sent(session, item)
        except SessionFailure as e:
            app.metrics.sessions_rejected.labels(e.code.name.lower()).inc()
            if session is not None:
                session.set_resumable(e.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE))
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
                # One task frees the slot, the encoder and the routing record; a second cancellation of this
                # handler (the client closing right after End) cannot interrupt it half way.
                await app.close_session(session)

    async def _read(self, it: AsyncIterator[pb.StreamRequest], s: Session) -> None:
        try:
            async for req in it:
                now = time.monotonic()
                s.client_message(now)
                kind = req.WhichOneof("message")
                if kind == "audio":
                    if not req.audio.data:  # an empty chunk carries nothing: it changes no state
                        continue
                    s.push_audio(req.audio.data, now)
                elif kind == "interrupt":
                    s.interrupt()
                elif kind == "end_of_audio":
                    s.end_of_audio()
                elif kind == "keep_alive":
                    pass
                elif kind == "config":
                    raise SessionFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                         "SessionConfig may only be sent once, as the first message")
                else:
                    raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, "empty StreamRequest (no message set)")
                self.app.scheduler.kick()
            s.half_close()
            self.app.scheduler.kick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            code, msg = _abort_code(e)
            s.fail(SessionFailure(code, msg))


class App:
    """Everything one replica runs: engine, scheduler, avatars, metrics, the gRPC server."""

    def __init__(self, cfg: ServerConfig, loaded: LoadedModel | None = None) -> None:
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.loaded = loaded or load_default(cfg.checkpoint or None, cfg.preset)
        device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
        stream = self.loaded.stream_cfg
        if cfg.flash_impl:
            from avatarforcing.attention import use_flash_impl

            use_flash_impl(cfg.flash_impl)  # a ValueError saying why when its package is missing
        if cfg.positions != "auto":
            stream = dataclasses.replace(stream, positions=cast(Literal["relative", "reference"], cfg.positions))
        self.engine = StreamEngine(self.loaded.model, self.loaded.vae, stream,
                                   max_sessions=cfg.max_sessions, device=device, dtype=dtype,
                                   compile=cfg.resolved_compile(), cuda_graphs=cfg.cuda_graphs,
                                   attention=cfg.attention, audio=self.loaded.audio, context=self.loaded.context,
                                   audio_context_s=None if cfg.audio_context_s < 0 else cfg.audio_context_s,
                                   decoder=choose_decoder(self.loaded, cfg.decoder, cfg.decoder_path or None),
                                   fp8=cfg.fp8, overlap_decode=cfg.overlap_decode, fp8_attention=cfg.fp8_attention)
        self.metrics = Metrics()
        self.metrics.sessions_capacity.set(cfg.max_sessions)
        self.metrics.slot_bytes.set(self.engine.slot_bytes())
        self.scheduler: Scheduler = None  # type: ignore[assignment]  # made in start()
        self.router: Router = None  # type: ignore[assignment]  # made in start(), once the port is known
        self.owned: dict[str, Session] = {}  # session id -> the Session streaming it here
        self._closing: set[asyncio.Task[None]] = set()
        # A loop that stood still longer than a node may be silent before a resume takes its sessions away (the
        # routing limits' stale_s) must confirm its ownership before it sends another frame.
        self.freeze = FreezeGuard(RoutingLimits(heartbeat_s=cfg.heartbeat_s, node_ttl_s=cfg.node_ttl_s),
                                  lambda: self.router.confirm())
        self._opener: SessionOpener | None = None  # made in start(), once the router is
        self.hooks: dict[str, Callable[[Session | None], Awaitable[None]]] = {}
        try:
            self.tokens = TokenTable.load(cfg.auth_tokens_file, cfg.auth_tokens)
            self.credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert \
                else None
        except AuthConfigError as e:
            raise ValueError(f"invalid server config: {e}") from None
        self.admin_tenants = {t.strip() for t in cfg.admin_tenants.split(",") if t.strip()}
        self.node_id = cfg.node_id or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.health_server: grpc.aio.Server | None = None
        self.health_port = -1
        self._drain_task: asyncio.Task[None] | None = None
        self.avatar_source = AvatarSource(cfg, self.engine)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self.draining = False
        self.stopped = False
        self._watchdog: asyncio.Task[None] | None = None
        c = self.engine.cfg
        self.timeline = Timeline(c.fps, self.engine.frames_per_block, self.engine.L, cfg.processing_budget_ms / 1000,
                                 onset_replan=cfg.onset_replan)

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.loaded.trained:
            log.warning("no trained checkpoint found: serving a RANDOMLY INITIALISED model; the video will not "
                        "look like a face. Train one (see README) or pass --checkpoint.",
                        checkpoint=self.loaded.source)
        floor = drift_floor(self.loaded.meta)
        self.metrics.anchor_similarity_floor.set(floor or 0.0)
        self.scheduler = Scheduler(self.engine, self.metrics, max_batch=self.cfg.max_batch, drift_floor=floor)
        # Until steps are measured, a re-plan's warm-up is assumed to take the budget's share for compute.
        self.scheduler.set_default_lead(self.timeline.budget_s / 2)
        self.scheduler.start()
        # Auth failures are logged, counted and rate-limited per peer address (self.auth.limiter).
        self.auth = AuthInterceptor(self.tokens, self.metrics) if self.tokens.enabled else None
        self.server = grpc.aio.server(options=[
            # An image and (RegisterAvatar) a float32 text context file of up to 16 MiB.
            ("grpc.max_receive_message_length", self.cfg.max_image_bytes + 17 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # Clients' keepalive pings (the SDKs send one every 10 s) are welcome, with or without a call; the
            # server pings too, so a client that vanished without a FIN is noticed.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_time_ms", 20000),
            ("grpc.keepalive_timeout_ms", 10000),
        ], interceptors=[self.auth] if self.auth is not None else None)
        # Request bytes that do not parse are answered INVALID_ARGUMENT, not UNKNOWN with a traceback (wire.py).
        add_guarded_servicer(pb_grpc.add_AvatarForcingServicer_to_server, AvatarForcingServicer(self), self.server)
        add_guarded_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, self.server)
        services = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        add_guarded_servicer(reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                             reflection.aio.ReflectionServicer(services), self.server)
        bind = f"{self.cfg.host}:{self.cfg.port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(bind, self.credentials)
        else:
            self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        self.router = self._make_router()
        self.avatar_source.attach(self.router, self.scheduler.in_engine)
        await self.server.start()
        if self.cfg.health_port >= 0:  # plaintext health only, for probes that cannot speak TLS
            self.health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{self.cfg.host}:{self.cfg.health_port}")
            await self.health_server.start()
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(self.cfg.host, self.cfg.metrics_port)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready = lambda: not self.draining and not self.stopped  # /readyz follows the health status
        await self.router.start()
        self.metrics.routing_store_up.set_function(lambda: float(self.router.healthy))
        self.metrics.avatar_bytes.set_function(lambda: float(self.avatars.nbytes))
        self._opener = SessionOpener(self.engine, self.scheduler, self.router, self.cfg, self.timeline, self.metrics,
                                     self.owned, self.avatar_source.for_session, self._hook,
                                     lambda: self.draining)
        self._watchdog = asyncio.create_task(self.watchdog(), name="watchdog")
        self.freeze.start()
        log.info("serving", address=f"{self.cfg.host}:{self.port}", metrics_port=self.metrics_port,
                 model=self.loaded.model_cfg.name, checkpoint=self.loaded.source, trained=self.loaded.trained,
                 device=str(self.engine.device), dtype=str(self.engine.dtype).replace("torch.", ""),
                 capacity=self.cfg.max_sessions, slot_bytes=self.engine.slot_bytes(),
                 lookahead_ms=round(self.lookahead_ms(), 1), latency_ms=round(self.timeline.latency_s * 1000, 1),
                 node_id=self.node_id, advertise=self.router.node.address, routing=self.router.kind,
                 tls=self.credentials is not None, auth=self.tokens.enabled, health_port=self.health_port,
                 config=self._config_for_log())

    def _config_for_log(self) -> Any:
        """JSON logs: the whole configuration as a nested object; console logs: only what differs from the
        defaults, as ``key=value`` pairs (the first screen of `avatarforcing demo` stays readable)."""
        if log_format() == "json":
            return self.cfg.to_dict()
        return " ".join(f"{k}={v}" for k, v in self.cfg.non_defaults().items()) or "(defaults)"

    def _make_router(self) -> Router:
        cfg = self.cfg
        address = cfg.advertise_address
        if not address:
            host = cfg.host
            if host in ("", "0.0.0.0", "::", "[::]"):
                host = socket.gethostbyname(socket.gethostname())
            address = f"{host}:{self.port}"
        node = NodeInfo(self.node_id, address, cfg.max_sessions)
        limits = RoutingLimits(reservation_ttl_s=cfg.reservation_ttl_s, resume_ttl_s=cfg.resume_ttl_s,
                               session_ttl_s=cfg.session_ttl_s, node_ttl_s=cfg.node_ttl_s, heartbeat_s=cfg.heartbeat_s)
        router: Router
        if cfg.redis_url:
            from .routing.redis_store import RedisRouter

            router = RedisRouter(node, limits, lambda: self.engine.free_slots, url=cfg.redis_url,
                                 prefix=cfg.redis_prefix, avatar_quota=cfg.tenant_max_avatars,
                                 op_timeout_s=cfg.redis_timeout_s)
        else:
            router = LocalRouter(node, limits, lambda: self.engine.free_slots)
        router.on_lost = self._on_lost
        if hasattr(router, "on_store_lost"):
            router.on_store_lost = self._store_lost
        router.held = lambda: {sid: s.epoch for sid, s in self.owned.items()}
        router.progressing = self.scheduler.progressing
        return router

    def _on_lost(self, session_id: str) -> None:
        s = self.owned.pop(session_id, None)
        if s is not None:
            s.fail(SessionFailure(grpc.StatusCode.ABORTED, "this session was resumed on another replica; this "
                                  "stream ends"), drop_media=True)

    def tenant_limit(self, tenant: Tenant) -> int:
        return tenant.max_sessions or self.cfg.tenant_max_sessions

    async def close_session(self, s: Session) -> None:
        """Frees everything ``s`` holds (engine slot, encoder, routing record), exactly once, in a task of its own:
        cancelling the caller (a handler whose client went away while it was closing) cannot skip a step."""
        task, new = s.begin_close(lambda: asyncio.create_task(self._close(s), name=f"close-{s.id}"))
        if new:
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        await asyncio.shield(task)

    async def _close(self, s: Session) -> None:
        try:
            await self.scheduler.release(s)
        finally:
            await self.release_route(s)
            s.log.info("session closed", frames_sent=s.frames_sent, frames_dropped=s.frames_dropped, steps=s.steps,
                       first_frame_ts=s.first_frame_ts, last_frame_ts=s.last_frame_ts, epoch=s.epoch)

    async def release_route(self, s: Session) -> None:
        """Gives the session's routing record back, exactly once. The router compares the stream's epoch: when a
        newer stream of the session attached meanwhile (here or elsewhere), nothing of its record changes."""
        if not s.claim_route_release():
            return
        if self.owned.get(s.id) is s:
            del self.owned[s.id]
        await self._hook("release_route", s)
        await self.router.release(s.id, s.epoch, s.resumable)

    async def _hook(self, point: str, s: Session | None = None) -> None:
        """Test seam: tests hold a task at a racing point (tests/test_routing_races.py). Nothing is set in service."""
        hook = self.hooks.get(point)
        if hook is not None:
            await hook(s)

    async def drain(self, deadline_s: float) -> int:
        """NOT_SERVING, draining in the registry, no new sessions; live ones end after ``deadline_s``."""
        if not self.draining:
            self.draining = True
            self.metrics.draining.set(1)
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            if self.router is not None:
                await self.router.set_draining()
            log.info("draining", live_sessions=len(self.scheduler.sessions), deadline_s=deadline_s)
            self._drain_task = asyncio.create_task(self._end_after(deadline_s), name="drain")
        return len(self.scheduler.sessions)

    async def _end_after(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while self.scheduler.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.scheduler.sessions.values()):
            s.end(messages.SERVER_SHUTDOWN, "this replica is draining; resume the session on another replica")

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new sessions, let live ones finish within the grace
        period, then end the rest with END_REASON_SERVER_SHUTDOWN."""
        if self.stopped:
            return
        grace = self.cfg.grace_s if grace is None else grace
        self.draining = True
        self.metrics.draining.set(1)
        await self.health.enter_graceful_shutdown()
        if self.router is not None:
            await self.router.set_draining()
        log.info("shutting down", live_sessions=len(self.scheduler.sessions), grace_s=grace)
        deadline = time.monotonic() + grace
        while self.scheduler.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.scheduler.sessions.values()):
            s.end(messages.SERVER_SHUTDOWN, "the server is shutting down; resume the session on another replica")
        t_end = time.monotonic() + 2.0
        while self.scheduler.sessions and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        assert self.server is not None
        await self.server.stop(1.0)
        if self._closing:  # streams cancelled during the shutdown: their slots, routes and log lines
            await asyncio.wait(list(self._closing), timeout=5)
        self.freeze.stop()
        if self.health_server is not None:
            await self.health_server.stop(0.2)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self.router is not None:
            await self.router.stop()
        await self.scheduler.stop()
        self.metrics.close()
        self.stopped = True
        log.info("stopped")

    # ---- sessions ------------------------------------------------------------------------------
    def lookahead_ms(self) -> float:
        e = self.engine
        return e.frames_per_block * (e.L - 1) / e.cfg.fps * 1000

    @property
    def avatars(self) -> AvatarRegistry:
        return self.avatar_source.registry

    @avatars.setter
    def avatars(self, registry: AvatarRegistry) -> None:
        self.avatar_source.registry = registry

    async def avatar_from_image(self, data: bytes, name: str = "", tenant: str = DEFAULT_TENANT,
                                avatar_id: str | None = None, text_context: bytes = b"",
                                rate_limited: bool = True) -> Avatar:
        """The avatar of a face (and of a prompt's context file): see :meth:`AvatarSource.from_image`."""
        return await self.avatar_source.from_image(data, name, tenant, avatar_id, text_context, rate_limited)

    async def store_avatar(self, avatar: Avatar) -> None:
        """Makes ``avatar`` loadable by every replica: the routing store, and the shared avatar volume if set."""
        await self.avatar_source.store(avatar)

    async def load_avatar(self, avatar_id: str, tenant: str) -> Avatar | None:
        """An avatar registered on another replica (or before a restart): from the routing store, else the volume."""
        return await self.avatar_source.load(avatar_id, tenant)

    async def _store_lost(self) -> None:
        await self.avatar_source.restore([(s.avatar_id, s.tenant) for s in list(self.owned.values())])

    async def open_session(self, sc: pb.SessionConfig, tenant: Tenant | None = None) -> Session:
        """The session a stream's SessionConfig asks for, opened on this replica (see :mod:`.opening`)."""
        tenant = tenant or Tenant(DEFAULT_TENANT)
        assert self._opener is not None, "App.start() first"
        return await self._opener.open(sc, tenant.name, self.tenant_limit(tenant))

    def started_message(self, s: Session) -> pb.SessionStarted:
        c = self.engine.cfg
        lat = self.timeline.latency_s * 1000 if s.realtime else self.lookahead_ms() + s.timeline.block_s * 1000
        # A burst lands on the first block whose frames are due after the warm-up (L steps and an encode, from
        # recent step times): at most a block later than that. The server re-plans only where an idle session's
        # queue (about half the processing budget) covers the warm-up but for a block (Session.replan_due).
        onset = lat
        lead = self.scheduler.onset_lead_s()
        if s.realtime and self.timeline.onset_replan and lead <= s.timeline.budget_s / 2 + s.timeline.block_s:
            onset = min(lat, (s.timeline.block_s + lead) * 1000)
        return messages.session_started(
            session_id=s.id, fps=c.fps, width=c.width, height=c.height, frames_per_block=self.engine.frames_per_block,
            lookahead_ms=self.lookahead_ms(), latency_ms=lat, video_encoding=s.spec.video_encoding,
            init_segment=s.encoder.init_segment, audio_sample_rate_hz=s.audio.rate, avatar_id=s.avatar_id,
            idle_timeout_ms=self.cfg.idle_timeout_s * 1000, session_token=s.token, node_id=self.node_id,
            first_frame_index=s.block_offset * self.engine.frames_per_block, onset_latency_ms=round(onset, 1))

    def on_frame_sent(self, s: Session, item: Any) -> None:
        now = time.monotonic()
        m = self.metrics
        m.frames_emitted.inc()
        m.queue_depth.observe(s.out.frames)
        first, gap = s.frame_sent(now)
        if first is not None:
            m.time_to_first_frame.observe(first)
        elif gap is not None:
            m.inter_frame_gap.observe(gap)
        if item.arrival is not None:
            m.frame_latency.observe(now - item.arrival)
        onset = s.onset_sent(item, now)
        if onset is not None:
            m.onset_latency.observe(onset)

    def trailers_for(self, e: SessionFailure) -> tuple[tuple[str, str], ...]:
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not any(k == RETRY_AFTER_TRAILER for k, _ in e.trailers):
            return (*e.trailers, *retry_trailers(self.timeline.block_s * 4))
        return e.trailers

    def server_info(self, tenant: Tenant | None = None) -> pb.ServerInfo:
        """``GetServerInfo`` as ``tenant`` sees it: its own active sessions and registered avatars on this replica,
        and the checkpoint's file name only (its path would show the server's file system). An admin tenant (with
        auth on), or no tenant (the server itself), sees the whole replica's counts and the checkpoint's path."""
        e, lm = self.engine, self.loaded
        c, st = e.cfg, e.stream
        full = tenant is None or (self.tokens.enabled and tenant.name in self.admin_tenants)
        if full:
            checkpoint, active, avatars = lm.source, len(self.scheduler.sessions), len(self.avatars)
        else:
            assert tenant is not None
            checkpoint = lm.source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            active = sum(s.tenant == tenant.name for s in self.scheduler.sessions.values())
            avatars = self.avatars.count(tenant.name)
        return pb.ServerInfo(
            version=__version__,
            model=pb.ModelInfo(name=c.name, checkpoint=checkpoint, trained=lm.trained, layers=c.layers, width=c.dim,
                               heads=c.heads, parameters=count_parameters(e.model), device=str(e.device),
                               dtype=str(e.dtype).replace("torch.", "")),
            stream=pb.StreamInfo(mode=st.mode, block_latent_frames=st.block_frames, window_blocks=st.window_blocks,
                                 noise_levels=list(st.levels), history_latent_frames=st.history_frames, fps=c.fps,
                                 width=c.width, height=c.height, frames_per_block=e.frames_per_block,
                                 lookahead_ms=self.lookahead_ms()),
            capacity_sessions=e.capacity, free_slots=e.free_slots, active_sessions=active,
            supported_sample_rates_hz=rates_for(c.fps),  # the usual ones: any rate rate_problem() accepts is taken
            supported_video_encodings=cast(list[pb.VideoEncoding], list(SUPPORTED_ENCODINGS)),
            registered_avatars=avatars, node_id=self.node_id, address=self.router.node.address,
            draining=self.draining, routing=self.router.kind, routing_healthy=self.router.healthy)

    async def watchdog(self) -> None:
        """Idle timeout and maximum session length."""
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for s in list(self.scheduler.sessions.values()):
                if s.ending:
                    continue
                if now - s.last_client_msg > self.cfg.idle_timeout_s:
                    s.end(messages.IDLE_TIMEOUT,
                          f"no message from the client for {self.cfg.idle_timeout_s:g} s (send KeepAlive)",
                          drop_media=True)
                elif now - s.t_start > self.cfg.max_session_s:
                    s.end(messages.MAX_DURATION, f"sessions are limited to {self.cfg.max_session_s:g} s")


async def run_app(app: App) -> None:
    """Runs until cancelled or signalled, then shuts down gracefully."""
    import signal

    # The handlers go in before the start, so that a signal that comes while it starts (or right after the
    # "serving" line) is a graceful stop too, not the default action (killed by SIGTERM).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()
