"""The `avatarforcing` command: serve, demo, view, bench, drain, train, eval, convert, encode-prompt."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from avatarforcing_service.config import ServerConfig

from .common import server_config


def _add_server_args(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    p.add_argument("--host", default=None, help=f"listen address (default {d.host})")
    p.add_argument("--port", type=int, default=None, help=f"gRPC port, 0 = any free port (default {d.port})")
    p.add_argument("--metrics-port", type=int, default=None,
                   help=f"Prometheus port, -1 = off, 0 = any free port (default {d.metrics_port})")
    p.add_argument("--checkpoint", default=None, help="safetensors checkpoint (default: the shipped one)")
    p.add_argument("--preset", default=None, help=f"model preset when no checkpoint exists (default {d.preset})")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16 (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", default=None, choices=["auto", "on", "off"],
                   help="fuse the elementwise stages with torch.compile (default auto: on CUDA)")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay steady-state steps from CUDA graphs (CUDA only)")
    p.add_argument("--attention", default=None,
                   choices=["auto", "fastest", "cudnn", "flash", "efficient", "math", "fa3"],
                   help="preferred fused attention kernel (default auto: PyTorch's choice; fastest: each shape's "
                        "fastest kernel, timed once; fa3: FlashAttention-3's own, Hopper, the fa3-fwd package)")
    p.add_argument("--flash-impl", default=None, choices=["FA3", "FA4"],
                   help="make the flash kernel FlashAttention-3 or -4 (their package installed; default PyTorch's)")
    p.add_argument("--fp8", action="store_true", default=None,
                   help="the transformer blocks' per-token linears as FP8 products (2x rate on Hopper; default off)")
    p.add_argument("--fp8-attention", action="store_true", default=None,
                   help="attention by FlashAttention-3's FP8 kernel (Hopper, the fa3-fwd package: pip install "
                        "'avatarforcing-serve[hopper]'; default off)")
    p.add_argument("--overlap-decode", action="store_true", default=None,
                   help="decode emitted blocks on a second CUDA stream while the next step denoises (CUDA only; "
                        "for Wan's VAE decoder; default off)")
    p.add_argument("--decoder", default=None, choices=["auto", "wan", "tiny"],
                   help="the published model's decoder: auto (the checkpoint's), wan (Wan's VAE) or tiny (small)")
    p.add_argument("--decoder-path", default=None,
                   help="with --decoder tiny: the small decoder distilled for the checkpoint (a file from "
                        "`avatarforcing distill-decoder`; default: a random one, for timing only)")
    p.add_argument("--positions", default=None, choices=["auto", "relative", "reference"],
                   help="RoPE positions: auto (the checkpoint's), relative (unbounded streams) or reference")
    p.add_argument("--audio-context", type=float, default=None, dest="audio_context_s",
                   help="seconds of past audio wav2vec2 sees before each block (default: avatarforcing.wav2vec's)")
    p.add_argument("--max-sessions", type=int, default=None, help=f"session slots (default {d.max_sessions})")
    p.add_argument("--max-batch", type=int, default=None, help=f"sessions per step at most (default {d.max_batch})")
    p.add_argument("--no-onset-replan", action="store_false", default=None, dest="onset_replan",
                   help="never re-plan for audio that comes ahead of time: every utterance waits for the look-ahead "
                        "(default: a TTS burst re-plans, so lips start within about a block)")
    p.add_argument("--idle-timeout", type=float, default=None, dest="idle_timeout_s",
                   help=f"seconds without a client message before a session ends (default {d.idle_timeout_s:g})")
    p.add_argument("--max-session-seconds", type=float, default=None, dest="max_session_s",
                   help=f"longest session in seconds (default {d.max_session_s:g})")
    p.add_argument("--grace", type=float, default=None, dest="grace_s",
                   help=f"graceful-shutdown period in seconds (default {d.grace_s:g})")
    p.add_argument("--log-level", default=None, help=f"debug | info | warning | error (default {d.log_level})")
    p.add_argument("--log-format", default=None, choices=["auto", "json", "console"],
                   help="log lines: console (readable), json (one object a line), or auto: console when stderr is a "
                        "terminal, else json (default auto)")
    p.add_argument("--redis-url", default=None,
                   help="Redis for routing across replicas, e.g. redis://redis:6379/0 (default: in-process, one node)")
    p.add_argument("--node-id", default=None, help="this replica's id in the routing registry (default host-random)")
    p.add_argument("--advertise-address", default=None,
                   help="host:port clients are sent to for this replica's sessions (default: the bound address)")
    p.add_argument("--avatar-dir", default=None,
                   help="a folder every replica mounts: registered avatars outlive a Redis restart (default: none)")
    p.add_argument("--tenant-max-avatars", type=int, default=None,
                   help=f"avatars per tenant; its least recently used go first (default {d.tenant_max_avatars})")
    p.add_argument("--avatar-memory-mb", type=float, default=None,
                   help="device memory (MiB) the registered avatars' anchors may take, 0 = no bound; the least "
                        f"recently used go first (default {d.avatar_memory_mb:g})")
    p.add_argument("--image-rate", type=float, default=None, dest="image_rate_per_s",
                   help=f"new reference images a tenant may send per second, 0 = no limit (default "
                        f"{d.image_rate_per_s:g}, bursts of {d.image_burst})")



def cmd_serve(a: argparse.Namespace) -> int:
    from avatarforcing_service.telemetry import configure_logging

    try:
        cfg = server_config(a)  # before torch is imported: a bad setting is reported at once
        configure_logging(cfg.log_level, cfg.log_format)
        from avatarforcing_service.server import App, run_app

        app = App(cfg)  # loads and checks the checkpoint: a bad one is refused before the port opens
    except (ValueError, OSError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"avatarforcing serve: error: {line}", file=sys.stderr)
        return 2
    asyncio.run(run_app(app))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(a))


def cmd_bench(a: argparse.Namespace) -> int:
    if a.sessions is None:
        a.sessions = 6 if a.chaos else 2
    if a.chaos:
        from .chaos import run_chaos_bench

        return run_chaos_bench(a)
    if a.failover:
        from .failover_bench import run_failover_bench

        return run_failover_bench(a)
    from .bench import run_bench

    return run_bench(a)


def cmd_train(a: argparse.Namespace) -> int:
    import logging

    from avatarforcing.train.pipeline import train_main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stats = train_main(a.run, a.stages, a.budget, a.device, a.threads, progress=not a.no_progress)
    print(f"stages done in {a.run}: {stats.get('seconds', {})}")
    if a.stages == "all" or "export" in a.stages:
        print(f"serving checkpoints: {a.run}/student.safetensors (AvatarForcing), ar.safetensors (baseline), "
              f"teacher.safetensors; `avatarforcing serve --checkpoint {a.run}/student.safetensors`")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from avatarforcing.evaluate import EvalConfig, default_models, eval_main

    models = default_models()
    if a.run is not None:
        models = {"teacher": a.run / "teacher.safetensors", "student": a.run / "student.safetensors",
                  "ar": a.run / "ar.safetensors"}
    for name in ("teacher", "student", "ar"):
        v = getattr(a, name)
        if v is not None:
            models[name] = v
    if a.models:
        models = {k: v for k, v in models.items() if k in a.models.split(",")}
    if a.onset:  # the seam after a burst is the streaming student's alone
        models = {"student": models.get("student", default_models()["student"])}
    missing = [f"{k}: {v}" for k, v in models.items() if not Path(v).is_file()]
    if missing:
        raise SystemExit("checkpoint(s) not found: " + "; ".join(missing) + " (train them with `avatarforcing train`)")
    ec = EvalConfig(test_clips=a.test_clips, long_clips=a.long_clips, long_seconds=a.long_seconds,
                    teacher_steps=a.teacher_steps, cfg_scale=a.cfg_scale, split=a.split)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.onset:
        from avatarforcing.checkpoint import load_checkpoint
        from avatarforcing.onset_eval import OnsetEvalConfig, onset_eval_main

        oc = OnsetEvalConfig(clips=a.test_clips, split=a.split)
        onset_eval_main(load_checkpoint(models["student"]), oc, a.out, a.device, progress=not a.no_progress)
        return 0
    eval_main(models, ec, a.out, a.device, progress=not a.no_progress)
    return 0


def cmd_drain(a: argparse.Namespace) -> int:
    """Drains a replica (by default the one on this host) through its Drain RPC."""
    import grpc

    from avatarforcing_client import AvatarForcingClient, pb, pb_grpc

    async def go() -> int:
        creds = None
        if a.tls_ca:
            creds = grpc.ssl_channel_credentials(Path(a.tls_ca).read_bytes())
        async with AvatarForcingClient(a.target, credentials=creds, token=a.token) as c:
            try:
                r = await pb_grpc.AvatarForcingStub(c.channel).Drain(
                    pb.DrainRequest(deadline_s=a.deadline or 0.0), metadata=c.metadata, timeout=10)
            except grpc.aio.AioRpcError as e:
                print(f"avatarforcing drain: error: {_rpc_error_line(e)}", file=sys.stderr)
                return 1
            print(f"draining {a.target}: {r.live_sessions} live session(s) end within {r.deadline_s:g} s "
                  "(the Python SDK resumes them on another replica)")
            if a.wait:
                while True:
                    try:
                        info = await c.server_info(timeout=5)
                    except grpc.aio.AioRpcError:
                        break  # the replica stopped
                    if info.active_sessions == 0:
                        break
                    await asyncio.sleep(0.5)
                print("drained: no live session left")
        return 0

    return asyncio.run(go())


def cmd_view(a: argparse.Namespace) -> int:
    """Serves the live page (tools/static/view.html) and bridges each page to one session."""
    from .view import run_view

    try:
        return asyncio.run(run_view(a.target, a.host, a.port, a.token))
    except KeyboardInterrupt:
        return 0


def cmd_encode_prompt(a: argparse.Namespace) -> int:
    """umT5 over a prompt, once, offline: writes the text context file the published model cross-attends to."""
    try:
        import torch

        from avatarforcing.text_context import PromptEncoder, save_context

        if a.prompt_file is not None:
            try:
                prompt = Path(a.prompt_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{a.prompt_file}: cannot read the prompt file ({e})") from None
        else:
            prompt = a.prompt
        device = a.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device here (use --device cpu)")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
        enc = PromptEncoder(a.umt5, a.tokenizer, text_len=a.text_len, device=device, dtype=dtype)
        tc = enc.encode(prompt)
        out = save_context(a.out, tc.context, prompt, tc.tokens)
    except (ValueError, OSError) as e:  # one actionable line, no traceback
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"avatarforcing encode-prompt: error: {line}", file=sys.stderr)
        return 2
    note = f" (prompt truncated to {a.text_len} tokens)" if tc.truncated else ""
    print(f"{out}: {tc.tokens} tokens of {a.text_len}, context {list(tc.context.shape)} {a.dtype}{note}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    """The published AvatarForcing files -> one checkpoint of this project (`serve --checkpoint` loads it)."""
    import torch

    from avatarforcing.published import convert, parse_resolution

    try:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        ema = {"auto": None, "ema": True, "raw": False}[a.weights]
        rep = convert(a.student, a.vae, a.wav2vec, a.context, a.out, ema=ema, heads=a.heads, lora_alpha=a.lora_alpha,
                      resolution=parse_resolution(a.resolution),
                      dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype])
    except (ValueError, OSError) as e:  # one actionable line naming the file and key, no traceback
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"avatarforcing convert: error: {line}", file=sys.stderr)
        return 2
    c = rep.model_cfg
    print(f"{rep.out}: {c.name} {c.layers} layers x {c.dim} ({rep.parameters / 1e9:.2f} B parameters, LoRA merged) "
          f"from {rep.source_keys} keys of {rep.generator_key}, {c.height}x{c.width}, {a.dtype}, "
          f"{rep.bytes / 2**30:.2f} GiB; serve it with `avatarforcing serve --checkpoint {rep.out}`")
    return 0


def cmd_distill_decoder(a: argparse.Namespace) -> int:
    """Trains the small decoder to reproduce Wan's on a converted published checkpoint's own latents."""
    try:
        import torch

        from avatarforcing.distill import DistillConfig, distill_decoder
        from avatarforcing.train.common import pick_device

        dev = pick_device(a.device)  # auto: CUDA where there is one
        device = str(dev)
        dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
        if a.threads:
            torch.set_num_threads(a.threads)
        dc = DistillConfig(streams=a.streams, blocks_per_stream=a.blocks_per_stream, steps=a.steps, batch=a.batch,
                           lr=a.lr, weight_decay=a.weight_decay, mse_weight=a.mse_weight, heldout=a.heldout,
                           eval_every=a.eval_every, sessions=a.sessions, device=device, dtype=dtype, seed=a.seed)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        rep = distill_decoder(a.checkpoint, a.out, dc, progress=lambda line: print(line, flush=True))
    except (ValueError, OSError) as e:  # one actionable line naming the file, no traceback
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"avatarforcing distill-decoder: error: {line}", file=sys.stderr)
        return 2
    print(f"{rep.out}: held-out error against Wan's decoder {rep.start} at the start, {rep.end} after {rep.steps} "
          f"steps ({rep.train_frames} latent frames trained on, {rep.heldout_frames} held out; "
          f"{rep.seconds_data:.0f} s collecting, {rep.seconds_train:.0f} s training); serve it with "
          f"`avatarforcing serve --checkpoint {a.checkpoint} --decoder tiny --decoder-path {rep.out}`")
    return 0


def _rpc_error_line(e: BaseException) -> str:
    """``STATUS: message`` of a gRPC error (its status code's name and its details, first line)."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    name = code().name if callable(code) and code() is not None else "UNKNOWN"
    text = (details() if callable(details) else None) or str(e)
    return f"{name}: {(text.strip().splitlines() or [''])[0]}"


def _rpc_cause(e: BaseException) -> BaseException | None:
    """The gRPC error behind ``e`` (itself, or what it was raised from), if any."""
    import grpc

    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, grpc.RpcError):
            return seen
        seen = seen.__cause__  # raised from it (`raise ... from e`), as the SDK's SessionClosedError
    return None


