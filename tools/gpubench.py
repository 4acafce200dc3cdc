"""`avatarforcing bench --gpu`: the engine at the reference size on a CUDA GPU.

Measures, on whatever card it finds: the card's own ceilings (a large bf16 matrix product, a
device-to-device copy); the fused attention kernels at the 1.3B window's shape; the denoising
step of the ``wan-1.3b`` configuration at 480x832 (eager, CUDA graphs, compiled elementwise
stages), as milliseconds per frame and achieved TFLOP/s against the measured matrix peak; end to
end (denoising, decoding, copies to the host and the service's video encoder) at 480x832 and at
512x512 for batches of 1 to 8 sessions, with real-time sessions per GPU and device memory per
session slot; and that the optimised path computes what the plain float32 path computes.

Weights are random (the timing does not depend on them). ``--smoke`` runs every section at a tiny
size, on a CPU too, to check the script itself. Prints tables; writes JSON after every section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatarforcing import attention as attn
from avatarforcing import fa3
from avatarforcing.config import ModelConfig, StreamConfig, model_preset
from avatarforcing.engine import StreamEngine
from avatarforcing.flops import step_flops
from avatarforcing.model import AvatarDiT
from avatarforcing.report import print_table as _table
from avatarforcing.vae import TinyAutoencoder
from avatarforcing.wan_vae import WanVAE

REFERENCE_STREAM = StreamConfig(block_frames=4, window_blocks=4, level_steps=(200, 400, 800, 1000))
SMOKE_STREAM = StreamConfig(block_frames=2, window_blocks=2, level_steps=(500, 1000))


class Clock:
    """Wall time of a device region: synchronises before and after, median over repeats."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


