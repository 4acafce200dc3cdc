"""`avatarforcing view`: watch the avatar live in a browser.

An HTTP server (aiohttp) serves one page (``static/view.html`` + ``view.js``) and bridges each of the
page's WebSockets to one gRPC ``Stream`` session through the Python SDK. Each page is one session;
several pages are several sessions.

The page picks a face (an uploaded image, the bundled one, or a registered avatar id), sends
speech (the microphone, or a WAV file played out in real time) and shows the avatar with Media Source
Extensions: the session runs in ``VIDEO_ENCODING_FMP4``, whose init segment (``SessionStarted.init_segment``)
and per-frame ``moof`` + ``mdat`` fragments go into one ``SourceBuffer``. The re-timed audio (one
``AudioOut`` per block) plays through WebAudio, scheduled against the video's ``currentTime`` so that both
stay on the session's timeline (``AudioOut.start_sample / rate`` and ``VideoFrame.index / fps`` are the
same clock).

The WebSocket protocol (``/ws``), page to bridge:

* text ``{"type": "start", "sample_rate": 16000, "image": "<base64 PNG/JPEG>"}`` (or ``"avatar_id"``
  instead of ``"image"``; optional ``"utterance_id"``, ``"seed"``): first message, opens the session;
* binary: PCM16LE mono audio at ``sample_rate`` (at most 1 s per message);
* text ``{"type": "end_of_audio"}``, ``{"type": "interrupt"}``.

Bridge to page:

* text ``{"type": "started", ...}``: ``SessionStarted``'s fields and ``"codec"`` (the MIME type for
  ``MediaSource.addSourceBuffer``, its ``avc1.PPCCLL`` derived from the init segment's ``avcC``);
  sent again after the SDK resumed the session on another replica;
* binary messages ``[kind: u8][n: u32 big-endian][n bytes of JSON header][payload]`` with kind
  1 (init segment; header ``{"first_frame_index"}``), 2 (a video fragment; ``{"i", "k", "b"}``: index,
  keyframe, block) or 3 (a block's audio, PCM16LE; ``{"b", "s", "n", "o", "e", "z"}``: block, start sample,
  real samples, real offset, source end sample, silent: ``AudioOut``'s fields);
* text ``{"type": "stats", ...}`` (``Stats``), ``{"type": "end", "reason", "message"}`` and
  ``{"type": "error", "code", "message"}`` (a gRPC status, or a bad request); the socket then closes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import struct
import sys
from importlib import resources
from typing import Any

import grpc
from aiohttp import WSMsgType, web

from avatarforcing_client import AvatarForcingClient, SessionClosedError, pb
from avatarforcing_service.codecs import find_box, iter_boxes

from .common import assets_dir

__all__ = ["KIND_AUDIO", "KIND_FRAME", "KIND_INIT", "ViewServer", "avc_codec", "pack", "run_view"]

KIND_INIT = 1
KIND_FRAME = 2
KIND_AUDIO = 3

MAX_IMAGE_BYTES = 16 * 2**20
# The files of avatarforcing/assets the page may load (the bundled face and speech).
ASSET_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".wav": "audio/wav"}
STATIC_FILES = {"view.html": "text/html", "view.js": "text/javascript"}


class BadRequest(ValueError):
    """A start message the bridge cannot act on; the message is for a person."""


def pack(kind: int, header: dict[str, Any], payload: bytes) -> bytes:
    """One binary WebSocket message: kind, JSON header length, JSON header, payload."""
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">BI", kind, len(h)) + h + payload


def avc_codec(init_segment: bytes) -> str:
    """The RFC 6381 codec of the H.264 track in an MP4 init segment, e.g. ``avc1.42C01E``.

    Profile, constraint flags and level are bytes 1-3 of the ``avcC`` box found under
    ``moov/trak/mdia/minf/stbl/stsd/avc1``. Raises ``ValueError`` when there is none.
    """
    data = bytes(init_segment)
    off, size = find_box(data, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"])
    # stsd: header (8), version/flags (4), entry_count (4), then sample entries; a visual sample entry has
    # 78 bytes of fields after its header before its child boxes.
    for kind, eoff, esize in iter_boxes(data, off + 16, off + size):
        if kind in (b"avc1", b"avc3"):
            for child, coff, csize in iter_boxes(data, eoff + 8 + 78, eoff + esize):
                if child == b"avcC" and csize >= 12:
                    profile, compat, level = data[coff + 9], data[coff + 10], data[coff + 11]
                    return f"{kind.decode()}.{profile:02X}{compat:02X}{level:02X}"
            raise ValueError("no avcC box in the init segment's sample entry")
    raise ValueError("the init segment has no H.264 (avc1/avc3) sample entry")


def _started_json(st: pb.SessionStarted) -> dict[str, Any]:
    return {
        "type": "started",
        "session_id": st.session_id,
        "node_id": st.node_id,
        "fps": st.fps,
        "width": st.width,
        "height": st.height,
        "frames_per_block": st.frames_per_block,
        "lookahead_ms": st.lookahead_ms,
        "latency_ms": st.latency_ms,
        "audio_sample_rate_hz": st.audio_sample_rate_hz,
        "avatar_id": st.avatar_id,
        "first_frame_index": st.first_frame_index,
        "idle_timeout_ms": st.idle_timeout_ms,
        "codec": f'video/mp4; codecs="{avc_codec(st.init_segment)}"',
    }


def _stats_json(s: pb.Stats) -> dict[str, Any]:
    return {
        "type": "stats",
        "frames_sent": s.frames_sent,
        "frames_dropped": s.frames_dropped,
        "audio_samples_received": s.audio_samples_received,
        "silence_samples_inserted": s.silence_samples_inserted,
        "queue_depth": s.queue_depth,
        "anchor_similarity": s.anchor_similarity,
    }


def _parse_start(text: str) -> dict[str, Any]:
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"the first message is not JSON: {e}") from None
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise BadRequest('the first message must be {"type": "start", ...}')
    kw: dict[str, Any] = {}
    rate = msg.get("sample_rate", 16000)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise BadRequest(f"sample_rate must be a positive integer, got {rate!r}")
    kw["sample_rate"] = rate
    image, avatar_id = msg.get("image"), msg.get("avatar_id")
    if bool(image) == bool(avatar_id):
        raise BadRequest("give exactly one of image (a PNG or JPEG, base64) and avatar_id")
    if image:
        if not isinstance(image, str) or len(image) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise BadRequest(f"image must be a base64 string of at most {MAX_IMAGE_BYTES >> 20} MiB")
        try:
            kw["image"] = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("image is not valid base64") from None
    else:
        if not isinstance(avatar_id, str):
            raise BadRequest("avatar_id must be a string")
        kw["avatar_id"] = avatar_id.strip()
    utterance = msg.get("utterance_id", "view")
    kw["utterance_id"] = str(utterance)[:128]
    seed = msg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadRequest(f"seed must be a non-negative integer, got {seed!r}")
    kw["seed"] = seed
    return kw



class ViewServer:
    """The page and the WebSocket bridge, on one HTTP port.

    Args:
        target: the AvatarForcing server (``host:port``, or a list, as for :class:`AvatarForcingClient`).
        token: bearer token for the server (default: ``AVATARFORCING_TOKEN``).
        client_kw: more :class:`AvatarForcingClient` arguments (``credentials=`` for TLS, ...).
    """

    def __init__(self, target: str, *, token: str | None = None, **client_kw: Any) -> None:
        self.target = target
        self._client_args = dict(client_kw, token=token)
        self._client: AvatarForcingClient | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self.sessions_started = 0  #: sessions opened through this bridge
        self.sessions_live = 0  #: sessions open now
        self.host = ""
        self.port = 0
        self.app = web.Application(client_max_size=MAX_IMAGE_BYTES * 2)
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/static/{name}", self._static)
        self.app.router.add_get("/assets/{name}", self._asset)
        self.app.router.add_get("/api/info", self._info)
        self.app.router.add_get("/ws", self._ws)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}/"

    async def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        """Listen on ``host:port`` (0: any free port; :attr:`port` tells which)."""
        self._client = AvatarForcingClient(self.target, **self._client_args)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await self._client.close()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.host, self.port = host, int(addresses[0][1]) if addresses else port

    async def stop(self) -> None:
        """Close every page's socket (their sessions end) and stop listening. Idempotent."""
        for ws in list(self._sockets):
            await ws.close(code=1001, message=b"the view server stops")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- HTTP ---------------------------------------------------------------------------------

    @staticmethod
    def _static_bytes(name: str) -> bytes:
        return resources.files("avatarforcing_tools").joinpath("static", name).read_bytes()

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static_bytes("view.html"), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            raise web.HTTPNotFound(text=f"no static file {name!r}")
        return web.Response(body=self._static_bytes(name), content_type=STATIC_FILES[name], charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        path = assets_dir() / name
        kind = ASSET_TYPES.get(path.suffix.lower())
        if kind is None or "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return web.Response(body=path.read_bytes(), content_type=kind)

    async def _info(self, request: web.Request) -> web.Response:
        assert self._client is not None
        try:
            info = await self._client.server_info(timeout=5)
        except grpc.aio.AioRpcError as e:
            return web.json_response({"error": {"code": e.code().name, "message": e.details()}}, status=502)
        return web.json_response({
            "target": self.target,
            "model": info.model.name,
            "trained": info.model.trained,
            "width": info.stream.width,
            "height": info.stream.height,
            "fps": info.stream.fps,
            "lookahead_ms": info.stream.lookahead_ms,
            "supported_sample_rates_hz": list(info.supported_sample_rates_hz),
            "capacity_sessions": info.capacity_sessions,
            "free_slots": info.free_slots,
            "assets": sorted(p.name for p in assets_dir().iterdir() if p.suffix.lower() in ASSET_TYPES),
        })

    # -- the bridge ---------------------------------------------------------------------------

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=MAX_IMAGE_BYTES * 2)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._bridge(ws)
        except BadRequest as e:
            await self._send_error(ws, "INVALID_ARGUMENT", str(e))
        except grpc.aio.AioRpcError as e:
            await self._send_error(ws, e.code().name, e.details() or "")
        except (ConnectionError, asyncio.CancelledError):
            pass  # the page went away
        finally:
            self._sockets.discard(ws)
            if not ws.closed:
                await ws.close()
        return ws

    @staticmethod
    async def _send_error(ws: web.WebSocketResponse, code: str, message: str) -> None:
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": "error", "code": code, "message": message})

    async def _bridge(self, ws: web.WebSocketResponse) -> None:
        msg = await ws.receive(timeout=60)
        if msg.type != WSMsgType.TEXT:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            raise BadRequest('the first message must be {"type": "start", ...} (text)')
        kw = _parse_start(msg.data)
        assert self._client is not None
        try:
            session = self._client.session(video_encoding=pb.VIDEO_ENCODING_FMP4, pacing=pb.PACING_REALTIME, **kw)
        except ValueError as e:  # the SDK's own checks (sample rate, image)
            raise BadRequest(str(e)) from None
        async with session as s:
            self.sessions_started += 1
            self.sessions_live += 1
            try:
                await self._send_started(ws, s.started)
                pump = asyncio.create_task(self._pump(s, ws))
                feed = asyncio.create_task(self._feed(s, ws))
                try:
                    done, _ = await asyncio.wait({pump, feed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (pump, feed):
                        t.cancel()
                    await asyncio.gather(pump, feed, return_exceptions=True)
                if pump in done:
                    pump.result()  # a gRPC error goes to the page
                if feed in done:
                    feed.result()
            finally:
                self.sessions_live -= 1

    @staticmethod
    async def _send_started(ws: web.WebSocketResponse, st: pb.SessionStarted) -> None:
        await ws.send_json(_started_json(st))
        await ws.send_bytes(pack(KIND_INIT, {"first_frame_index": st.first_frame_index}, st.init_segment))

    async def _pump(self, s: Any, ws: web.WebSocketResponse) -> None:
        """Server to page: frames, audio, stats, the end."""
        generation = s.generation
        async for ev in s.events():
            if s.generation != generation:  # resumed on another replica: a new init segment and timeline
                generation = s.generation
                await self._send_started(ws, s.started)
            if isinstance(ev, pb.VideoFrame):
                await ws.send_bytes(pack(KIND_FRAME, {"i": ev.index, "k": ev.keyframe, "b": ev.block_index},
                                         ev.data))
            elif isinstance(ev, pb.AudioOut):
                await ws.send_bytes(pack(KIND_AUDIO, {"b": ev.block_index, "s": ev.start_sample, "n": ev.real_samples,
                                                      "o": ev.real_offset, "e": ev.source_end_sample, "z": ev.silent},
                                         ev.data))
            elif isinstance(ev, pb.Stats):
                await ws.send_json(_stats_json(ev))
            elif isinstance(ev, pb.End):
                await ws.send_json({"type": "end", "reason": pb.EndReason.Name(ev.reason), "message": ev.message})
                return
        await ws.send_json({"type": "end", "reason": "STREAM_CLOSED", "message": "the server closed the stream"})

    async def _feed(self, s: Any, ws: web.WebSocketResponse) -> None:
        """Page to server: audio and controls, until the page closes its socket."""
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if len(msg.data) % 2:
                    raise BadRequest(f"audio message of {len(msg.data)} bytes: PCM16 needs an even number")
                try:
                    await s.send_audio(msg.data)
                except SessionClosedError:
                    return
            elif msg.type == WSMsgType.TEXT:
                try:
                    cmd = json.loads(msg.data).get("type")
                except (json.JSONDecodeError, AttributeError):
                    raise BadRequest("control messages are JSON objects with a type") from None
                try:
                    if cmd == "end_of_audio":
                        await s.end_of_audio()
                    elif cmd == "interrupt":
                        await s.interrupt()
                    elif cmd == "keep_alive":
                        await s.keep_alive()
                    else:
                        raise BadRequest(f"unknown control message type {cmd!r}")
                except SessionClosedError:
                    return
            elif msg.type == WSMsgType.ERROR:
                return


async def run_view(target: str, host: str, port: int, token: str | None) -> int:
    """`avatarforcing view`: serve the page until interrupted."""
    view = ViewServer(target, token=token)
    try:
        await view.start(host, port)
    except OSError as e:
        print(f"avatarforcing view: error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 2
    assert view._client is not None
    try:
        info = await view._client.server_info(timeout=3)
        about = (f"model {info.model.name}{'' if info.model.trained else ' (RANDOM INIT)'}, "
                 f"{info.stream.width}x{info.stream.height} @ {info.stream.fps:g} fps, {info.free_slots} free slot(s)")
    except grpc.aio.AioRpcError as e:
        about = f"not answering yet: {e.code().name}: {e.details()}"
    print(f"avatarforcing view: open {view.url} in a browser; each page is one session on {target} ({about}). "
          "Ctrl-C stops.", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await view.stop()
    return 0
