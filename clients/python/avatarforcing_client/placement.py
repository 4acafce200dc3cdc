"""Placement and retries (docs/routing.md): which statuses send the SDK to the next target or to placement again,
the server's hints (the owner's address of a redirect, how long to wait) read from a status's trailer, and
:class:`Placement`, which places a session (``CreateSession``) and opens its stream on the replica named."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection
from typing import Any, Protocol

import grpc
import grpc.aio

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb
from avatarforcing_proto.wire import OWNER_ADDRESS_TRAILER, RETRY_AFTER_TRAILER

from .errors import status_error
from .stream import open_stream

__all__ = ["PLACEMENT_ATTEMPT_S", "RETRY_PLACEMENT", "TRY_NEXT_TARGET", "RESUMABLE", "trailer", "retry_after",
           "owner_address", "Placement", "PlacementClient"]

#: Per-attempt deadline of a CreateSession (and of re-registering an avatar) inside placement/resume.
PLACEMENT_ATTEMPT_S = 2.0
#: Placement (or the attach after it) failures after which placement is asked again.
RETRY_PLACEMENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                   grpc.StatusCode.DEADLINE_EXCEEDED)
#: Unary-call failures after which the next target is tried (the target is unreachable or silent).
TRY_NEXT_TARGET = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Stream failures after which a session resumes on another replica.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def trailer(e: grpc.aio.AioRpcError, key: str) -> str | None:
    for k, v in e.trailing_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def retry_after(e: grpc.aio.AioRpcError, default: float) -> float:
    """Seconds the server asks to wait before retrying (its retry trailer), else ``default``."""
    v = trailer(e, RETRY_AFTER_TRAILER)
    try:
        return float(v) / 1000 if v else default
    except ValueError:
        return default


def owner_address(e: grpc.aio.AioRpcError) -> str | None:
    """The replica that owns the session, named by a ``FAILED_PRECONDITION`` redirect, else None."""
    return trailer(e, OWNER_ADDRESS_TRAILER) if e.code() == grpc.StatusCode.FAILED_PRECONDITION else None


class PlacementClient(Protocol):
    """What :class:`Placement` uses of :class:`~avatarforcing_client.AvatarForcingClient`."""

    target: str
    attach_timeout: float
    placement_timeout: float
    resume_timeout: float

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]: ...

    def _ensure_stub(self) -> Any: ...

    def _stub_for(self, address: str) -> Any: ...

    async def _unary(self, method: str, request: Any, timeout: float | None, *, deadline: float | None = None,
                     avoid: Collection[str] = (), failed: set[str] | None = None) -> Any: ...

    async def _reregister(self, avatar_id: str, deadline: float) -> str | None: ...


class Placement:
    """Where one session runs: its routing identity (the session id and token placement gave it) and the replica
    its stream runs on (:attr:`address`). :meth:`place_and_open` asks for placement and opens the stream there,
    retrying within the client's time limits; the session's ``config`` is the one it was created with (its
    ``avatar_id`` is updated when a lost avatar is registered again)."""

    def __init__(self, client: PlacementClient, config: pb.SessionConfig) -> None:
        self.client = client
        self.config = config
        self.session_id = ""
        self.token = ""
        self.routed = False  # placed by CreateSession (the server supports resuming)
        self.address = ""  # the replica the stream runs on
        self._avatar_retry = True  # the one re-registration of a lost avatar allowed per placement

    def adopt(self, started: pb.SessionStarted) -> None:
        """A session the server placed by itself (no CreateSession): the token in its SessionStarted resumes it."""
        if started.session_token:
            self.token = started.session_token
            self.session_id = started.session_id

    async def _open(self, stub: Any, resume_block: int) -> tuple[pb.SessionStarted, Any]:
        """One Stream call with the session's config (its ids and ``resume_block`` once placed)."""
        config = pb.SessionConfig()
        config.CopyFrom(self.config)
        if self.routed:
            config.session_id, config.session_token = self.session_id, self.token
            config.resume_block = resume_block
        return await open_stream(stub, config, self.client.metadata)

    async def _attach(self, stub: Any, resume_block: int, deadline: float,
                      address: str) -> tuple[pb.SessionStarted, Any]:
        """:meth:`_open` within ``attach_timeout`` and ``deadline`` (``DEADLINE_EXCEEDED`` when it runs out: the
        call is cancelled). A refusal naming a lost avatar that this client registered re-registers it and
        attaches once more (once per placement)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"no time left to attach to the replica at {address or 'the target'}")
            budget = min(self.client.attach_timeout, left)
            try:
                async with asyncio.timeout(budget):
                    return await self._open(stub, resume_block)
            except TimeoutError:
                raise status_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"the replica at {address or 'the target'} did not start the stream within "
                                   f"{budget:.3g} s") from None
            except grpc.aio.AioRpcError as e:
                avatar_id = self.config.avatar_id if self.config.WhichOneof("reference") == "avatar_id" else ""
                if not (self._avatar_retry and avatar_id and e.code() == grpc.StatusCode.NOT_FOUND
                        and "avatar" in (e.details() or "").lower()):
                    raise
                self._avatar_retry = False
                new_id = await self.client._reregister(avatar_id, deadline)
                if new_id is None:
                    raise
                self.config.avatar_id = new_id

    async def place_and_open(self, resume: bool, resume_block: int = 0,
                             avoid: Collection[str] = ()) -> tuple[pb.SessionStarted, Any]:
        """Placement, then the stream on the replica it names; retries while replicas are full,
        unreachable, silent or the session is owned elsewhere, up to the client's time limit, which also
        bounds every attempt. ``resume``: the session exists and resumes at ``resume_block``. ``avoid``:
        replicas asked for placement last (one that just stopped answering)."""
        client = self.client
        front = client._ensure_stub()
        limit = client.resume_timeout if resume else client.placement_timeout
        deadline = time.monotonic() + limit
        self._avatar_retry = True
        delay = 0.05
        address: str | None = None
        silent = set(avoid)  # replicas that did not answer: asked for placement last
        while True:
            target = address
            try:
                if address is None:
                    try:
                        placed = await client._unary(
                            "CreateSession",
                            pb.CreateSessionRequest(resume_session_id=self.session_id if resume else "",
                                                    session_token=self.token if resume else ""),
                            PLACEMENT_ATTEMPT_S, deadline=deadline, avoid=silent, failed=silent)
                    except grpc.aio.AioRpcError as e:
                        if e.code() != grpc.StatusCode.UNIMPLEMENTED or resume:
                            raise
                        return await self._attach(front, 0, deadline, client.target)  # a server without routing
                    if not resume:
                        self.session_id, self.token = placed.session_id, placed.session_token
                    self.routed = True
                    address = target = placed.address
                started, call = await self._attach(client._stub_for(address), resume_block, deadline, address)
                self.address = address
                return started, call
            except grpc.aio.AioRpcError as e:
                owner = owner_address(e)
                if owner is None and e.code() not in RETRY_PLACEMENT:
                    raise
                if target and e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    silent.add(target)
                wait = retry_after(e, delay) if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else delay
                wait *= 0.5 + random.random()
                if time.monotonic() + wait > deadline:
                    raise  # the server's own answer, not a DEADLINE_EXCEEDED after waiting out the time left
                address = owner  # dial the owner next; otherwise ask for placement again
                await asyncio.sleep(wait)
                delay = min(delay * 2, 0.5)