# ---- the card -------------------------------------------------------------------------------------
def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def ceilings(device: torch.device, smoke: bool) -> dict[str, Any]:
    clock = Clock(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 512 if smoke else 8192
    rates = []
    for _ in range(3):  # fresh random operands each time (zeros run faster than real data)
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = clock.median(lambda: a @ b, repeats=3 if smoke else 10, warmup=3)  # noqa: B023
        rates.append(2 * n**3 / t / 1e12)
    nbytes = (64 if smoke else 2048) * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = clock.median(lambda: dst.copy_(src), repeats=3 if smoke else 20, warmup=2)
    out = {"matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
           "matmul_tflops": float(np.median(rates)), "copy_gb_s": 2 * nbytes / t / 1e9}
    _table("Ceilings measured on this device", ["what", "value"],
           [[f"{out['matmul_dtype']} matmul {n}^3, TFLOP/s", out["matmul_tflops"]],
            ["device copy (read + write), GB/s", out["copy_gb_s"]]])
    return out


def attention_kernels(device: torch.device, cfg: ModelConfig, stream: StreamConfig, smoke: bool) -> dict[str, Any]:
    """Each fused attention kernel alone on the window pass's and the clean pass's shapes (one session,
    no mask): in the layout of [n, heads, N, d] views of [n, N, heads, d] ("model"), heads-first contiguous (what
    the compiled stages hand it), and with only the queries, or only the values, token-first ("q-token-first",
    "v-token-first": what the values' concatenation would cost without its transposing copy). A kernel whose output
    follows the queries' layout (cuDNN's does) returns a heads-first output for heads-first queries, which the
    output projection's reshape then copies: each case also times that copy ("out_copy_ms"; 0 where the output is
    token-first already), so the layouts compare whole."""
    import warnings

    import torch.nn.functional as F

    clock = Clock(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    p, h, d = cfg.tokens_per_frame, cfg.heads, cfg.head_dim
    prefix = 1 + stream.history_frames
    shapes = {"window": (stream.window_frames * p, (prefix + stream.window_frames) * p),
              "clean": (stream.block_frames * p, (prefix + stream.block_frames) * p)}
    cases = [("window", "model"), ("window", "contiguous"), ("window", "q-token-first"), ("window", "v-token-first"),
             ("clean", "model")]
    # Per layout, which of q, k, v are token-first ([n, heads, N, d] views of [n, N, heads, d]); the rest heads-first.
    token_first_of = {"model": (True, True, True), "contiguous": (False, False, False),
                      "q-token-first": (True, False, False), "v-token-first": (False, False, True)}

    def operand(n: int, token_first: bool) -> torch.Tensor:
        if token_first:
            return torch.randn(1, n, h, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(1, h, n, d, device=device, dtype=dtype)

    rows: list[list[Any]] = []
    res: dict[str, dict[str, Any]] = {}
    names: list[tuple[str, str, str | None]] = [(b, b, None) for b in attn.CANDIDATES] if device.type == "cuda" \
        else [("auto", "auto", None)]
    impls = _flash_impls()
    if device.type == "cuda" and isinstance(impls, list):  # FlashAttention-3/4 as "flash", where installed
        names += [(f"flash ({impl})", "flash", impl) for impl in impls]
    fa3_why = fa3.unavailable(device) or (None if d in fa3.HEAD_DIMS else f"head dim {d}")
    if device.type == "cuda":  # FlashAttention-3's own kernels (the fa3-fwd wheel), bf16 and FP8
        names += [("fa3", "fa3", None), ("fa3 fp8", "fa3", None)]
    for label, name, impl in names:
        rec: dict[str, Any] = {}
        row: list[Any] = [label]
        if impl is not None:
            try:
                attn.use_flash_impl(impl)
            except ValueError as e:
                res[label] = {"error": str(e)[:600]}
                rows.append([label] + ["not installed"] * len(cases))
                continue
        if name == "fa3" and fa3_why is not None:
            res[label] = {"error": fa3_why[:600]}
            rows.append([label] + ["not usable"] * len(cases))
            continue
        for pass_name, layout in cases:
            nq, nk = shapes[pass_name]
            tq, tk, tv = token_first_of[layout]
            q, k, v = operand(nq, tq), operand(nk, tk), operand(nk, tv)
            flops = 4 * nq * nk * cfg.dim
            key = f"{pass_name}/{layout}"
            call = partial(fa3.attend, q, k, v, fp8=label == "fa3 fp8") if name == "fa3" else \
                partial(F.scaled_dot_product_attention, q, k, v)
            try:
                with warnings.catch_warnings(record=True) as caught, attn.only(name):
                    warnings.simplefilter("always")
                    t = clock.median(call, repeats=3 if smoke else 10, warmup=2)
                    o = call()
            except RuntimeError as e:
                why = "; ".join(str(w.message) for w in caught) or str(e).splitlines()[0]
                rec[key] = {"error": why[:600]}
                row.append("refused")
                continue
            token_first = o.transpose(1, 2).is_contiguous()
            copy_t = 0.0 if token_first else clock.median(partial(_token_first_copy, o), repeats=3 if smoke else 10,
                                                            warmup=1)
            rec[key] = {"queries": nq, "keys": nk, "ms": t * 1000, "tflops": flops / t / 1e12,
                        "out_token_first": token_first, "out_copy_ms": copy_t * 1000}
            row.append(f"{t * 1000:.2f} ms {flops / t / 1e12:.0f}" + ("" if token_first else
                                                                        f" +{copy_t * 1000:.2f} copy"))
        if impl is not None:
            attn.use_flash_impl(None)
        res[label] = rec
        rows.append(row)
    # Per pass: the fastest kernel on its own shape (what attention "fastest" picks at run time).
    fastest: dict[str, str] = {}
    for pass_name, layout in cases:
        if layout in ("q-token-first", "v-token-first"):  # layout studies: not what the engine hands the kernels
            continue
        key = f"{pass_name}/{layout}"
        # (FP8 attention is a setting of its own, fp8_attention: not a kernel choice of the bf16 engine.)
        t_of = {k: r[key]["ms"] for k, r in res.items() if "ms" in r.get(key, {}) and k != "fa3 fp8"}
        if t_of:
            fastest[key] = min(t_of, key=lambda k: t_of[k])
    best = fastest.get("window/model", "auto")
    _table(f"Attention kernels alone, {h} heads x {d} (ms, TFLOP/s); window {shapes['window']}, "
           f"clean {shapes['clean']} (queries, keys)", ["kernel"] + [f"{a} {b}" for a, b in cases], rows)
    for name, rec in res.items():
        if isinstance(rec.get("error"), str):
            print(f"  {name}: {rec['error'][:300]}")
            continue
        for key, r in rec.items():
            if "error" in r:
                print(f"  {name} refused {key}: {r['error'][:300]}")
    print(f"  fastest per pass: {fastest}; flash attention implementations this PyTorch offers: {impls}")
    for name, rec in res.items():  # the window pass with its output copy: heads-first queries vs token-first ones
        a, b = rec.get("window/contiguous", {}), rec.get("window/q-token-first", {})
        if "ms" in a and "ms" in b:
            print(f"  {name}, window with the output's copy: heads-first {a['ms'] + a['out_copy_ms']:.2f} ms, "
                  f"token-first queries {b['ms'] + b['out_copy_ms']:.2f} ms")
    return {"shapes": shapes, "kernels": res, "best": best, "fastest": fastest, "flash_impls": impls}


def _token_first_copy(o: torch.Tensor) -> torch.Tensor:
    """What the output projection's reshape does to a heads-first attention output [n, heads, N, d]."""
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def _attention_choice(att: dict[str, Any] | None) -> str:
    """The engines' attention setting from the kernel timings: the one kernel fastest on every pass, else
    "fastest" (chosen per shape at run time); a FlashAttention-3/4 kernel among them is activated for the run."""
    if not att or not att.get("fastest"):
        return "auto"
    chosen = set(att["fastest"].values())
    for label in chosen:
        if label.startswith("flash ("):
            attn.use_flash_impl(label[len("flash ("):-1])
    kernels = {"flash" if c.startswith("flash (") else c for c in chosen}
    return kernels.pop() if len(kernels) == 1 else "fastest"


def _flash_impls() -> list[str] | str:
    """Other flash attention implementations PyTorch can switch to (FlashAttention-3 on Hopper, where installed)."""
    try:
        from torch.nn.attention import list_flash_attention_impls  # type: ignore[attr-defined]

        return list(list_flash_attention_impls())
    except Exception as e:
        return f"{type(e).__name__}: {e}"


# ---- the engine -----------------------------------------------------------------------------------
def build(cfg: ModelConfig, device: torch.device) -> tuple[AvatarDiT, TinyAutoencoder]:
    torch.manual_seed(0)
    with torch.device(device):
        model = AvatarDiT(cfg)
        vae = TinyAutoencoder(cfg)
    return model, vae


def make_engine(model: AvatarDiT, vae: TinyAutoencoder | WanVAE, stream: StreamConfig, n: int, device: torch.device,
                **opts: Any) -> tuple[StreamEngine, list[int]]:
    eng = StreamEngine(model, vae, stream, max_sessions=n, device=device, **opts)
    face = (np.random.default_rng(0).random((model.cfg.height, model.cfg.width, 3)) * 255).astype(np.uint8)
    anchor = eng.prepare_anchor(face)
    return eng, [eng.allocate(anchor, seed=i + 1) for i in range(n)]


def _pcm(eng: StreamEngine, n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, eng.block_samples)) * 0.1).astype(np.float32)


def denoise_variants(model: AvatarDiT, vae: TinyAutoencoder, stream: StreamConfig, device: torch.device,
                     attention: str, peak: float, repeats: int) -> dict[str, Any]:
    """Denoising alone (window pass + temporal-anchor pass + slide), one session, per variant."""
    cfg = model.cfg
    clock = Clock(device)
    fl = step_flops(cfg, stream)
    cuda = device.type == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    variants: list[tuple[str, dict[str, Any]]] = [
        ("eager, PyTorch's attention choice", dict(dtype=dtype)),
        (f"eager, {attention} attention", dict(dtype=dtype, attention=attention)),
    ]
    if cuda:
        variants.append((f"CUDA graphs, {attention}", dict(dtype=dtype, attention=attention, cuda_graphs=True)))
    # The fast path as measured before the half-split RoPE layout and the fused residual norms (interleaved RoPE;
    # the residual-norm fusion has no switch), then as it is now.
    variants.append((f"compiled{', CUDA graphs' if cuda else ''}, {attention}, interleaved RoPE",
                     dict(dtype=dtype, attention=attention, cuda_graphs=cuda, compile=True, half_split_rope=False)))
    variants.append((f"compiled{', CUDA graphs' if cuda else ''}, {attention}",
                     dict(dtype=dtype, attention=attention, cuda_graphs=cuda, compile=True)))
    # Queries written token-first: no copy of the attention output before its projection, perhaps a slower kernel.
    variants.append((f"compiled{', CUDA graphs' if cuda else ''}, {attention}, token-first queries",
                     dict(dtype=dtype, attention=attention, cuda_graphs=cuda, compile=True, token_first_queries=True)))
    rows: list[list[Any]] = []
    out: list[dict[str, Any]] = []
    for name, opts in variants:
        try:
            t, setup, errors = _time_denoise(model, vae, stream, device, opts, clock, repeats)
        except Exception as e:  # one variant failing must not cost the others' numbers
            out.append({"variant": name, "options": opts, "error": _err(e)})
            rows.append([name, "failed", "-", "-", "-", "-"])
            _free(device)
            continue
        ms_frame = t * 1000 / fl.frames
        tflops = fl.denoise / t / 1e12
        rec = {"variant": name, "options": opts, "step_ms": t * 1000, "ms_per_frame": ms_frame,
               "tflops": tflops, "share_of_matmul_peak": tflops / peak, "setup_s": setup, "graph_errors": errors,
               "attention_refusals": dict(attn.refusals)}
        out.append(rec)
        rows.append([name, t * 1000, ms_frame, tflops, f"{100 * tflops / peak:.0f}%", setup])
        _free(device)
    _table(f"Denoising, {cfg.name} {cfg.height}x{cfg.width}, one session "
           f"({fl.denoise / 1e12:.1f} TFLOP per step of {fl.frames} frames)",
           ["variant", "step ms", "ms/frame", "TFLOP/s", "of peak", "setup s"], rows)
    return {"model": cfg.name, "height": cfg.height, "width": cfg.width, "step_tflop": fl.denoise / 1e12,
            "frames_per_step": fl.frames, "variants": out}


def _time_denoise(model: AvatarDiT, vae: TinyAutoencoder, stream: StreamConfig, device: torch.device,
                  opts: dict[str, Any], clock: Clock, repeats: int) -> tuple[float, float, dict[int, str]]:
    t0 = time.perf_counter()
    eng, slots = make_engine(model, vae, stream, 1, device, **opts)
    pcm = _pcm(eng, 1)
    for _ in range(eng.warmup_steps + 2):  # warm-up steps, then the first steady ones (graph capture)
        eng.step(slots, pcm)
    setup = time.perf_counter() - t0
    t = clock.median(lambda: eng.denoise_step(slots, pcm), repeats=repeats)
    return t, setup, dict(eng.graph_errors)


def _err(e: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(e))[-3000:]


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _weights_bytes(model: AvatarDiT, vae: torch.nn.Module, opts: dict[str, Any], *more: torch.nn.Module) -> int:
    size = torch.tensor([], dtype=getattr(torch, opts.get("dtype", "float32"))).element_size()
    return sum(p.numel() for m in (model, vae, *more) for p in m.parameters()) * size


def _encode_after(prev: concurrent.futures.Future[Any] | None, encoder: Any, result: Any) -> None:
    """Collects a session's block (a deferred result: waits for its decoding) and encodes it, once its previous
    block is encoded (a session's frames stay in order), as the server's encode threads do."""
    if prev is not None:
        prev.result()
    frames = result.wait().frames
    if encoder is not None:
        encoder.encode(frames)


def _encoder_factory(encoding: str, cfg: ModelConfig) -> tuple[Callable[[], Any] | None, str | None]:
    """The service's own video encoder, if this machine has what it needs."""
    if encoding == "none":
        return None, None
    try:
        from avatarforcing_proto import pb
        from avatarforcing_service.codecs import make_encoder
    except ModuleNotFoundError as e:  # a device machine without PyAV (or protobuf): end to end without encoding
        return None, f"encoder unavailable: the module {e.name!r} is not installed here"
    code = {"h264": pb.VIDEO_ENCODING_H264, "jpeg": pb.VIDEO_ENCODING_JPEG}[encoding]
    return (lambda: make_encoder(code, cfg.width, cfg.height, cfg.fps)), None


def end_to_end(model: AvatarDiT, vae: TinyAutoencoder | WanVAE, stream: StreamConfig, device: torch.device,
               opts: dict[str, Any], batches: list[int], steps: int, encoding: str,
               engine_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steps as the server does: ``step`` with deferred results (denoising, decoding, the frames' copy to the
    host; with ``overlap_decode`` the decoding runs beside the next step's denoising), each session's frames
    collected and encoded by its own encoder on a thread pool.
    ``engine_kw``: more engine arguments (the published model's wav2vec2, text context, decoder)."""
    cfg = model.cfg
    clock = Clock(device)
    fl = step_flops(cfg, stream)
    block_s = fl.frames / cfg.fps
    factory, enc_note = _encoder_factory(encoding, cfg)
    rows: list[list[Any]] = []
    out: list[dict[str, Any]] = []
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(16, max(batches))))
    cuda = device.type == "cuda"
    for n in batches:
        _free(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        reserved0 = torch.cuda.memory_reserved(device) if cuda else 0
        eng, slots = make_engine(model, vae, stream, n, device, **opts, **(engine_kw or {}))
        pcm = _pcm(eng, n)
        encoders = [factory() for _ in slots] if factory else []
        chains: list[concurrent.futures.Future[Any] | None] = [None] * n

        def deliver(results: list[Any], encoders: list[Any] = encoders, chains: list[Any] = chains) -> None:
            for i, r in enumerate(results):
                if r.emitted_block is not None:
                    chains[i] = pool.submit(_encode_after, chains[i], encoders[i] if encoders else None, r)

        for _ in range(eng.warmup_steps + 2):
            deliver(eng.step(slots, pcm, deferred=True))
        for f in chains:
            if f is not None:
                f.result()
        denoise = clock.median(partial(eng.denoise_step, slots, pcm), repeats=max(2, steps // 2))
        clock.sync()
        t = time.perf_counter()
        for _ in range(steps):
            deliver(eng.step(slots, pcm, deferred=True))
        for f in chains:
            if f is not None:
                f.result()
        step_t = (time.perf_counter() - t) / steps
        extra: dict[str, Any] = {}
        if n == batches[0]:
            # The decoder alone on one step's blocks: its share of the step.
            lat = torch.randn(n, stream.block_frames, cfg.latent_channels, *cfg.latent_hw, device=device,
                              dtype=eng.dtype)
            with torch.inference_mode():  # through the engine: Wan's decoder carries each slot's cache
                idx = torch.tensor(slots, device=device)
                extra["decode_ms"] = clock.median(partial(eng._decode, idx, lat), repeats=5) * 1000
                if eng.w2v is not None:
                    window = torch.randn(n, eng.context_samples + eng.block_samples, device=device)
                    extra["audio_features_ms"] = clock.median(partial(eng._audio_tokens, window), repeats=5) * 1000
                extra["decoder_cache_bytes_per_slot"] = eng.decoder_cache_bytes()
            print(f"  batch {n}: {step_t * 1000:.1f} ms per step; decoding one step's {n * fl.frames} frames "
                  f"alone: {extra['decode_ms']:.1f} ms")
        # Device memory the engine took for n sessions: slots, graph pools, workspace.
        engine_bytes = torch.cuda.max_memory_reserved(device) - reserved0 if cuda else 0
        fps_total = n * fl.frames / step_t
        frames = n * fl.frames
        rec = {"batch": n, "step_ms": step_t * 1000, "denoise_step_ms": denoise * 1000,
               "ms_per_frame": step_t * 1000 / frames, "denoise_ms_per_frame": denoise * 1000 / frames,
               "frames_per_s": fps_total, "realtime": step_t <= block_s, "capacity_sessions_25fps": fps_total / cfg.fps,
               "tflops": n * fl.total / step_t / 1e12, "slot_bytes": eng.slot_bytes(),
               "engine_bytes": engine_bytes, "graph_errors": dict(eng.graph_errors), **extra}
        out.append(rec)
        rows.append([n, step_t * 1000, rec["ms_per_frame"], rec["denoise_ms_per_frame"], fps_total,
                     "yes" if rec["realtime"] else "no", eng.slot_bytes() / 2**30, engine_bytes / 2**30])
        for e in encoders:
            e.close()
        del eng
        _free(device)
    pool.shutdown()
    rt = [r["batch"] for r in out if r["realtime"]]
    best = max(out, key=lambda r: r["frames_per_s"])
    summary: dict[str, Any] = {"realtime_sessions": max(rt) if rt else 0,
                               "capacity_sessions_25fps": math.floor(best["capacity_sessions_25fps"]),
                               "block_seconds": block_s, "weights_bytes": _weights_bytes(model, vae, opts)}
    if len(out) > 1:  # what one more session costs: slot state plus its share of the batch's workspace
        a0, a1 = out[0], out[-1]
        summary["marginal_bytes_per_session"] = (a1["engine_bytes"] - a0["engine_bytes"]) / (a1["batch"] - a0["batch"])
    _table(f"End to end, {cfg.name} {cfg.height}x{cfg.width}: denoise + decode + copies + "
           f"{encoding if factory else 'no'} encoding ({enc_note or 'the service encoder'}); "
           f"a step is real time under {block_s * 1000:.0f} ms",
           ["sessions", "step ms", "ms/frame", "denoise ms/frame", "frames/s", "real time", "slot GiB",
            "engine GiB"], rows)
    print(f"  real-time {cfg.fps:.0f}-fps sessions: {summary['realtime_sessions']} (largest batch measured that "
          f"keeps up); throughput capacity: {best['capacity_sessions_25fps']:.2f} sessions")
    if "marginal_bytes_per_session" in summary:
        print(f"  device memory: weights {summary['weights_bytes'] / 2**30:.2f} GiB; each more session "
              f"{summary['marginal_bytes_per_session'] / 2**30:.2f} GiB (its slot and its share of the workspace)")
    return {"model": cfg.name, "height": cfg.height, "width": cfg.width, "options": opts, "encoding": encoding,
            "encoder_note": enc_note, "by_batch": out, **summary}


def published(device: torch.device, opts: dict[str, Any], steps: int, encoding: str, smoke: bool,
              batches: list[int], fp8: bool = True) -> dict[str, Any]:
    """The published model's configuration end to end at 480x832 (random weights in its layout: timing does not
    depend on them): wav2vec2-base features on a sliding window, the umT5 context's cross-attention, the
    transformer, and Wan's VAE decode with each slot's cache; then the same with the small decoder, and (``fp8``)
    with Wan's decode and FP8 products."""
    from avatarforcing.checkpoint import small_decoder
    from avatarforcing.published import published_config, published_stream
    from avatarforcing.wan_vae import WanVAEConfig
    from avatarforcing.wav2vec import Wav2VecFeatures

    if smoke:
        cfg = published_config(256, 4, 2, 384, 48, 128, 32, height=64, width=96)
        vcfg, w2v_cfg = WanVAEConfig(dim=8), dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, conv_dim=(32,) * 7,
                                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    else:
        cfg, vcfg, w2v_cfg = model_preset("avatarforcing-1.3b"), WanVAEConfig(), {}  # wav2vec2-base
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    with torch.device(device):
        model, wan = AvatarDiT(cfg), WanVAE(vcfg)
        w2v = Wav2VecFeatures(Wav2Vec2Model(Wav2Vec2Config(**w2v_cfg)))  # type: ignore[arg-type]
    context = torch.randn(cfg.text_len, cfg.text_dim) * 0.1
    stream = published_stream()
    kw: dict[str, Any] = {"audio": w2v, "context": context}
    out: dict[str, Any] = {"weights_bytes": _weights_bytes(model, wan, opts, w2v)}
    out["wan_decoder"] = end_to_end(model, wan, stream, device, opts, batches, steps, encoding, engine_kw=kw)
    _free(device)
    small = small_decoder(cfg, vcfg.z_dim)
    out["tiny_decoder"] = end_to_end(model, wan, stream, device, opts, batches[:1], steps, encoding,
                                     engine_kw={**kw, "decoder": small})
    _free(device)
    if device.type == "cuda":  # Wan's decode on its own stream, beside the next step's denoising
        out["wan_decoder_overlap"] = end_to_end(model, wan, stream, device, {**opts, "overlap_decode": True},
                                                batches, steps, encoding, engine_kw=kw)
        _free(device)
    if fp8:  # last: FP8 replaces the model's linears in place
        out["wan_decoder_fp8"] = end_to_end(model, wan, stream, device, {**opts, "fp8": True}, batches, steps,
                                            encoding, engine_kw=kw)
        if device.type == "cuda":
            _free(device)
            out["wan_decoder_fp8_overlap"] = end_to_end(model, wan, stream, device,
                                                        {**opts, "fp8": True, "overlap_decode": True}, batches,
                                                        steps, encoding, engine_kw=kw)
            if fa3.unavailable(device) is None and cfg.head_dim in fa3.HEAD_DIMS:  # the 20-ms target's configuration
                _free(device)
                out["wan_decoder_fp8_attention_overlap"] = end_to_end(
                    model, wan, stream, device, {**opts, "fp8": True, "fp8_attention": True, "overlap_decode": True},
                    batches, steps, encoding, engine_kw=kw)
    return out


def fp8_section(cfg: ModelConfig, stream: StreamConfig, device: torch.device, opts: dict[str, Any],
                steps: int) -> dict[str, Any]:
    """FP8 products against the same engine without them: the stated error on every emitted frame (relative
    error of the latents, PSNR of the decoded frames; random weights, so it is the numerics' error, not a
    trained model's) and the time of a step of each."""
    from avatarforcing.fp8_bench import compare_fp8

    kw = {k: v for k, v in opts.items() if k not in ("dtype", "fp8", "fp8_attention")}
    vae = TinyAutoencoder(cfg)
    out = compare_fp8(lambda: AvatarDiT(cfg), vae, stream, device=device, dtype=opts.get("dtype", "bfloat16"),
                      steps=max(steps, 8), **kw)
    why = fa3.unavailable(device)
    if why is None and cfg.head_dim in fa3.HEAD_DIMS:  # and FlashAttention-3's FP8 attention on top
        both = compare_fp8(lambda: AvatarDiT(cfg), vae, stream, device=device, dtype=opts.get("dtype", "bfloat16"),
                           steps=max(steps, 8), fp8_attention="kernel", **kw)
        both["stated_error"] = both.pop("error")
        out["with_fp8_attention"] = both
    else:
        out["with_fp8_attention"] = {"skipped": why or f"head dim {cfg.head_dim}"}
    # (Not "error": that key marks a failed section.)
    e = out["stated_error"] = out.pop("error")
    fl = step_flops(cfg, stream)
    _table(f"FP8 products vs {out['dtype']}, {cfg.name} {cfg.height}x{cfg.width}, one session ({out['fp8_layers']} "
           f"linears in FP8, {e['frames']} frames compared)",
           ["what", "value"],
           [["step ms, reference", out["reference_ms_per_step"]], ["step ms, FP8", out["fp8_ms_per_step"]],
            ["ms per frame, FP8", out["fp8_ms_per_step"] / fl.frames], ["speed-up", out["speedup"]],
            ["latent relative error (all / worst frame)", f"{e['latent_rel']:.4f} / {e['latent_rel_max']:.4f}"],
            ["frame PSNR dB (mean / lowest)", f"{e['psnr_db']:.1f} / {e['psnr_min_db']:.1f}"],
            ["largest pixel difference", e["max_pixel_diff"]]])
    both = out["with_fp8_attention"]
    if "stated_error" in both:
        e = both["stated_error"]
        _table("FP8 products + FlashAttention-3 FP8 attention, same comparison", ["what", "value"],
               [["step ms, reference", both["reference_ms_per_step"]], ["step ms, FP8", both["fp8_ms_per_step"]],
                ["ms per frame, FP8", both["fp8_ms_per_step"] / fl.frames], ["speed-up", both["speedup"]],
                ["latent relative error (all / worst frame)", f"{e['latent_rel']:.4f} / {e['latent_rel_max']:.4f}"],
                ["frame PSNR dB (mean / lowest)", f"{e['psnr_db']:.1f} / {e['psnr_min_db']:.1f}"],
                ["largest pixel difference", e["max_pixel_diff"]]])
    else:
        print(f"  FP8 attention not measured: {both['skipped']}")
    return out


def profile_step(model: AvatarDiT, vae: TinyAutoencoder, stream: StreamConfig, device: torch.device,
                 opts: dict[str, Any]) -> dict[str, Any]:
    """Where a denoising step's device time goes, by kernel kind (torch.profiler, one step, no graphs)."""
    from torch.profiler import ProfilerActivity, profile

    eng, slots = make_engine(model, vae, stream, 1, device, **{**opts, "cuda_graphs": False})
    pcm = _pcm(eng, 1)
    for _ in range(eng.warmup_steps + 1):
        eng.step(slots, pcm)
    eng.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        eng.denoise_step(slots, pcm)
        eng.synchronize()
    kinds: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for ev in prof.key_averages():
        t = float(getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0) or 0.0)
        if device.type != "cuda":
            t = float(ev.self_cpu_time_total)
        if t <= 0 or (device.type == "cuda" and getattr(ev, "device_type", None) is not None
                      and "CUDA" not in str(ev.device_type)):
            continue
        kernels.append((ev.key, t / 1000, ev.count))
        kinds[_kernel_kind(ev.key)] = kinds.get(_kernel_kind(ev.key), 0.0) + t / 1000
    kernels.sort(key=lambda r: -r[1])
    total = sum(kinds.values())
    _table("Where one denoising step's device time goes (compiled, no graphs; ms)", ["kind", "ms", "share"],
           [[k, v, f"{100 * v / total:.0f}%"] for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])])
    _table("Top kernels", ["kernel", "ms", "calls"], [[k[:90], t, c] for k, t, c in kernels[:15]])
    return {"by_kind_ms": kinds, "total_ms": total, "top_kernels": [
        {"name": k, "ms": t, "calls": c} for k, t, c in kernels[:40]]}


def _kernel_kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("fmha", "flash", "cudnn", "sdpa", "attention", "fprop")):
        return "attention"
    if any(s in n for s in ("gemm", "xmma", "cutlass", "matmul", "nvjet", "sm90_", "gemv", "addmm", "aten::mm",
                            "aten::bmm", "aten::linear")):
        return "matrix products"
    if n.startswith("triton") or "triton" in n:
        return "fused elementwise (compiled)"
    if any(s in n for s in ("conv", "implicit", "winograd", "cudnn")):
        return "convolutions"
    if any(s in n for s in ("memcpy", "memset", "copy", "cat", "index", "gather", "scatter")):
        return "copies, gathers, concatenation"
    return "other elementwise"


# ---- correctness ------------------------------------------------------------------------------------
def equivalence(device: torch.device, attention: str, steps: int = 8) -> dict[str, Any]:
    """The optimised path against the plain float32 path on a reduced model, same seeds: relative error
    of the frames and of the window state after ``steps`` steps (warm-up and steady state)."""
    cfg = model_preset("wan-1.3b", height=128, width=128, dim=256, layers=4, heads=2, ffn_dim=512,
                       text_dim=64, text_len=16, audio_layers=(1, 3), vae_channels=(32, 32, 32),
                       audio_feature_dim=64, n_mels=40)
    stream = StreamConfig(block_frames=2, window_blocks=3, level_steps=(300, 700, 1000))
    cuda = device.type == "cuda"
    ref_model, ref_vae = build(cfg, torch.device("cpu"))
    dtype = "bfloat16" if cuda else "float32"
    # Same device for every path: the noise generator's stream differs between devices.
    paths: dict[str, dict[str, Any]] = {"plain float32": dict(device=device),
             f"{dtype}, {attention}{', CUDA graphs' if cuda else ''}, compiled":
                 dict(device=device, dtype=dtype, attention=attention, cuda_graphs=cuda, compile=True)}
    if cuda:
        paths["float32, CUDA graphs, compiled"] = dict(device=device, dtype="float32", attention=attention,
                                                       cuda_graphs=True, compile=True)
    runs: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
    for name, opts in paths.items():
        model = AvatarDiT(cfg)
        model.load_state_dict(ref_model.state_dict())
        vae = TinyAutoencoder(cfg)
        vae.load_state_dict(ref_vae.state_dict())
        dev = torch.device(opts.pop("device"))
        eng, slots = make_engine(model, vae, stream, 2, dev, **opts)
        frames = []
        for k in range(steps):
            for r in eng.step(slots, _pcm(eng, 2, seed=k)):
                if r.frames is not None:
                    frames.append(r.frames)
        runs[name] = (np.stack(frames).astype(np.float64), eng.win_lat.float().cpu())
    (_, (f0, w0)), *others = runs.items()
    out: dict[str, Any] = {}
    rows: list[list[Any]] = []
    if cuda:  # which GELU the fused FFN epilogue computes here (the model's is the tanh one)
        import torch.nn.functional as F

        x = torch.randn(4096, 256, device=device, dtype=torch.bfloat16)
        w = torch.randn(1024, 256, device=device, dtype=torch.bfloat16) / 16
        b = torch.randn(1024, device=device, dtype=torch.bfloat16)
        fused = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
        lin = F.linear(x, w, b).float()
        out["gelu_epilogue_max_abs_diff"] = {
            "vs_tanh": float((fused - F.gelu(lin, approximate="tanh")).abs().max()),
            "vs_erf": float((fused - F.gelu(lin)).abs().max())}
        print(f"  GELU epilogue vs tanh / erf GELU: {out['gelu_epilogue_max_abs_diff']}")
    for name, (f, w) in others:
        fr = float(np.linalg.norm(f - f0) / np.linalg.norm(f0))
        wr = float((w - w0).norm() / w0.norm())
        out[name] = {"frames_rel_err": fr, "window_rel_err": wr, "max_pixel_diff": float(np.abs(f - f0).max())}
        rows.append([name, f"{fr:.2e}", f"{wr:.2e}", out[name]["max_pixel_diff"]])
    _table(f"Optimised vs plain float32 (reduced model, {steps} steps, random weights)",
           ["path", "frames rel err", "window rel err", "max pixel diff"], rows)
    return out


# ---- the command ------------------------------------------------------------------------------------
def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avatarforcing bench --gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/gpu-<card>-<date>.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script (runs on a CPU)")
    ap.add_argument("--sections",
                    default="ceilings,attention,equivalence,denoise,profile,e2e-full,fp8,e2e-512,published",
                    help="comma-separated subset to run")
    ap.add_argument("--published-batches", default="1,2", help="batch sizes of the published model's table")
    ap.add_argument("--batches", default="1,2,3,4,8", help="batch sizes of the 512x512 end-to-end table")
    ap.add_argument("--encoding", default="h264", choices=["h264", "jpeg", "none"])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --smoke to check the script", file=sys.stderr)
        return 2
    sections = set(a.sections.split(","))
    if a.smoke:
        full = model_preset("tiny", text_dim=32, text_len=8)
        square = full
        stream = SMOKE_STREAM
    else:
        full = model_preset("wan-1.3b")
        square = model_preset("wan-1.3b", height=512, width=512)
        stream = REFERENCE_STREAM
    info = env_info(device)
    card = (info.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    out_path = a.out or Path("bench/results") / f"gpu-{card}{'-smoke' if a.smoke else ''}-{dt.date.today()}.json"
    res: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "env": info,
                           "smoke": a.smoke, "stream": dataclasses.asdict(stream), "sections": {}}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2))

    def section(name: str, fn: Callable[[], Any]) -> Any:
        """Runs one section; a failure is recorded (and printed) and the others still run."""
        if name not in sections:
            return None
        # Each section starts from a clean compile state: the sections build models of other sizes, dtypes and
        # RoPE layouts, and the fused stages' variants would add up past dynamo's recompile limit (an error
        # under fullgraph), which one server, one model, never meets. Compile time is in no timed region.
        torch._dynamo.reset()
        try:
            res["sections"][name] = fn()
        except Exception as e:
            res["sections"][name] = {"error": _err(e)}
            print(f"\nsection {name} failed:\n{_err(e)}", file=sys.stderr)
            _free(device)
        save()
        r = res["sections"][name]
        return None if "error" in r else r

    t_all = time.perf_counter()
    print(f"{info.get('gpu') or 'CPU'} | torch {info['torch']} | cuda {info.get('cuda')} | cudnn {info.get('cudnn')}")
    ceil = section("ceilings", lambda: ceilings(device, a.smoke))
    peak = ceil["matmul_tflops"] if ceil else float("nan")
    att = section("attention", lambda: attention_kernels(device, full, stream, a.smoke))
    attention = res["attention"] = _attention_choice(att)
    section("equivalence", lambda: equivalence(device, attention))
    cuda = device.type == "cuda"
    fast: dict[str, Any] = dict(dtype="bfloat16" if cuda else "float32", attention=attention, cuda_graphs=cuda,
                                compile=True)
    if sections & {"denoise", "profile", "e2e-full"}:
        model, vae = build(full, device)
        den = section("denoise", lambda: denoise_variants(model, vae, stream, device, attention, peak,
                                                          repeats=max(3, a.steps)))
        timed = [v for v in (den or {}).get("variants", []) if "step_ms" in v and not v["graph_errors"]]
        if timed:
            fast = {**min(timed, key=lambda v: v["step_ms"])["options"]}
        section("profile", lambda: profile_step(model, vae, stream, device, fast))
        section("e2e-full", lambda: end_to_end(model, vae, stream, device, fast, [1], a.steps, a.encoding))
        del model, vae
        _free(device)
    section("fp8", lambda: fp8_section(full, stream, device, fast, a.steps))
    res["engine_options"] = fast
    if "e2e-512" in sections:
        batches = [int(b) for b in a.batches.split(",")]

        def square_e2e() -> dict[str, Any]:
            m, v = build(square, device)
            return end_to_end(m, v, stream, device, fast, batches, a.steps, a.encoding)

        section("e2e-512", square_e2e)
    if "published" in sections:
        section("published", lambda: published(device, fast, a.steps, a.encoding, a.smoke,
                                                [int(b) for b in a.published_batches.split(",")],
                                                fp8="fp8" in sections))
    res["seconds"] = time.perf_counter() - t_all
    save()
    print(f"\nwrote {out_path} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
