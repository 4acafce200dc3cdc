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


class UnknownAvatar(SessionFailure):
    """A session names an avatar that no replica knows (never registered, removed, or expired). Clients register it
    again and retry on the same placement (the SDKs do, once)."""

    def __init__(self, avatar_id: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND,
                         f"avatar {avatar_id!r} is not registered (or was removed); register it again with "
                         "RegisterAvatar (the same image gets the same id) or send reference_image")
