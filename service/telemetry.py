"""Prometheus metrics (one registry per server) with the replica's probes, and structlog logging (readable
console lines on a terminal, JSON lines otherwise)."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

# Counters and histograms would each export a `_created` series (a timestamp nobody graphs): not served.
disable_created_metrics()

_LAT = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0,
        3.0, 5.0, 10.0)
_GAP = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
_STEP = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class Metrics:
    """All of the service's metrics. Names: avatarforcing_*, base units, no per-session labels."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "avatarforcing_"
        self.sessions_active = Gauge(p + "sessions_active", "Sessions holding a slot", registry=r)
        self.sessions_capacity = Gauge(p + "sessions_capacity", "Session slots on this replica", registry=r)
        self.sessions_started = Counter(p + "sessions_started", "Sessions admitted", registry=r)
        self.sessions_ended = Counter(p + "sessions_ended", "Sessions ended, by reason", ["reason"], registry=r)
        self.sessions_rejected = Counter(p + "sessions_rejected",
                                         "Streams refused or failed with an error status, by gRPC status code",
                                         ["code"], registry=r)
        self.frames_emitted = Counter(p + "frames_emitted", "Video frames sent to clients", registry=r)
        self.frames_dropped = Counter(p + "frames_dropped", "Video frames dropped for slow clients", registry=r)
        self.blocks_emitted = Counter(p + "blocks_emitted", "Blocks emitted by the engine", registry=r)
        self.silence_inserted = Counter(p + "silence_inserted_seconds", "Silence inserted for audio that was late",
                                        registry=r)
        self.step_duration = Histogram(p + "step_duration_seconds", "Engine step wall time (one batched pass)",
                                       buckets=_STEP, registry=r)
        self.decode_encode_duration = Histogram(p + "encode_duration_seconds",
                                                "Encoding time of one block (with overlap_decode: from the end of "
                                                "its step, the rest of its decoding too)",
                                                buckets=_STEP, registry=r)
        self.batch_size = Histogram(p + "batch_size", "Sessions per engine step",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.time_to_first_frame = Histogram(p + "time_to_first_frame_seconds",
                                             "From session start to its first frame sent", buckets=_LAT, registry=r)
        self.frame_latency = Histogram(p + "frame_latency_seconds",
                                       "From a frame's audio being received to the frame being sent",
                                       buckets=_LAT, registry=r)
        self.onset_latency = Histogram(p + "onset_latency_seconds",
                                       "From a burst of audio arriving ahead of time (a re-plan) to its first frame "
                                       "being sent", buckets=_LAT, registry=r)
        self.onset_replans = Counter(p + "onset_replans", "Re-plans for audio that arrived ahead of the timeline",
                                     registry=r)
        self.inter_frame_gap = Histogram(p + "inter_frame_gap_seconds", "Time between consecutive frames sent",
                                         buckets=_GAP, registry=r)
        self.queue_depth = Histogram(p + "output_queue_frames", "Output queue depth when a frame is sent",
                                     buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.anchor_similarity = Histogram(p + "anchor_similarity",
                                           "Cosine similarity of each emitted block to the style anchor "
                                           "(drift signal: falls as a stream drifts)",
                                           buckets=(0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1),
                                           registry=r)
        self.anchor_similarity_floor = Gauge(
            p + "anchor_similarity_floor", "Calibrated drift floor of the loaded checkpoint: a session whose "
            "anchor similarity, averaged over 25 blocks, falls below it counts as drifting (0: not calibrated)",
            registry=r)
        self.drift_alerts = Counter(p + "drift_alerts_total",
                                    "Sessions that crossed below the calibrated anchor-similarity floor",
                                    registry=r)
        self.auth_failures = Counter(p + "auth_failures_total",
                                     "Refused authentications (when auth is on), by reason: missing, malformed, "
                                     "invalid, rate_limited (refused unchecked while the peer is locked out)",
                                     ["reason"], registry=r)
        self.slot_bytes = Gauge(p + "slot_memory_bytes", "Device memory of one session slot", registry=r)
        self.avatar_bytes = Gauge(p + "avatar_memory_bytes", "Device memory of the registered avatars' anchors on "
                                  "this replica (bounded by avatar_memory_mb)", registry=r)
        self.placements = Counter(p + "placements", "CreateSession answers, by result (local: placed on this replica, "
                                  "remote: on another, resumed, refused)", ["result"], registry=r)
        self.routing_store_up = Gauge(p + "routing_store_up", "1 while the routing store (Redis) is reachable "
                                      "(always 1 with in-process routing)", registry=r)
        self.draining = Gauge(p + "draining", "1 once this replica drains or shuts down", registry=r)
        self._http: Any = None
        # Readiness for /readyz: the server sets it (True while its health is SERVING: not before it has started,
        # not while it drains or stops).
        self.ready: Callable[[], bool] = lambda: False

    def serve_http(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint in a thread; returns the bound port. Paths: ``/metrics`` (Prometheus),
        ``/healthz`` (200 while the process runs), ``/readyz`` (200 while SERVING, 503 while draining, stopping or
        not yet started); 404 elsewhere."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/healthz":
                return _text(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                if self.ready():
                    return _text(start_response, "200 OK", "SERVING\n")
                return _text(start_response, "503 Service Unavailable", "NOT_SERVING\n")
            return _text(start_response, "404 Not Found", "not found: /metrics, /healthz and /readyz are served\n")

        server = make_server(host, port, app, _Server6 if ":" in host else _Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class _Server(ThreadingWSGIServer):
    address_family = socket.AF_INET


class _Server6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: not logged
        pass


_format = "json"


def log_format() -> str:
    """The format :func:`configure_logging` chose: ``json`` or ``console``."""
    return _format


def resolve_log_format(fmt: str | bool) -> str:
    """``auto`` -> ``console`` when stderr is a terminal, else ``json``; a bool (the older ``log_json``) too."""
    if isinstance(fmt, bool):
        return "json" if fmt else "console"
    if fmt == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return "console" if isatty is not None and isatty() else "json"
    if fmt not in ("json", "console"):
        raise ValueError(f"log format must be auto, json or console, not {fmt!r}")
    return fmt


def configure_logging(level: str = "info", fmt: str | bool = "auto") -> str:
    """Sets up structlog (and the standard library's logging) on stderr; returns the format chosen."""
    global _format
    _format = resolve_log_format(fmt)
    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl, stream=sys.stderr, format="%(message)s")
    tail: list[Any]
    if _format == "json":
        tail = [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer()]
    else:  # the console renderer formats exceptions itself
        isatty = getattr(sys.stderr, "isatty", None)
        tail = [structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                structlog.dev.ConsoleRenderer(colors=bool(isatty is not None and isatty()))]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return _format
