"""Requests off the wire: bytes that are not the method's protobuf message are answered INVALID_ARGUMENT.

grpc.aio runs a method's request deserializer (the generated code's ``pb.X.FromString``) itself. A
``DecodeError`` raised there is, to grpc, a servicer that crashed: a unary RPC answers UNKNOWN with the Python
exception's name and grpc logs a traceback; in a stream the error comes out of the request iterator inside the
handler (INTERNAL). :func:`add_guarded_servicer` registers a servicer with deserializers that never raise: bytes
that do not parse become a :class:`Malformed` marker, which the wrapped handlers answer with INVALID_ARGUMENT
before the servicer sees anything. In a request stream the marker raises :class:`SessionFailure`
(INVALID_ARGUMENT) from the request iterator, so the servicer ends that one stream as it ends any failed
session; other sessions go on.

Interceptors (auth) still run first: they wrap these handlers, so an unauthenticated call is refused before its
request is looked at.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .session import SessionFailure

log = structlog.get_logger("avatarforcing.wire")

_MAX_DEPTH = 64  # nesting the explanation follows (the parser itself stops at 100)
_MAX_FIELDS = 10_000  # fields the explanation walks before giving up (it runs on the event loop)


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse; ``message`` is the status details to answer with."""

    message: str


def safe_deserializer(message_cls: Any) -> Callable[[bytes], Any]:
    """``message_cls.FromString`` that returns a :class:`Malformed` instead of raising."""
    desc: Descriptor = message_cls.DESCRIPTOR

    def deserialize(raw: bytes) -> Any:
        try:
            return message_cls.FromString(raw)
        except Exception as e:  # DecodeError, or anything else a parser may raise: never into grpc
            why = explain(raw, desc) or str(e) or type(e).__name__
            return Malformed(f"request is not a valid {desc.full_name} protobuf message ({why}); the client must "
                             f"send a {desc.name} serialized with the {desc.file.package} proto")

    return deserialize


class _Requests:
    """A request stream whose first malformed message ends the stream with INVALID_ARGUMENT."""

    def __init__(self, it: Any) -> None:
        self._it = it

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        req = await anext(self._it)
        if isinstance(req, Malformed):
            raise SessionFailure(grpc.StatusCode.INVALID_ARGUMENT, req.message)
        return req


