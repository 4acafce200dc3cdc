"""Where a session's avatar comes from: this replica's registry, the routing store or the avatar volume (an avatar
registered elsewhere), or an uploaded image, decoded off the event loop under the tenant's image rate."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog

from avatarforcing import StreamEngine
from avatarforcing.text_context import load_context
from avatarforcing_proto.wire import retry_trailers

from .avatars import Avatar, AvatarDir, AvatarRegistry, RateLimited, TenantRateLimiter, content_digest, decode_pool
from .config import ServerConfig
from .failure import SessionFailure, UnknownAvatar
from .images import ImageError, load_reference_image
from .routing import Router
from .security import DEFAULT_TENANT
from .spec import SessionSpec

log = structlog.get_logger("avatarforcing.server")


class AvatarSource:
    """The replica's avatars. The routing store and the engine thread are attached by :meth:`attach` (the app makes
    them when it starts)."""

    def __init__(self, cfg: ServerConfig, engine: StreamEngine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.registry = AvatarRegistry(cfg.max_avatars, cfg.tenant_max_avatars, int(cfg.avatar_memory_mb * 2**20))
        self.avatar_dir = AvatarDir(cfg.avatar_dir) if cfg.avatar_dir else None
        # Decoding an image costs up to a second of CPU (4096x4096): rate-limited per tenant, run one at a time
        # on a low-priority thread, so that one tenant's uploads cannot stall the other sessions' frames.
        self.image_rate = TenantRateLimiter(cfg.image_rate_per_s, cfg.image_burst, "new images")
        self._decode_pool = decode_pool()
        self._router: Router | None = None
        self._in_engine: Callable[..., Awaitable[Any]] | None = None
        # Registrations under way, by (tenant, content digest, requested id): sessions that send the same new face at
        # once share one decode and one charge against the image rate, instead of each being charged (and the
        # later ones refused) for an image the first is already registering.
        self._registering: dict[tuple[str, str, str], asyncio.Task[Avatar]] = {}

    def attach(self, router: Router, in_engine: Callable[..., Awaitable[Any]]) -> None:
        self._router, self._in_engine = router, in_engine

    @property
    def router(self) -> Router:
        assert self._router is not None, "App.start() first"
        return self._router

    async def from_image(self, data: bytes, name: str = "", tenant: str = DEFAULT_TENANT,
                         avatar_id: str | None = None, text_context: bytes = b"", rate_limited: bool = True) -> Avatar:
        """The avatar of a face (and, for a model with a text context, of a prompt's context file).

        An image this tenant registered before is not decoded again. A new one counts against the tenant's image
        rate (``rate_limited``: not for an avatar the server itself reloads from a store), and is decoded on the
        low-priority decode thread, not on the event loop. Callers that send the same new image at once share its
        one registration (one decode, one charge against the rate).
        """
        assert self._in_engine is not None, "App.start() first"
        loop = asyncio.get_running_loop()
        digest = await loop.run_in_executor(self._decode_pool, content_digest, data, text_context)
        known = self.registry.by_digest(digest, tenant)
        if known is not None and avatar_id in (None, known.id):
            return known
        key = (tenant, digest, avatar_id or "")
        task = self._registering.get(key)
        if task is None:
            task = loop.create_task(self._register(data, digest, name, tenant, avatar_id, text_context, rate_limited))
            self._registering[key] = task
            task.add_done_callback(lambda t: self._registered(key, t))
        # Shielded: a caller that goes away does not cancel the registration the others wait for.
        return await asyncio.shield(task)

    def _registered(self, key: tuple[str, str, str], task: asyncio.Task[Avatar]) -> None:
        if self._registering.get(key) is task:
            del self._registering[key]
        if not task.cancelled():
            task.exception()  # retrieved here too: every caller may have gone away before it failed

    async def _register(self, data: bytes, digest: str, name: str, tenant: str, avatar_id: str | None,
                        text_context: bytes, rate_limited: bool) -> Avatar:
        assert self._in_engine is not None
        loop = asyncio.get_running_loop()
        if rate_limited:
            self.image_rate.take(tenant)
        c = self.engine.cfg
        ctx = None
        if text_context:
            if not self.engine.per_slot_text:
                raise ValueError(f"this server's model ({c.name}) has no text prompt: register the avatar "
                                 "without text_context")
            ctx = load_context(text_context, text_len=c.text_len, text_dim=c.text_dim, name="the uploaded context")
        img = await loop.run_in_executor(
            self._decode_pool, lambda: load_reference_image(data, c.width, c.height, max_bytes=self.cfg.max_image_bytes,
                                                            max_pixels=self.cfg.max_image_pixels))
        anchor = await self._in_engine(self.engine.prepare_anchor, img, ctx)
        avatar = self.registry.add(name, anchor, digest, tenant, avatar_id, image=data, text_context=text_context)
        log.info("avatar registered", avatar_id=avatar.id, name=name, tenant=tenant)
        return avatar

    async def store(self, avatar: Avatar) -> None:
        """Makes ``avatar`` loadable by every replica: the routing store, and the shared avatar volume if set."""
        await self.router.put_avatar(avatar.id, avatar.tenant, avatar.image, avatar.text_context)
        if self.avatar_dir is not None:
            try:
                await asyncio.to_thread(self.avatar_dir.put, avatar.id, avatar.tenant, avatar.image,
                                        avatar.text_context)
            except OSError as e:
                log.warning("could not write the avatar to the avatar volume", avatar_id=avatar.id, error=str(e))

    async def load(self, avatar_id: str, tenant: str) -> Avatar | None:
        """An avatar registered on another replica (or before a restart): from the routing store, else the volume."""
        stored = await self.router.get_avatar(avatar_id, tenant)
        if stored is None and self.avatar_dir is not None:
            stored = await asyncio.to_thread(self.avatar_dir.get, avatar_id, tenant)
            if stored is not None:  # back into the store for the next replica
                await self.router.put_avatar(avatar_id, tenant, *stored)
        if stored is None:
            return None
        try:
            return await self.from_image(stored[0], "", tenant, avatar_id, text_context=stored[1], rate_limited=False)
        except ValueError as e:  # ImageError, or a context this model cannot take
            raise SessionFailure(grpc.StatusCode.INTERNAL, f"stored avatar {avatar_id} is unusable: {e}") from None

    async def for_session(self, spec: SessionSpec, tenant: str) -> Avatar:
        """The avatar a session names: registered (here, or on another replica), or sent as its reference image."""
        if spec.reference == "avatar_id":
            avatar = self.registry.get(spec.avatar_id, tenant)
            if avatar is None:  # registered on another replica: its image is in the routing store
                avatar = await self.load(spec.avatar_id, tenant)
            if avatar is None:
                raise UnknownAvatar(spec.avatar_id)
            return avatar
        try:
            return await self.from_image(spec.reference_image, "", tenant)
        except ImageError as e:
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except RateLimited as e:
            raise SessionFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_trailers(e.retry_after_s)) from None

    async def restore(self, in_use: list[tuple[str, str]]) -> None:
        """The routing store came back without our records (restarted empty, FLUSHALL): the avatars in use here
        (``(avatar id, tenant)`` of each live session) go back in, so that their sessions can still resume on
        another replica."""
        seen: set[str] = set()
        for avatar_id, tenant in in_use:
            a = self.registry.get(avatar_id, tenant)
            if a is not None and a.id not in seen and a.image:
                seen.add(a.id)
                await self.router.put_avatar(a.id, a.tenant, a.image, a.text_context)
        if seen:
            log.info("avatars of live sessions written back to the routing store", count=len(seen))
