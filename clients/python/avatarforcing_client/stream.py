"""The bidirectional ``Stream`` call of a session: opening it (config out, ``SessionStarted`` in) and reading
it under the stall watchdog's limit. Sending, resuming and closing are :class:`~avatarforcing_client.Session`'s."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb

from .errors import ProtocolError

__all__ = ["open_stream", "read_within"]


async def open_stream(stub: Any, config: pb.SessionConfig,
                      metadata: Sequence[tuple[str, str]]) -> tuple[pb.SessionStarted, Any]:
    """One Stream call on ``stub``: the config, then ``SessionStarted``. Returns it and the call (a
    ``grpc.aio.StreamStreamCall``). Raises the call's status on refusal; the call is cancelled on any
    failure, cancellation included."""
    call = stub.Stream(metadata=metadata)
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


async def read_within(call: Any, limit: float | None) -> tuple[Any, bool]:
    """The next response of ``call`` (``grpc.aio.EOF`` at its end), or ``(None, True)`` when none came within
    ``limit`` seconds (None: wait as long as it takes). The call's own failures propagate."""
    if limit is None:
        return await call.read(), False
    # asyncio.timeout turns only its own expiry into TimeoutError: a cancellation of this task, or of the
    # call by close() or a resume in another task, stays CancelledError.
    try:
        async with asyncio.timeout(limit):
            return await call.read(), False
    except TimeoutError:
        return None, True
