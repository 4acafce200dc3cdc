"""Opening a stream's session, as a sequence of steps that each undo themselves when a later one fails.

(not draining) -> check the config -> resolve the avatar -> audio input -> routing record -> (supersede an older
stream of the same session) -> engine slot -> video encoder -> still ours? -> the Session, registered. Every step
that takes something (the routing record, the slot, the encoder) pushes its undo on an
:class:`~contextlib.AsyncExitStack`; a failure (or a cancellation) anywhere after it unwinds exactly what was taken,
newest first. A session that opens disarms the stack: from then on :meth:`App.close_session` owns the release.

A stream refused before the routing step (or cancelled there) attached nothing, but the reservation that
CreateSession made for it still holds a slot of this replica and a place in its tenant's quota: it is given back
(:meth:`Router.give_back`), since a client that is refused asks for placement again (or gives up), except after a
refusal for an unknown avatar, which the SDKs answer by registering the avatar and attaching again on the same
placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import structlog

from avatarforcing import NoFreeSlotError, StreamEngine
from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .audio_in import AudioError, AudioInput
from .avatars import Avatar
from .codecs import FrameEncoder, make_encoder
from .config import ServerConfig
from .failure import SessionFailure, UnknownAvatar
from .routing import Router, RoutingError
from .scheduler import Scheduler
from .session import Session, Timeline
from .spec import SessionSpec, check_config
from .telemetry import Metrics

log = structlog.get_logger("avatarforcing.server")


@dataclass
class SessionOpener:
    """What opening a session needs from its replica; :meth:`open` runs the steps."""

    engine: StreamEngine
    scheduler: Scheduler
    router: Router
    cfg: ServerConfig
    timeline: Timeline
    metrics: Metrics
    owned: dict[str, Session]  # session id -> the Session streaming it here (shared with the App)
    resolve_avatar: Callable[[SessionSpec, str], Awaitable[Avatar]]
    hook: Callable[[str], Awaitable[None]]  # App.hooks' test seam
    draining: Callable[[], bool] = lambda: False  # the replica takes no new streams

    async def open(self, sc: pb.SessionConfig, tenant: str, tenant_limit: int) -> Session:
        try:
            spec, avatar, audio = await self._prepare(sc, tenant)
        except BaseException as e:
            if sc.session_id and not _attaches_again(e):
                await asyncio.shield(self._give_back(sc.session_id, sc.session_token, tenant))
            raise
        seed = spec.seed or secrets.randbits(63)
        sid, epoch, token = await self._route(spec, tenant, tenant_limit)
        await self.hook("attached")
        await self._supersede(sid, epoch)
        # The record's undo is armed from the slot step on, as before this module existed: a stream cancelled while
        # it superseded an older one leaves its record to the sweeper rather than detaching it here.
        async with contextlib.AsyncExitStack() as undo:
            route = _RouteUndo(self.router, sid, epoch)
            undo.push_async_callback(route)
            slot = await self._slot(avatar, seed)
            undo.push_async_callback(self.scheduler.in_engine, self.engine.free, slot)
            encoder = self._encoder(spec, route)
            undo.callback(encoder.close)
            self._still_ours(sid, epoch, route)
            s = Session(id=sid, spec=spec, slot=slot, audio=audio, encoder=encoder, timeline=self.timeline,
                        queue_frames=self.cfg.queue_frames, max_blocks_ahead=self.cfg.max_blocks_ahead,
                        avatar_id=avatar.id, block_offset=spec.resume_block, token=token, tenant=tenant,
                        epoch=epoch, log=log.bind(session_id=sid, utterance_id=spec.utterance_id or None,
                                                  avatar_id=avatar.id))
            undo.pop_all()  # opened: App.close_session releases everything from here on
        self.owned[sid] = s
        self.scheduler.add(s)
        self.metrics.sessions_started.inc()
        s.log.info("session started", slot=slot, sample_rate=spec.sample_rate, encoding=spec.encoding_name,
                   pacing=spec.pacing_name)
        return s

    # ---- the steps ---------------------------------------------------------------------------------
    async def _prepare(self, sc: pb.SessionConfig, tenant: str) -> tuple[SessionSpec, Avatar, AudioInput]:
        """The steps that take nothing: the replica still takes streams, the config, the avatar, the audio input."""
        if self.draining():
            raise SessionFailure(grpc.StatusCode.UNAVAILABLE, "this replica is shutting down; connect to another")
        c = self.engine.cfg
        spec = check_config(sc, model_rate=c.audio_sample_rate, fps=c.fps)
        avatar = await self.resolve_avatar(spec, tenant)
        return spec, avatar, self._audio_input(spec)

    async def _give_back(self, sid: str, token: str, tenant: str) -> None:
        """The reservation of a stream refused before it attached, given back (a store that cannot be reached now
        lets it expire instead)."""
        try:
            if await self.router.give_back(sid, token, tenant):
                log.info("reservation given back: its stream was refused before it started", session_id=sid)
        except Exception as e:
            log.warning("could not give the reservation back; it expires instead", session_id=sid, error=str(e))

    def _audio_input(self, spec: SessionSpec) -> AudioInput:
        c = self.engine.cfg
        try:
            return AudioInput(spec.sample_rate, c.audio_sample_rate, self.engine.frames_per_block, c.fps,
                              self.cfg.max_chunk_ms, self.cfg.max_buffered_s)
        except AudioError as e:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    async def _route(self, spec: SessionSpec, tenant: str, limit: int) -> tuple[str, int, str]:
        """Attaches to the session placed by CreateSession, or places one here: (id, epoch, token to send)."""
        try:
            if spec.session_id:
                rec = await self.router.attach(spec.session_id, spec.session_token, tenant, limit)
                token = ""
            else:
                rec, token = await self.router.create_local(tenant, limit)
        except RoutingError as e:
            raise SessionFailure(e.code, e.message, e.trailers) from None
        return rec.session_id, rec.epoch, token

    async def _supersede(self, sid: str, epoch: int) -> None:
        old = self.owned.get(sid)
        if old is not None and old.epoch < epoch:
            # The same session attached again (its client lost only its connection): the new stream wins. The
            # old stream's cleanup carries the old epoch, so it cannot release the record this stream now holds.
            old.log.info("superseded by a new stream for the same session", epoch=epoch)
            old.fail(SessionFailure(grpc.StatusCode.ABORTED, "another stream attached to this session; this one ends"))
            del self.owned[sid]
            await self.scheduler.release(old)

    async def _slot(self, avatar: Avatar, seed: int) -> int:
        try:
            return await self.scheduler.allocate(avatar.anchor, seed)
        except NoFreeSlotError:
            raise SessionFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"all {self.cfg.max_sessions} session slots of this replica are in use; retry "
                                 "later or on another replica") from None

    def _encoder(self, spec: SessionSpec, route: _RouteUndo) -> FrameEncoder:
        c = self.engine.cfg
        try:
            encoder = make_encoder(spec.video_encoding, c.width, c.height, c.fps, jpeg_quality=spec.jpeg_quality,
                                   bitrate_bps=spec.video_bitrate_bps)
        except Exception as e:
            route.resumable = False  # a config this server cannot encode: resuming it would fail the same way
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, f"cannot create the video encoder: {e}") from None
        if spec.resume_block > 0:
            # A resumed stream starts at the first block its client did not receive whole, whose first frames the
            # client may have had already and drops as duplicates: every frame of that block is a keyframe, so
            # the first frame it keeps decodes on its own (an inter-coded one would need the dropped keyframe).
            encoder.force_keyframes(self.engine.frames_per_block)
        return encoder

    def _still_ours(self, sid: str, epoch: int, route: _RouteUndo) -> None:
        if not self.router.holds(sid, epoch):
            # A newer stream attached while this one was being set up, or the session moved: this one yields, and
            # leaves the record alone (it is the newer stream's now).
            route.armed = False
            raise SessionFailure(grpc.StatusCode.ABORTED, "another stream attached to this session; this one ends")


def _attaches_again(e: BaseException) -> bool:
    """A refusal that the client answers by attaching again on the same placement: an unknown avatar, which the
    SDKs register again (RegisterAvatar) before they retry the stream."""
    return isinstance(e, UnknownAvatar)


class _RouteUndo:
    """Gives the routing record back when opening fails after it was taken; shielded, so that a cancelled opening
    still does it. ``resumable`` and ``armed`` are set by the step that failed."""

    def __init__(self, router: Router, sid: str, epoch: int) -> None:
        self.router, self.sid, self.epoch = router, sid, epoch
        self.resumable = True
        self.armed = True

    async def __call__(self) -> None:
        if self.armed:
            await asyncio.shield(self.router.release(self.sid, self.epoch, resumable=self.resumable))
