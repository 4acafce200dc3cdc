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


#: A watchdog wake-up this much later than due means this process's own event loop stood still (a busy agent,
#: a starved machine): the responses may be waiting, unread. Only the time the loop was actually watching counts.
LOOP_LAG_S = 0.1


async def read_within(call: Any, limit: float | None) -> tuple[Any, bool]:
    """The next response of ``call`` (``grpc.aio.EOF`` at its end), or ``(None, True)`` when none came within
    ``limit`` seconds (None: wait as long as it takes). The call's own failures propagate.

    Seconds during which this event loop itself stood still do not count toward ``limit``: when the wait ends
    late, the stream gets that long again (at most ``limit``) to deliver what it may already hold."""
    if limit is None:
        return await call.read(), False
    loop = asyncio.get_running_loop()
    # The read is not cancelled by the wait (cancelling a read cancels the call): only on a stall, or when
    # this task is cancelled (close() or a resume in another task), which stays CancelledError.
    read = asyncio.ensure_future(call.read())
    try:
        due = loop.time() + limit
        while True:
            done, _ = await asyncio.wait({read}, timeout=max(0.0, due - loop.time()))
            if done:
                return read.result(), False
            late = loop.time() - due
            if late < LOOP_LAG_S:
                break
            due = loop.time() + min(late, limit)
    except BaseException:
        read.cancel()
        raise
    read.cancel()
    return None, True
