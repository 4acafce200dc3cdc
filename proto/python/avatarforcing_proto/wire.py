"""Wire constants of ``avatarforcing.v1``, read once from the options of the proto file.

They are defined in proto/avatarforcing/v1/avatarforcing.proto (``extend google.protobuf.FileOptions``),
so the server, the Python SDK and the Go SDK read the same values and none of them spells them again.
"""

from __future__ import annotations

from typing import Any

from .v1 import avatarforcing_pb2 as _pb

# The generated stubs type extensions loosely; the values are checked by tests/test_protocol.py.
_opts: Any = _pb.DESCRIPTOR.GetOptions()

#: Trailer of FAILED_PRECONDITION from Stream: the address of the replica that owns the session.
OWNER_ADDRESS_TRAILER: str = _opts.Extensions[_pb.owner_address_trailer]
#: Trailer of RESOURCE_EXHAUSTED / UNAVAILABLE: milliseconds to wait before retrying.
RETRY_AFTER_TRAILER: str = _opts.Extensions[_pb.retry_after_trailer]
#: gRPC's own pushback trailer; the server sets it with the same value as RETRY_AFTER_TRAILER.
GRPC_RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
#: SessionConfig.sample_rate_hz bounds (a rate must also give whole samples per video frame).
MIN_SAMPLE_RATE_HZ: int = _opts.Extensions[_pb.min_sample_rate_hz]
MAX_SAMPLE_RATE_HZ: int = _opts.Extensions[_pb.max_sample_rate_hz]
#: The usual rates, each accepted at 25 fps.
COMMON_SAMPLE_RATES_HZ: tuple[int, ...] = tuple(_opts.Extensions[_pb.common_sample_rates_hz])

del _opts


def retry_trailers(seconds: float) -> tuple[tuple[str, str], ...]:
    """The trailing metadata telling a client to retry after ``seconds`` (ours and gRPC's pushback, equal)."""
    ms = str(int(seconds * 1000) + 1)
    return ((RETRY_AFTER_TRAILER, ms), (GRPC_RETRY_PUSHBACK_TRAILER, ms))

__all__ = [
    "OWNER_ADDRESS_TRAILER",
    "RETRY_AFTER_TRAILER",
    "GRPC_RETRY_PUSHBACK_TRAILER",
    "MIN_SAMPLE_RATE_HZ",
    "MAX_SAMPLE_RATE_HZ",
    "COMMON_SAMPLE_RATES_HZ",
    "retry_trailers",
]
