"""How much past audio a streamed wav2vec2 needs: error of block-by-block features against whole-clip ones.

    .venv/bin/python scripts/wav2vec_context_report.py

A server featurises a stream block by block (16 frames = 0.64 s) on a window of c seconds of past audio plus
the block (avatarforcing.wav2vec.Wav2VecFeatures.block_features); the published model was trained on
features of whole clips. For each c this prints the relative L2 error per block (||streamed - whole|| /
||whole|| over the block's rows) and the time per block for one session on this CPU, and writes JSON.

The wav2vec2 has the real wav2vec2-base sizes but RANDOM weights (nothing is downloaded here): the numbers show
the mechanics (what the window cuts off) and the cost, not the real model's error, which must be measured
with the real weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2Config, Wav2Vec2Model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avatarforcing.report import print_table  # noqa: E402
from avatarforcing.wav2vec import DEFAULT_CONTEXT_S, FPS, SAMPLES_PER_FRAME, Wav2VecFeatures  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "avatarforcing" / "assets" / "speech_16k.wav"
OUT = ROOT / "bench" / "results" / "wav2vec-context-cpu-2026-11-29.json"
WARNING = ("RANDOM WEIGHTS: wav2vec2-base sizes with random weights; these errors show only the mechanics of "
           "the sliding window, not the real model's error (measure that with facebook/wav2vec2-base-960h).")


def load_speech(path: Path, samples: int) -> np.ndarray:
    with wave.open(str(path)) as w:
        if w.getframerate() != 16000 or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    return np.resize(pcm, samples).astype(np.float32)  # looped


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def rel_per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[rows, dim] x 2 -> [rows]: relative L2 error of each row."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.48, help="clip length, rounded to whole blocks")
    ap.add_argument("--block-frames", type=int, default=16)
    ap.add_argument("--contexts", type=float, nargs="+", default=[0.64, 1.28, 2.56, 5.12, 10.24])
    ap.add_argument("--all-past", action=argparse.BooleanOptionalAction, default=True,
                    help="also the window from the start of the stream (no cut-off past: the right-context floor)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--wav2vec", type=Path, default=None,
                    help="a real wav2vec2 folder (e.g. facebook/wav2vec2-base-960h): the real model's error "
                         "(default: random weights at base sizes, which show only the mechanics)")
    ap.add_argument("--wav", type=Path, default=None, help="16-kHz mono 16-bit speech (default: the bundled sample)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warning = WARNING if args.wav2vec is None else ""
    speech = args.wav or SPEECH
    if warning:
        print(f"!!! {warning}")
    block = args.block_frames
    n_blocks = max(1, round(args.seconds * FPS / block))
    frames = n_blocks * block
    clip = torch.from_numpy(load_speech(speech, frames * SAMPLES_PER_FRAME))[None]

    torch.manual_seed(args.seed)
    if args.wav2vec is not None:
        feats = Wav2VecFeatures.from_folder(args.wav2vec)
        cfg = feats.model.config
        what = f"{args.wav2vec} (real weights)"
    else:
        cfg = Wav2Vec2Config()  # wav2vec2-base sizes: 768 x 12 layers, conv pos 128/16, feat_extract_norm "group"
        with tempfile.TemporaryDirectory() as d:
            Wav2Vec2Model(cfg).save_pretrained(d)
            feats = Wav2VecFeatures.from_folder(d)
        what = f"wav2vec2-base sizes, random weights (seed {args.seed})"
    print(f"{what}; feature_dim {feats.feature_dim}; "
          f"clip {frames / FPS:.2f} s of looped {speech.name} = {n_blocks} blocks of {block} frames; "
          f"{args.threads} threads on {cpu_name()}")

    t = time.perf_counter()
    whole = feats.frame_features(clip, frames)[0]  # [frames, dim]
    whole_s = time.perf_counter() - t
    print(f"whole clip: {whole_s:.2f} s")

    settings: list[tuple[str, float | None]] = [(f"{c:.2f}", c) for c in args.contexts]
    if args.all_past:
        settings.append(("all past", None))
    results: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    for label, c in settings:
        ctx_frames = frames if c is None else round(c * FPS)
        errs, first, last, times, full = [], [], [], [], []
        for b in range(n_blocks):
            start, end = b * block, (b + 1) * block
            lo = max(0, start - ctx_frames)
            window = clip[:, lo * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME]
            t = time.perf_counter()
            got = feats.block_features(window, block)[0]
            dt = time.perf_counter() - t
            ref = whole[start:end]
            errs.append(float((got - ref).norm() / ref.norm()))
            per_row = rel_per_row(got, ref)
            first.append(float(per_row[0]))
            last.append(float(per_row[-1]))
            full.append(c is None or start >= ctx_frames)
            if full[-1]:
                times.append(dt)
        steady = [e for e, f in zip(errs, full, strict=True) if f]
        gflop = None
        if c is not None:  # compute of one full window, independent of how busy this CPU is
            counter = FlopCounterMode(display=False)
            with counter:
                feats.block_features(clip[:, : (ctx_frames + block) * SAMPLES_PER_FRAME], block)
            gflop = counter.get_total_flops() / 1e9
        growing = c is None  # 'all past': no fixed window, so no window length, cost or time
        window_s = None if growing else (ctx_frames + block) / FPS
        ms_med = 1000 * statistics.median(times) if times and not growing else None
        ms_min = 1000 * min(times) if times and not growing else None
        mean_full = statistics.fmean(steady) if steady else None
        max_full = max(steady) if steady else None
        results.append({
            "context_s": c, "label": label, "window_s": window_s,
            "err_mean": statistics.fmean(errs), "err_max": max(errs),
            "err_mean_full_context": mean_full, "err_max_full_context": max_full,
            "err_first_row_mean": statistics.fmean(first), "err_last_row_mean": statistics.fmean(last),
            "gflop_per_block": gflop, "ms_per_block_median": ms_med, "ms_per_block_min": ms_min,
            "err_per_block": errs,
        })
        rows.append([label, fmt(window_s, ".2f"), fmt(statistics.fmean(errs), ".4f"), fmt(max(errs), ".4f"),
                     fmt(mean_full, ".4f"), fmt(max_full, ".4f"), fmt(statistics.fmean(first), ".4f"),
                     fmt(statistics.fmean(last), ".4f"), fmt(gflop, ".0f"), fmt(ms_med, ".0f"), fmt(ms_min, ".0f")])
        print(f"  context {label}: done", flush=True)

    print_table(
        f"Streamed vs whole-clip wav2vec2 features, blocks of {block} frames ({block / FPS:.2f} s), "
        f"{frames / FPS:.2f} s clip [RANDOM WEIGHTS: mechanics only]",
        ["context s", "window s", "err mean", "err max", "mean full ctx", "max full ctx", "1st row", "last row",
         "GFLOP/block", "ms/block med", "ms/block min"],
        rows)
    print("err: relative L2 over a block's rows (all blocks: the first ones have less past than the context); "
          "full ctx: only blocks with the whole context behind them; 1st/last row: mean relative error of the "
          "block's first/last frame; GFLOP/block: one full window, counted by torch's FlopCounterMode; ms/block: "
          f"median and min over full-context blocks, one session, {args.threads} threads, on a CPU shared with "
          "other jobs (load shown below). 'all past': the window runs from the stream's start (the floor left "
          "by the missing future; its cost grows with the stream).")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if warning:
        print(f"!!! {warning}")
    print(f"DEFAULT_CONTEXT_S in avatarforcing/wav2vec.py: {DEFAULT_CONTEXT_S}")

    report = {
        "warning": warning,
        "date": datetime.date.today().isoformat(),
        "command": "python scripts/wav2vec_context_report.py " + " ".join(sys.argv[1:]),
        "model": {"sizes": "wav2vec2-base", "weights": "random" if warning else str(args.wav2vec), "seed": args.seed,
                  "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                  "num_conv_pos_embeddings": cfg.num_conv_pos_embeddings,
                  "feat_extract_norm": cfg.feat_extract_norm, "feature_dim": feats.feature_dim},
        "audio": {"source": f"{speech} looped", "seconds": frames / FPS,
                  "frames": frames, "block_frames": block, "blocks": n_blocks},
        "cpu": {"name": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                "transformers": transformers.__version__, "dtype": "float32"},
        "whole_clip_s": whole_s,
        "load_average_at_end": os.getloadavg(),
        "default_context_s": DEFAULT_CONTEXT_S,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