def _error_exit(e: BaseException) -> int | None:
    """The exit code for an error shown as one line, or None for one that deserves its traceback."""
    if _rpc_cause(e) is not None:
        return 1
    from avatarforcing_client import ProtocolError, SessionClosedError

    if isinstance(e, SessionClosedError | ProtocolError):
        return 1
    if isinstance(e, ValueError):  # bad settings, arguments or input files (ConfigError included)
        return 2
    if isinstance(e, OSError):  # files and folders: the message names the path
        return 1
    return None


def _error_line(e: BaseException) -> str:
    rpc = _rpc_cause(e)
    if rpc is not None:
        return _rpc_error_line(rpc)
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class _VersionAction(argparse.Action):
    """``--version``: this package's version and the SDK's (imported only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of avatarforcing-serve and its SDK, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    from avatarforcing_client import __version__ as sdk_version
    from avatarforcing_service import __version__

    return f"avatarforcing-serve {__version__} (avatarforcing-client {sdk_version}, API avatarforcing.v1)"


def cmd_version(a: argparse.Namespace) -> int:
    print(version_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:2] == ["bench", "--gpu"]:  # the GPU benchmark has its own options (`avatarforcing bench --gpu -h`)
        from .gpubench import run as run_gpu_bench

        return run_gpu_bench(args[2:])
    ap = argparse.ArgumentParser(prog="avatarforcing", description="AvatarForcing Serve: real-time talking avatars")
    ap.add_argument("--version", action=_VersionAction)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version", help="print the versions of avatarforcing-serve and its SDK").set_defaults(
        fn=cmd_version)
    s = sub.add_parser("serve", help="run the gRPC service (embedded defaults: no Redis, no GPU needed)")
    _add_server_args(s)
    s.set_defaults(fn=cmd_serve)
    d = sub.add_parser("demo", help="stream the bundled speech and face through the service, write an MP4")
    d.add_argument("--connect", default=None, help="address of a running server (default: start one here)")
    d.add_argument("--out", default="out/demo.mp4", type=Path, help="output MP4 (default out/demo.mp4)")
    d.add_argument("--wav", default=None, type=Path,
                   help="16-bit PCM WAV, 8 to 48 kHz, stereo mixed down (default: the bundled sample)")
    d.add_argument("--image", default=None, type=Path, help="PNG/JPEG face (default: the bundled one)")
    d.add_argument("--realtime", action="store_true", help="stream in real time (default: as fast as possible)")
    d.add_argument("--encoding", default="h264", choices=["raw", "jpeg", "h264", "fmp4"])
    _add_server_args(d)
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="measure the engine and the server; prints a table, writes JSON")
    b.add_argument("--out", default=None, type=Path, help="JSON path (default bench/results/cpu-<date>.json)")
    b.add_argument("--quick", action="store_true", help="shorter runs (for a smoke test)")
    b.add_argument("--sections", default="engine,server,long,onset",
                   help="comma list of: engine, server, long, onset (default all); onset alone writes "
                        "bench/results/onset-cpu-tiny-<date>.json")
    b.add_argument("--onset-sessions", type=int, default=8,
                   help="onset: sessions bursting at random times at once (default 8)")
    b.add_argument("--long-frames", type=int, default=3000, help="latent frames for the long-stream run")
    b.add_argument("--max-sessions", type=int, default=12, help="most sessions tried in the server run")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--gpu", action="store_true",
                   help="instead (as the first option): the 1.3B configuration on a CUDA GPU; see bench --gpu -h")
    b.add_argument("--failover", action="store_true",
                   help="instead: kill -9 replicas under live sessions (Redis routing) and time the SDK's resume")
    b.add_argument("--kills", type=int, default=20, help="--failover: replicas killed (default 20)")
    b.add_argument("--replicas", type=int, default=3, help="--failover, --chaos: replicas running (default 3)")
    b.add_argument("--sessions", type=int, default=None,
                   help="--failover: live sessions (default 2); --chaos: client sessions at once (default 6)")
    b.add_argument("--steady-s", type=float, default=5.0, help="--failover: seconds of steady state measured")
    b.add_argument("--resume-timeout", type=float, default=15.0, help="--failover: SDK resume time limit")
    b.add_argument("--chaos", action="store_true",
                   help="instead: random faults (kill -9 and SIGSTOP of replicas, Redis killed, paused, flushed, "
                        "clients cancelling, connections lost) under live sessions for --duration; counts sessions "
                        "lost, doubled (from the replicas' logs) and routing records leaked; exit 1 unless all 0 "
                        "(tools/chaos.py; --resume-timeout applies too)")
    b.add_argument("--duration", type=float, default=1800.0, help="--chaos: seconds of chaos (default 1800)")
    b.add_argument("--fault-every", default="10:30", metavar="MIN:MAX",
                   help="--chaos: seconds between faults, uniform in MIN:MAX (default 10:30)")
    b.add_argument("--faults", default="all",
                   help="--chaos: comma list of replica-kill, replica-stop, redis-kill, redis-pause, redis-flush, "
                        "client-cancel, conn-loss (default all)")
    b.add_argument("--fault-order", default="random", choices=["random", "cycle"],
                   help="--chaos: pick each fault at random, or cycle through --faults in order so that each "
                        "kind runs (default random)")
    b.add_argument("--seed", type=int, default=None, help="--chaos: seed of the fault schedule (default random)")
    b.add_argument("--session-s", default="10:60", metavar="MIN:MAX",
                   help="--chaos: how long each client session runs before it ends normally (default 10:60)")
    b.add_argument("--replica-stop-s", type=float, default=5.0,
                   help="--chaos: how long replica-stop keeps a replica SIGSTOPped (default 5)")
    b.add_argument("--redis-down-s", default="2:5", metavar="MIN:MAX",
                   help="--chaos: how long redis-kill/redis-pause keep Redis away (default 2:5)")
    b.add_argument("--stall-s", type=float, default=10.0,
                   help="--chaos: a live session with no frame for this long counts as lost (default 10)")
    b.add_argument("--resume-ttl", type=float, default=10.0,
                   help="--chaos: the replicas' resume and reservation TTLs, which the leak check waits out "
                        "(default 10)")
    b.add_argument("--replica-slots", type=int, default=0,
                   help="--chaos: session slots per replica (default: --sessions, so one replica can hold all)")
    b.add_argument("--logs", default=None, type=Path,
                   help="--chaos: keep the replicas' logs in this folder (default: a temporary folder, kept only "
                        "when the run fails)")
    b.set_defaults(fn=cmd_bench)
    t = sub.add_parser("train", help="train the autoencoder, teacher, student and AR baseline (resumable)")
    t.add_argument("--run", default=Path("runs/default"), type=Path, help="run folder (default runs/default)")
    t.add_argument("--stages", default="all",
                   help="all, or a comma list of: ae, latents, teacher, ode, stage1, ar1, dmd, ar2, export")
    t.add_argument("--budget", default="default", choices=["default", "smoke"],
                   help="step counts and sizes: default (the shipped model) or smoke (a few steps each)")
    t.add_argument("--device", default="auto", help="auto (a CUDA GPU when present) | cpu | cuda | cuda:N")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="lip sync, appearance and drift of teacher, student and AR baseline")
    e.add_argument("--run", default=None, type=Path, help="evaluate a run folder's checkpoints (default: shipped)")
    e.add_argument("--teacher", default=None, type=Path)
    e.add_argument("--student", default=None, type=Path)
    e.add_argument("--ar", default=None, type=Path)
    e.add_argument("--models", default=None, help="comma list of teacher, student, ar (default all)")
    e.add_argument("--test-clips", type=int, default=16, help="10-s held-out test clips (default 16)")
    e.add_argument("--long-clips", type=int, default=4, help="long-form clips (default 4)")
    e.add_argument("--long-seconds", type=float, default=60.0, help="long-form clip length (default 60)")
    e.add_argument("--split", default="test", choices=["val", "test"],
                   help="10-s clips from this split (default test; val for tuning)")
    e.add_argument("--teacher-steps", type=int, default=20)
    e.add_argument("--cfg-scale", type=float, default=4.5)
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--out", default=None, type=Path, help="also write the report as JSON")
    e.add_argument("--onset", action="store_true",
                   help="instead: the student's lip sync in the first second after speech starts (idle, then a "
                        "burst), with and without re-planning, against steady state; writes JSON (default "
                        "bench/results/eval-onset-<device>-<model>-<date>.json)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_eval)
    cv = sub.add_parser("convert", help="the published AvatarForcing files -> one checkpoint `serve` loads")
    cv.add_argument("--student", required=True, type=Path, help="lycui/AvatarForcing model.pt (the DMD student)")
    cv.add_argument("--vae", required=True, type=Path, help="Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")
    cv.add_argument("--wav2vec", required=True, type=Path, help="facebook/wav2vec2-base-960h folder (transformers)")
    cv.add_argument("--context", required=True, type=Path,
                    help="default text context (a file from `avatarforcing encode-prompt`)")
    cv.add_argument("--out", required=True, type=Path, help="the checkpoint to write (.safetensors)")
    cv.add_argument("--weights", default="auto", choices=["auto", "ema", "raw"],
                    help="generator_ema (ema), generator (raw), or auto: the EMA where present")
    cv.add_argument("--resolution", default="480x832", help="HEIGHTxWIDTH: 480x832 (default) or 832x480")
    cv.add_argument("--heads", type=int, default=None, help="attention heads (default: width / 128, as Wan's)")
    cv.add_argument("--lora-alpha", type=float, default=64.0, help="LoRA alpha (published: 64 with rank 128)")
    cv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="stored precision (default bfloat16, what a GPU serves)")
    cv.set_defaults(fn=cmd_convert)
    dr = sub.add_parser("drain", help="drain a replica: health NOT_SERVING, no new sessions, live ones move on")
    dr.add_argument("--target", default="127.0.0.1:50051", help="the replica (default 127.0.0.1:50051)")
    dr.add_argument("--deadline", type=float, default=None,
                    help="seconds live sessions may run on (default: the server's --grace)")
    dr.add_argument("--wait", action="store_true", help="return once no session is left")
    dr.add_argument("--token", default=None, help="bearer token (default $AVATARFORCING_TOKEN)")
    dr.add_argument("--tls-ca", default=None, help="CA certificate (PEM) when the replica serves TLS")
    dr.set_defaults(fn=cmd_drain)
    vw = sub.add_parser("view", help="watch the avatar live in a browser: a page per session (mic or WAV in)")
    vw.add_argument("--host", default="127.0.0.1", help="listen address of the page (default 127.0.0.1)")
    vw.add_argument("--port", type=int, default=8080, help="HTTP port of the page, 0 = any free port (default 8080)")
    vw.add_argument("--target", default="127.0.0.1:50051", help="the AvatarForcing server (default 127.0.0.1:50051)")
    vw.add_argument("--token", default=None, help="bearer token for the server (default $AVATARFORCING_TOKEN)")
    vw.set_defaults(fn=cmd_view)
    ep = sub.add_parser("encode-prompt",
                        help="umT5 text context of a prompt for the published model (offline, once per prompt)")
    ep.add_argument("--umt5", required=True, type=Path,
                    help="umT5 encoder: a transformers folder (google/umt5-xxl) or Wan's "
                         "models_t5_umt5-xxl-enc-bf16.pth (or its folder)")
    ep.add_argument("--tokenizer", default=None, type=Path,
                    help="google/umt5-xxl tokenizer folder (default: the --umt5 folder, or google/umt5-xxl beside "
                         "Wan's encoder file)")
    src = ep.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="the prompt: a description of the person")
    src.add_argument("--prompt-file", default=None, type=Path, help="read the prompt from this UTF-8 file")
    ep.add_argument("--out", required=True, type=Path, help="context file to write (safetensors)")
    ep.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ep.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="encoder and stored context dtype (default float32, as the reference)")
    ep.add_argument("--text-len", type=int, default=512, help="context rows (default 512, Wan's text_len)")
    ep.set_defaults(fn=cmd_encode_prompt)
    dd = sub.add_parser("distill-decoder",
                        help="train the small decoder to reproduce Wan's VAE on a converted published checkpoint's "
                             "own latents (`serve --decoder tiny --decoder-path` loads it)")
    dd.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint from `avatarforcing convert`")
    dd.add_argument("--out", required=True, type=Path, help="the decoder file to write (.safetensors)")
    dd.add_argument("--streams", type=int, default=16, help="reference faces streamed, one per stream (default 16)")
    dd.add_argument("--blocks-per-stream", type=int, default=8, help="emitted blocks per stream (default 8)")
    dd.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    dd.add_argument("--batch", type=int, default=8, help="latent frames per step (default 8)")
    dd.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    dd.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    dd.add_argument("--mse-weight", type=float, default=0.0, help="loss: L1 + this times MSE (default 0)")
    dd.add_argument("--heldout", type=float, default=0.2, help="fraction of the streams held out (default 0.2)")
    dd.add_argument("--eval-every", type=int, default=100, help="held-out error every this many steps (default 100)")
    dd.add_argument("--sessions", type=int, default=8, help="streams the engine runs at once (default 8)")
    dd.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    dd.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the engine's and Wan's decoder's dtype (default auto: bfloat16 on CUDA, float32 on a CPU); "
                         "the small decoder trains in float32")
    dd.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    dd.add_argument("--seed", type=int, default=0, help="faces, audio, noise and initialisation (default 0)")
    dd.set_defaults(fn=cmd_distill_decoder)
    a = ap.parse_args(args)
    try:
        return int(a.fn(a) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a server's error status, a bad setting, a path: one line, no traceback
        code = _error_exit(e)
        if code is None or os.environ.get("AVATARFORCING_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"avatarforcing {a.cmd}: error: {_error_line(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
