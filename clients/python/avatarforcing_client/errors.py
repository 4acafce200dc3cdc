"""The SDK's own exceptions, and the status it raises when it enforces a deadline itself."""

from __future__ import annotations

import grpc
import grpc.aio

__all__ = ["SessionClosedError", "ProtocolError", "StreamStalledError", "status_error"]


def status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A status raised by the SDK itself (no call carried it), e.g. a deadline it enforces."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


class SessionClosedError(RuntimeError):
    """Raised when sending on a session that was closed or whose stream has finished."""


class ProtocolError(RuntimeError):
    """Raised when the server's responses do not follow the protocol (e.g. no SessionStarted)."""


class StreamStalledError(grpc.aio.AioRpcError):
    """Raised by :meth:`Session.events` when a started ``PACING_REALTIME`` stream delivered nothing for the
    client's ``stall_timeout`` and the session could not be resumed (resuming is off, or the server does not
    support it). It is a :class:`grpc.aio.AioRpcError` with code ``UNAVAILABLE``, so code that handles a
    broken stream handles this one too; ``address`` is the replica that stopped answering."""

    def __init__(self, address: str, seconds: float) -> None:
        self.address = address
        self.seconds = seconds
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
            f"no response from the replica at {address or 'the target'} for {seconds:.3g} s on a PACING_REALTIME "
            "stream (the server sends frames continuously): the replica is frozen or unreachable", None)
