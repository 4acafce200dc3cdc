"""Placement and retries: which statuses send the SDK to the next target or to placement again, and the
server's hints (the owner's address of a redirect, how long to wait) read from a status's trailer."""

from __future__ import annotations

import grpc
import grpc.aio

from avatarforcing_proto.wire import OWNER_ADDRESS_TRAILER, RETRY_AFTER_TRAILER

__all__ = ["PLACEMENT_ATTEMPT_S", "RETRY_PLACEMENT", "TRY_NEXT_TARGET", "RESUMABLE", "trailer", "retry_after",
           "owner_address"]

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
