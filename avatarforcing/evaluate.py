"""``avatarforcing eval``: the benchmark table (teacher, AvatarForcing student, AR baseline).

The student and the baseline run through ``StreamEngine`` (the code path the server runs: one
batched pass per block, the window slid with fresh noise, L-1 blocks of look-ahead; after the
clip's last block, silence is fed until every block is out). The teacher runs offline on the
whole clip in independent chunks of its training length (K latent frames, each anchored to the
reference), with CFG and its multi-step sampler.

Metrics (``avatarforcing.metrics``), per clip then averaged:

* ``sync``: Pearson correlation of the mouth opening measured from the generated pixels with the
  same measurement on the ground-truth frames; ``offset``: the lag in frames (-10..10) of best
  correlation (positive = video late); ``sync@best``: the correlation at that lag.
* ``psnr_gt`` / ``ssim_gt``: appearance outside the mouth box against the ground-truth frames
  (the head's idle sway is random, so this is bounded well below a pixel-exact match);
  ``psnr_ref``: outside the mouth against the reference image.
* Long-form clips (60 s): each metric per 10-s segment; ``drift`` is the least-squares slope of
  ``psnr_gt`` (dB per segment) against the segment index, ``sync_drift`` that of ``sync``;
  ``psnr_first`` / ``psnr_last`` the first and last segments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import DEFAULT_CHECKPOINT, PACKAGE_CHECKPOINTS, LoadedModel, load_checkpoint
from .data import LONG_FORM, make_clip
from .engine import StreamEngine
from .metrics import best_offset, box_mask, drift_slope, mouth_opening, per_segment, psnr, ssim, sync_correlation
from .vae import to_pixels, to_unit


@dataclass
class EvalConfig:
    test_clips: int = 16
    test_seconds: float = 10.0
    long_clips: int = 4
    long_seconds: float = 60.0
    seed: int = 0
    batch: int = 8
    teacher_steps: int = 20
    cfg_scale: float = 4.5
    split: str = "test"


# ---- generation ------------------------------------------------------------------------------------
@torch.inference_mode()
def stream_clips(lm: LoadedModel, clips: list[dict[str, Any]], device: str = "cpu", batch: int = 8,
                 progress: bool = True, desc: str = "stream", similarities: list[float] | None = None,
                 ) -> list[np.ndarray]:
    """Every clip through the streaming engine; returns uint8 frames [T', H, W, 3] per clip.

    T' is the clip's length rounded down to whole blocks.
    """
    out: list[np.ndarray] = []
    n_batches = (len(clips) + batch - 1) // batch
    for b0 in tqdm(range(0, len(clips), batch), desc=desc, disable=not progress, total=n_batches):
        part = clips[b0:b0 + batch]
        eng = StreamEngine(lm.model, lm.vae, lm.stream_cfg, max_sessions=len(part), device=device)
        fpb, bs = eng.frames_per_block, eng.block_samples
        slots = [eng.allocate(eng.prepare_anchor(c["reference"]), seed=1000 + b0 + i) for i, c in enumerate(part)]
        n_blocks = [len(c["frames"]) // fpb for c in part]
        frames: list[list[np.ndarray]] = [[] for _ in part]
        for step in range(max(n_blocks) + eng.L - 1):
            pcm = np.zeros((len(part), bs), np.float32)
            for i, c in enumerate(part):
                if step < n_blocks[i]:
                    pcm[i] = c["audio"][step * bs:(step + 1) * bs]
            for i, r in enumerate(eng.step(slots, pcm)):
                if r.frames is not None and r.emitted_block is not None and r.emitted_block < n_blocks[i]:
                    frames[i].append(r.frames)
                    if similarities is not None and r.anchor_similarity is not None:
                        similarities.append(r.anchor_similarity)
        out += [np.concatenate(f) for f in frames]
    return out


@torch.inference_mode()
def teacher_clips(lm: LoadedModel, clips: list[dict[str, Any]], clip_frames: int, n_steps: int, scale: float,
                  device: str = "cpu", progress: bool = True, seed: int = 0) -> list[np.ndarray]:
    """The teacher offline over each whole clip, in independent chunks of ``clip_frames`` latents."""
    from .train.teacher import Geometry, clip_audio_tokens, sample

    dev = torch.device(device)
    model, vae = lm.model.to(dev).eval(), lm.vae.to(dev).eval()
    cfg = model.cfg
    k = cfg.frames_per_latent
    geo = Geometry(cfg, clip_frames, dev)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in tqdm(clips, desc="teacher", disable=not progress):
        n_lat = len(c["frames"]) // k
        ref = vae.encode_image(to_unit(torch.from_numpy(c["reference"]).to(dev))[None])
        audio = torch.from_numpy(np.ascontiguousarray(c["audio"][: n_lat * k * cfg.samples_per_frame]))[None]
        # every chunk of the clip in one batch; the last one overlaps its predecessor
        starts = [min(s, n_lat - clip_frames) for s in range(0, n_lat, clip_frames)]
        chunks = []
        for b0 in range(0, len(starts), 16):
            st = starts[b0:b0 + 16]
            tok = clip_audio_tokens(model, audio.float().expand(len(st), -1), list(range(len(st))), st, clip_frames)
            noise = torch.randn((len(st), clip_frames, cfg.latent_channels, *cfg.latent_hw), generator=gen).to(dev)
            x0, _ = sample(model, geo, ref.expand(len(st), -1, -1, -1), tok, noise, n_steps=n_steps, scale=scale)
            for j, s0 in enumerate(st):
                s = (b0 + j) * clip_frames
                chunks.append(x0[j:j + 1, s - s0:])
        lat = torch.cat(chunks, dim=1)[:, :n_lat]
        fr = vae.decode(lat)[0]
        out.append(to_pixels(fr).cpu().numpy())
    return out


# ---- metrics -----------------------------------------------------------------------------------------
def clip_metrics(pred: np.ndarray, clip: dict[str, Any]) -> dict[str, float]:
    n = len(pred)
    gt = clip["frames"][:n]
    box = tuple(clip["mouth_box"])
    mo_p, mo_t = mouth_opening(pred, box), mouth_opening(gt, box)
    lag, c_best = best_offset(mo_p, mo_t)
    outside = box_mask(pred.shape[1:3], box)
    ref = np.broadcast_to(clip["reference"], pred.shape)
    return {"sync": sync_correlation(mo_p, mo_t), "offset": float(lag), "sync_best": c_best,
            "psnr_gt": psnr(pred, gt, outside), "ssim_gt": ssim(pred[::5], gt[:n:5], outside),
            "psnr_ref": psnr(pred, ref, outside)}


def longform_metrics(pred: np.ndarray, clip: dict[str, Any], segment_s: float = 10.0) -> dict[str, Any]:
    n = len(pred)
    gt = clip["frames"][:n]
    box = tuple(clip["mouth_box"])
    outside = box_mask(pred.shape[1:3], box)
    mo_p, mo_t = mouth_opening(pred, box), mouth_opening(gt, box)
    seg_sync = per_segment(sync_correlation, mo_p, mo_t, seconds=segment_s)
    seg_psnr = per_segment(lambda a, b: psnr(a, b, outside), pred, gt, seconds=segment_s)
    ref = np.broadcast_to(clip["reference"], pred.shape)
    seg_ref = per_segment(lambda a, b: psnr(a, b, outside), pred, ref, seconds=segment_s)
    return {"seg_sync": seg_sync.tolist(), "seg_psnr_gt": seg_psnr.tolist(), "seg_psnr_ref": seg_ref.tolist(),
            "drift": drift_slope(seg_psnr), "sync_drift": drift_slope(seg_sync),
            "psnr_first": float(seg_psnr[0]), "psnr_last": float(seg_psnr[-1])}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def summarize(short: list[dict[str, float]], long: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {k: _mean(short, k) for k in ("sync", "sync_best", "psnr_gt", "ssim_gt", "psnr_ref")}
    s["offset"] = float(np.median([r["offset"] for r in short]))
    s["abs_offset_max"] = float(np.max([abs(r["offset"]) for r in short]))
    if long:
        for k in ("drift", "sync_drift", "psnr_first", "psnr_last"):
            s[k] = _mean(long, k)
        s["seg_psnr_gt"] = np.mean([r["seg_psnr_gt"] for r in long], axis=0).tolist()
        s["seg_sync"] = np.mean([r["seg_sync"] for r in long], axis=0).tolist()
    return s


# ---- the command --------------------------------------------------------------------------------------
def default_models() -> dict[str, Path]:
    return {"teacher": PACKAGE_CHECKPOINTS / "eval" / "teacher.safetensors", "student": DEFAULT_CHECKPOINT,
            "ar": PACKAGE_CHECKPOINTS / "eval" / "ar.safetensors"}


def evaluate(models: dict[str, Path], ec: EvalConfig, device: str = "cpu", progress: bool = True,
             ) -> dict[str, Any]:
    t0 = time.perf_counter()
    short = [make_clip(ec.split, i, ec.test_seconds, ec.seed) for i in range(ec.test_clips)]
    # the long-form test set (LONG_FORM: test split, 60 s), clips 0..n-1
    long = [make_clip(LONG_FORM.split, i, ec.long_seconds, ec.seed) for i in range(ec.long_clips)]
    results: dict[str, Any] = {}
    for name, path in models.items():
        lm = load_checkpoint(path)
        if name == "teacher":
            K = int(lm.meta.get("budget", {}).get("teacher", {}).get("clip_frames", 8))
            gen_s = teacher_clips(lm, short, K, ec.teacher_steps, ec.cfg_scale, device, progress)
            gen_l = teacher_clips(lm, long, K, ec.teacher_steps, ec.cfg_scale, device, progress)
            sims: list[float] = []
        else:
            sims = []
            gen_s = stream_clips(lm, short, device, ec.batch, progress, f"{name} (test)", sims)
            gen_l = stream_clips(lm, long, device, ec.batch, progress, f"{name} (60 s)")
        rows_s = [clip_metrics(p, c) for p, c in zip(gen_s, short, strict=True)]
        rows_l = [longform_metrics(p, c) for p, c in zip(gen_l, long, strict=True)]
        results[name] = summarize(rows_s, rows_l)
        results[name]["checkpoint"] = str(path)
        if sims:
            results[name]["anchor_similarity"] = similarity_stats(sims)
    return {"config": ec.__dict__, "device": device, "seconds": round(time.perf_counter() - t0, 1),
            "results": results, "targets": targets(results)}


def similarity_stats(sims: list[float]) -> dict[str, float]:
    a = np.asarray(sims, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "p01": float(np.percentile(a, 1)),
            "p05": float(np.percentile(a, 5)), "n": int(a.size)}


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    out: dict[str, Any] = {}
    st, te, ar = r.get("student"), r.get("teacher"), r.get("ar")
    if st:
        out["student sync >= 0.85"] = {"value": st["sync"], "met": st["sync"] >= 0.85}
        out["|offset| <= 1 frame"] = {"value": st["offset"], "met": abs(st["offset"]) <= 1}
        if "psnr_first" in st:
            d = st["psnr_last"] - st["psnr_first"]
            out["last-segment PSNR within 1 dB of the first"] = {"value": d, "met": abs(d) <= 1.0}
    if st and te:
        ratio = st["sync"] / te["sync"] if te["sync"] > 0 else float("nan")
        out["student sync >= 90% of teacher's"] = {"value": ratio, "met": bool(ratio >= 0.9)}
    if st and ar and "drift" in st and "drift" in ar:
        a, b = abs(st["drift"]), abs(ar["drift"])
        out["|drift| <= 1/3 of AR's"] = {"value": a / b if b > 0 else float("inf"), "met": bool(a <= b / 3)}
    return out


def format_table(report: dict[str, Any]) -> str:
    cols = [("sync", "{:.3f}"), ("offset", "{:+.0f}"), ("sync_best", "{:.3f}"), ("psnr_gt", "{:.2f}"),
            ("ssim_gt", "{:.3f}"), ("psnr_ref", "{:.2f}"), ("drift", "{:+.3f}"), ("sync_drift", "{:+.3f}"),
            ("psnr_first", "{:.2f}"), ("psnr_last", "{:.2f}")]
    head = f"{'model':<10}" + "".join(f"{c:>11}" for c, _ in cols)
    lines = [head, "-" * len(head)]
    for name, r in report["results"].items():
        cells = "".join(f"{(fmt.format(r[c]) if c in r else '-'):>11}" for c, fmt in cols)
        lines.append(f"{name:<10}" + cells)
    lines.append("")
    for k, v in report["targets"].items():
        lines.append(f"{'met ' if v['met'] else 'MISS'}  {k}: {v['value']:.3f}")
    return "\n".join(lines)


def eval_main(models: dict[str, Path], ec: EvalConfig, out: Path | None, device: str = "cpu",
              progress: bool = True) -> dict[str, Any]:
    report = evaluate(models, ec, device, progress)
    print(format_table(report))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")
    return report