def _guard(method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = getattr(h.request_deserializer, "__self__", None)
    if parse is None or not hasattr(parse, "DESCRIPTOR"):
        raise TypeError(f"{method}: the request deserializer is not a protobuf message's FromString")
    kw = {"request_deserializer": safe_deserializer(parse), "response_serializer": h.response_serializer}
    if not h.request_streaming and not h.response_streaming:
        behaviour = h.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                log.info("malformed request", method=method, reason=request.message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if h.request_streaming and h.response_streaming and inspect.isasyncgenfunction(h.stream_stream):
        stream_behaviour = h.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            responses = stream_behaviour(_Requests(requests), context)
            try:
                async for r in responses:
                    yield r
            except SessionFailure as f:  # a servicer that does not answer its own failures (reflection)
                await context.abort(f.code, f.message)
            finally:
                await responses.aclose()  # its own finally (slot release) runs now, not at garbage collection

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)
    if h.request_streaming and h.response_streaming:  # a coroutine that reads and writes through the context
        stream_coro = h.stream_stream

        async def stream_stream_coro(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await stream_coro(_Requests(requests), context)
            except SessionFailure as f:
                await context.abort(f.code, f.message)

        return grpc.stream_stream_rpc_method_handler(stream_stream_coro, **kw)
    if not h.request_streaming and h.response_streaming:  # health's Watch: a coroutine writing to the context
        unary_stream_behaviour = h.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                log.info("malformed request", method=method, reason=request.message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            result = unary_stream_behaviour(request, context)
            if inspect.isasyncgen(result):
                return result
            return await result

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    raise TypeError(f"{method}: client-streaming methods are not guarded")


class _Capture:
    """Stands in for the server while grpc's generated ``add_XServicer_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers also come by name, below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)


def add_guarded_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` as ``add_to_server`` (generated: ``add_XServicer_to_server``) would, with every
    method's request deserializer guarded (see the module docstring)."""
    capture = _Capture()
    add_to_server(servicer, capture)
    if not capture.services:
        raise RuntimeError("the generated code registered no method handlers by name; regenerate it with "
                           "grpcio-tools >= 1.62")
    for service, handlers in capture.services.items():
        guarded = {name: _guard(f"/{service}/{name}", h) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)


# ---- what is wrong with the bytes ------------------------------------------------------------------------
class _WireError(Exception):
    def __init__(self, at: int, what: str) -> None:
        super().__init__(what)
        self.at = at


def explain(raw: bytes, desc: Descriptor) -> str:
    """Where and why ``raw`` is not a ``desc`` message, for a person: "at byte 12 of 40: ..."; "" when the walk
    finds nothing (the parser's own message is used then)."""
    budget = [_MAX_FIELDS]
    try:
        _walk(raw, 0, len(raw), desc, "", 0, None, budget)
    except _WireError as e:
        return f"at byte {e.at} of {len(raw)}: {e}"
    except _GaveUp:
        pass
    return ""


class _GaveUp(Exception):
    pass


def _varint(buf: bytes, pos: int, end: int, at: int, what: str) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        b = buf[i]
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i + 1
    if end - pos >= 10:
        raise _WireError(at, f"{what} is a varint longer than 10 bytes")
    raise _WireError(at, f"{what} is cut off: its varint runs past the end")


_FIXED64 = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
_FIXED32 = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
_DELIMITED = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}


def _wire_type(fd: FieldDescriptor) -> int:
    if fd.type in _FIXED64:
        return 1
    if fd.type in _FIXED32:
        return 5
    if fd.type in _DELIMITED:
        return 2
    return 3 if fd.type == FieldDescriptor.TYPE_GROUP else 0


def _packable(fd: FieldDescriptor) -> bool:
    """A repeated scalar: also accepted packed (wire type 2)."""
    return bool(fd.is_repeated) and _wire_type(fd) in (0, 1, 5)


def _walk(buf: bytes, pos: int, end: int, desc: Descriptor | None, path: str, depth: int, group: int | None,
          budget: list[int]) -> int:
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            raise _GaveUp
        at = pos
        tag, pos = _varint(buf, pos, end, at, "a field tag")
        number, wire_type = tag >> 3, tag & 7
        fd: FieldDescriptor | None = desc.fields_by_number.get(number) if desc is not None else None
        if fd is not None and wire_type != _wire_type(fd) and not (wire_type == 2 and _packable(fd)):
            # The parser keeps it as an unknown field; say so, since the field's name would mislead.
            name = (f"field #{number} with wire type {wire_type} (not {path}{fd.name}, which has wire type "
                    f"{_wire_type(fd)})")
            fd = None
        elif fd is not None:
            name = f"field {path}{fd.name}"
        else:
            name = f"unknown field #{number}" + (f" in {path[:-1]}" if path else "")
        if wire_type == 4:
            if group == number:
                return pos
            raise _WireError(at, f"an end-group tag for field #{number} that no group opened")
        if number == 0 or number > 2**29 - 1:
            raise _WireError(at, f"field number {number} does not exist (valid: 1 to 2^29-1)")
        if wire_type == 0:
            _, pos = _varint(buf, pos, end, at, name)
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if end - pos < size:
                raise _WireError(at, f"{name} needs {size} bytes but only {end - pos} remain")
            pos += size
        elif wire_type == 2:
            n, pos = _varint(buf, pos, end, at, f"the length of {name}")
            if n > end - pos:
                raise _WireError(at, f"{name} claims {n} bytes but only {end - pos} remain (truncated, or not "
                                     "this message)")
            if fd is not None and fd.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= _MAX_DEPTH:
                    raise _WireError(at, f"messages nested more than {_MAX_DEPTH} deep")
                _walk(buf, pos, pos + n, fd.message_type, f"{path}{fd.name}.", depth + 1, None, budget)
            elif fd is not None and fd.type == FieldDescriptor.TYPE_STRING:
                try:
                    buf[pos : pos + n].decode("utf-8")
                except UnicodeDecodeError:
                    raise _WireError(at, f"{name} is a string but not valid UTF-8") from None
            pos += n
        elif wire_type == 3:
            if depth >= _MAX_DEPTH:
                raise _WireError(at, f"groups nested more than {_MAX_DEPTH} deep")
            pos = _walk(buf, pos, end, None, path, depth + 1, number, budget)
        else:
            raise _WireError(at, f"{name} has wire type {wire_type}, which does not exist (0 to 5)")
    if group is not None:
        raise _WireError(end, f"the group of field #{group} is never closed")
    return pos
