"""The one exception that ends a session with a gRPC status (the other sessions go on)."""

from __future__ import annotations

import grpc


class SessionFailure(Exception):
    """Ends one session with a gRPC status; others go on."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers
