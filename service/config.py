"""The server's configuration: one object, validated at load, printed at start."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    metrics_port: int = 9464  # Prometheus /metrics; -1 disables, 0 picks a free port
    # Model.
    checkpoint: str = ""  # empty: the shipped default, else a random-init model of `preset`
    preset: str = "tiny"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    # The engine's fast path (docs/gpu.md). compile: fuse the elementwise stages with torch.compile
    # (auto: on CUDA, where it saves 15% of a step; on a CPU it only adds start-up time).
    compile: str = "auto"  # auto | on | off
    cuda_graphs: bool = False  # replay steady-state steps from CUDA graphs (about 1% at 1.3B; memory per batch size)
    # auto (PyTorch's choice) | fastest (timed per shape) | cudnn | flash | efficient | math | fa3 (FlashAttention-3's
    # own kernels from the fa3-fwd wheel, Hopper)
    attention: str = "auto"
    flash_impl: str = ""  # the "flash" kernel: "" PyTorch's own | FA3 | FA4 (FlashAttention-3/4, where installed)
    fp8: bool = False  # the blocks' per-token linears as FP8 (e4m3) products (avatarforcing/fp8.py; Hopper: 2x rate)
    fp8_attention: bool = False  # the unmasked attention passes by FlashAttention-3's FP8 kernel (Hopper, fa3-fwd)
    # Decode emitted blocks on a second CUDA stream while the next step denoises (CUDA only; for Wan's VAE decoder).
    overlap_decode: bool = False
    # The published model (docs/published-model.md). decoder: auto (the checkpoint's: Wan's VAE for a
    # converted one) | wan | tiny (the project's small decoder: much cheaper; random for Wan's latents
    # unless decoder_path gives a distilled one). positions: auto (the checkpoint's stream) | relative | reference.
    # audio_context_s: seconds of past audio wav2vec2 sees before each block (-1: avatarforcing.wav2vec's default).
    # decoder_path: with decoder tiny, a small decoder distilled for the checkpoint (`avatarforcing distill-decoder`).
    decoder: str = "auto"
    decoder_path: str = ""
    positions: str = "auto"
    audio_context_s: float = -1.0
    # Capacity and scheduling.
    max_sessions: int = 8
    max_batch: int = 16
    # Delay budget from a block's audio being due to its first frame being shown: half of it
    # waits for late audio, the rest is for the step, decoding and encoding.
    processing_budget_ms: float = 240.0
    # How far ahead of its deadline a session with audio ready may be stepped (in blocks).
    max_blocks_ahead: int = 2
    # Speech onset: a REALTIME session whose audio comes far ahead of its timeline (a TTS burst after silence or
    # an interrupt) re-plans the frames not yet shown, so speech starts within about a block instead of the
    # look-ahead (service/session.py). False: every session waits for the look-ahead, as before.
    onset_replan: bool = True
    # Session limits.
    config_timeout_s: float = 10.0  # a stream must send its SessionConfig within this
    idle_timeout_s: float = 60.0  # no message from the client for this long ends the session
    max_session_s: float = 4 * 3600.0
    max_chunk_ms: float = 1000.0  # one AudioChunk may carry at most this much audio
    max_buffered_s: float = 60.0  # audio buffered ahead of rendering, per session
    queue_frames: int = 50  # per-session output queue bound (frames)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_avatars: int = 256  # prepared avatars held by one replica (a cache: the store keeps the images)
    tenant_max_avatars: int = 64  # avatars per tenant, here and in the store: its least recently used go first
    # Device memory the registered avatars' anchors may take on one replica (0: no bound but max_avatars): an
    # avatar of the published model at 480x832 holds 274 MiB (364 with its own prompt), the tiny model's a few KiB.
    avatar_memory_mb: float = 4096.0
    avatar_dir: str = ""  # a volume every replica mounts: registered avatars survive the routing store's restarts
    image_rate_per_s: float = 1.0  # new images (RegisterAvatar, reference_image) a tenant may send per second...
    image_burst: int = 5  # ...in bursts of this many (a known image costs nothing); 0 rate: no limit
    grace_s: float = 10.0  # graceful shutdown: live sessions get this long to finish
    # Routing (docs/routing.md). Empty redis_url: the in-process router (one node, no store).
    redis_url: str = ""
    redis_prefix: str = "af:"
    # How long one Redis connect or command may take before the store counts as unreachable (outage placement,
    # docs/routing.md). Raise it for a distant or TLS Redis on a loaded node; below node_ttl_s.
    redis_timeout_s: float = 0.5
    node_id: str = ""  # empty: <hostname>-<random>
    advertise_address: str = ""  # host:port clients are sent to; empty: the bound host and port
    heartbeat_s: float = 0.5
    node_ttl_s: float = 2.0  # a node's registry entry expires this long after its last heartbeat
    session_ttl_s: float = 10.0  # a live session's ownership record, refreshed by its node's heartbeat
    reservation_ttl_s: float = 15.0  # CreateSession's slot reservation, until the Stream attaches
    resume_ttl_s: float = 30.0  # a session whose stream broke can be resumed this long
    # Security. TLS: certificate chain and key (PEM); with tls_client_ca clients need a certificate (mTLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    health_port: int = -1  # a plaintext port serving only grpc.health.v1 (for probes under TLS); -1 off
    # Bearer tokens (service/security.py): a file (one entry a line) and/or a comma list.
    auth_tokens_file: str = ""
    auth_tokens: str = ""
    tenant_max_sessions: int = 0  # sessions per tenant over all replicas (0: no limit); per token overrides
    admin_tenants: str = "admin"  # comma list: tenants allowed to call Drain remotely
    log_level: str = "info"
    # auto: readable console lines when stderr is a terminal, JSON lines otherwise (containers, the Helm chart
    # sets json explicitly). AVATARFORCING_LOG_JSON=1/0 (the older switch) still means json/console.
    log_format: str = "auto"  # auto | json | console

    def __post_init__(self) -> None:
        # (ok, the field(s) the rule is about, what is allowed): the first field is named with its value.
        checks: list[tuple[bool, tuple[str, ...], str]] = [
            (0 <= self.port < 65536, ("port",), "port must be in 0..65535"),
            (-1 <= self.metrics_port < 65536, ("metrics_port",), "metrics_port must be -1 (off) or in 0..65535"),
            (self.max_sessions >= 1, ("max_sessions",), "max_sessions must be >= 1"),
            (self.max_batch >= 1, ("max_batch",), "max_batch must be >= 1"),
            (self.threads >= 0, ("threads",), "threads must be >= 0 (0: torch's default)"),
            (self.processing_budget_ms > 0, ("processing_budget_ms",), "processing_budget_ms must be > 0"),
            (self.max_blocks_ahead >= 0, ("max_blocks_ahead",), "max_blocks_ahead must be >= 0"),
            (self.config_timeout_s > 0, ("config_timeout_s",), "timeouts must be > 0"),
            (self.idle_timeout_s > 0, ("idle_timeout_s",), "timeouts must be > 0"),
            (self.max_session_s > 0, ("max_session_s",), "timeouts must be > 0"),
            (self.max_chunk_ms > 0, ("max_chunk_ms",), "audio limits must be > 0"),
            (self.max_buffered_s > 0, ("max_buffered_s",), "audio limits must be > 0"),
            (self.queue_frames >= 4, ("queue_frames",), "queue_frames must be >= 4"),
            (self.grace_s >= 0, ("grace_s",), "grace_s must be >= 0"),
            (self.redis_url == "" or self.redis_url.startswith(("redis://", "rediss://", "unix://")), ("redis_url",),
             "redis_url must start with redis://, rediss:// or unix://"),
            (0 < self.heartbeat_s < self.node_ttl_s, ("heartbeat_s", "node_ttl_s"),
             "heartbeat_s must be > 0 and below node_ttl_s"),
            (0 < self.redis_timeout_s < self.node_ttl_s, ("redis_timeout_s", "node_ttl_s"),
             "redis_timeout_s must be > 0 and below node_ttl_s (a heartbeat must fail before its entry expires)"),
            (self.session_ttl_s > self.heartbeat_s and self.reservation_ttl_s > 0 and self.resume_ttl_s > 0,
             ("session_ttl_s", "reservation_ttl_s", "resume_ttl_s"),
             "routing TTLs must be > 0 (session_ttl_s above heartbeat_s)"),
            (bool(self.tls_cert) == bool(self.tls_key), ("tls_cert", "tls_key"), "tls_cert and tls_key go together"),
            (not self.tls_client_ca or bool(self.tls_cert), ("tls_client_ca",),
             "tls_client_ca needs tls_cert and tls_key"),
            (-1 <= self.health_port < 65536, ("health_port",), "health_port must be -1 (off) or in 0..65535"),
            (self.tenant_max_sessions >= 0, ("tenant_max_sessions",), "tenant_max_sessions must be >= 0"),
            (self.max_avatars >= 1, ("max_avatars",), "max_avatars must be >= 1 and tenant_max_avatars >= 0"),
            (self.avatar_memory_mb >= 0, ("avatar_memory_mb",), "avatar_memory_mb must be >= 0 (0: no bound)"),
            (self.tenant_max_avatars >= 0, ("tenant_max_avatars",),
             "max_avatars must be >= 1 and tenant_max_avatars >= 0"),
            (self.image_rate_per_s >= 0, ("image_rate_per_s",), "image_rate_per_s must be >= 0, image_burst >= 1"),
            (self.image_burst >= 1, ("image_burst",), "image_rate_per_s must be >= 0, image_burst >= 1"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), ("dtype",),
             "unknown dtype (auto, float32, bfloat16, float16)"),
            (self.compile in ("auto", "on", "off"), ("compile",), "compile must be auto, on or off"),
            (self.attention in ("auto", "fastest", "cudnn", "flash", "efficient", "math", "fa3"), ("attention",),
             "unknown attention kernel (auto, fastest, cudnn, flash, efficient, math, fa3)"),
            (isinstance(self.fp8_attention, bool), ("fp8_attention",), "fp8_attention must be true or false"),
            (not self.fp8_attention or self.resolved_device().startswith("cuda"), ("fp8_attention", "device"),
             "fp8_attention needs a CUDA device (Hopper, with the fa3-fwd package)"),
            (self.flash_impl in ("", "FA3", "FA4"), ("flash_impl",), "flash_impl must be empty, FA3 or FA4"),
            (isinstance(self.fp8, bool), ("fp8",), "fp8 must be true or false"),
            (isinstance(self.overlap_decode, bool), ("overlap_decode",), "overlap_decode must be true or false"),
            (not self.overlap_decode or self.resolved_device().startswith("cuda"), ("overlap_decode", "device"),
             "overlap_decode needs a CUDA device (it decodes on a second CUDA stream)"),
            (self.log_level in ("debug", "info", "warning", "error"), ("log_level",),
             "unknown log level (debug, info, warning, error)"),
            (self.log_format in LOG_FORMATS, ("log_format",), "log_format must be auto, json or console"),
            (self.decoder in ("auto", "wan", "tiny"), ("decoder",), "decoder must be auto, wan or tiny"),
            (not self.decoder_path or os.path.isfile(self.decoder_path), ("decoder_path",),
             "decoder_path is not a file (a small decoder from `avatarforcing distill-decoder`)"),
            (not self.decoder_path or self.decoder == "tiny", ("decoder_path", "decoder"),
             "decoder_path goes with decoder tiny (the small decoder it holds)"),
            (self.positions in ("auto", "relative", "reference"), ("positions",),
             "positions must be auto, relative or reference"),
            (self.audio_context_s == -1.0 or self.audio_context_s >= 0, ("audio_context_s",),
             "audio_context_s must be >= 0 (or -1: the default)"),
        ]
        for ok, fields, msg in checks:
            if not ok:
                raise ConfigError(msg, fields[0], getattr(self, fields[0]))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.resolved_device().startswith("cuda") else "float32"

    def resolved_compile(self) -> bool:
        if self.compile != "auto":
            return self.compile == "on"
        return self.resolved_device().startswith("cuda")

    def replace(self, **kw: Any) -> ServerConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_env(cls, prefix: str = "AVATARFORCING_", **overrides: Any) -> ServerConfig:
        """Defaults, then AVATARFORCING_<FIELD> environment variables, then ``overrides``.

        A variable that does not parse, or a value the checks refuse, raises :class:`ConfigError` naming the
        variable, its value and what is allowed (``AVATARFORCING_MAX_SESSIONS='abc' is not an integer``).
        """
        kw: dict[str, Any] = {}
        sources: dict[str, tuple[str, str]] = {}  # field -> (variable, raw value)
        legacy = os.environ.get(prefix + "LOG_JSON")  # the older switch, before log_format
        if legacy is not None and os.environ.get(prefix + "LOG_FORMAT") is None:
            kw["log_format"] = "json" if _parse_bool(prefix + "LOG_JSON", legacy) else "console"
            sources["log_format"] = (prefix + "LOG_JSON", legacy)
        for f in dataclasses.fields(cls):
            name = prefix + f.name.upper()
            raw = os.environ.get(name)
            if raw is None:
                continue
            kw[f.name] = _parse(name, raw, type(f.default))
            sources[f.name] = (name, raw)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        for k in overrides:
            if overrides[k] is not None:
                sources.pop(k, None)
        try:
            return cls(**kw)
        except ConfigError as e:
            if e.field in sources:
                raise e.from_source(*sources[e.field]) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """The configuration for the log, secrets redacted (tokens, a password in redis_url)."""
        d = dataclasses.asdict(self)
        if d["auth_tokens"]:
            d["auth_tokens"] = f"<{len(d['auth_tokens'].split(','))} entries redacted>"
        u = urllib.parse.urlsplit(d["redis_url"])
        if u.password:
            d["redis_url"] = u._replace(netloc=f"{u.username or ''}:***@{u.hostname}:{u.port}").geturl()
        return d

    def non_defaults(self) -> dict[str, Any]:
        """Only the settings that differ from the defaults (redacted as :meth:`to_dict`)."""
        base = dataclasses.asdict(ServerConfig())
        return {k: v for k, v in self.to_dict().items() if getattr(self, k) != base[k]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


LOG_FORMATS = ("auto", "json", "console")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class ConfigError(ValueError):
    """A setting that does not parse or is not allowed. ``str(e)`` is one line for a person: the setting (the
    environment variable when it came from one), its value and what is allowed."""

    def __init__(self, message: str, field: str | None = None, value: Any = None, source: str | None = None,
                 prefix: bool = True) -> None:
        self.message, self.field, self.value, self.source = message, field, value, source
        text = message
        if field is not None:
            text = f"{message} (got {source or field}={value!r})"
        super().__init__(f"invalid server config: {text}" if prefix else text)

    def from_source(self, variable: str, raw: str) -> ConfigError:
        return ConfigError(self.message, self.field, raw, variable)


def _parse_bool(name: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no or on/off)", prefix=False)


def _parse(name: str, raw: str, typ: type) -> Any:
    if typ is bool:
        return _parse_bool(name, raw)
    if typ is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer", prefix=False) from None
    if typ is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number", prefix=False) from None
    return raw
