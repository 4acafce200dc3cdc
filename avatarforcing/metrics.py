"""Lip-sync, image-quality and drift metrics (numpy only).

Conventions: frames are uint8 or float arrays ``[T, H, W, 3]`` (or one ``[H, W, 3]`` image) on a
0..255 scale; a box is ``(y0, y1, x0, x1)``, half-open, in pixels.

Sync: ``best_offset`` returns the lag ``k`` (in frames) maximising the Pearson correlation of
``pred[t]`` with ``truth[t - k]``. Positive ``k`` means the video is late (the predicted mouth
repeats the ground truth ``k`` frames later); negative means the video is early.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]


def _gray(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.shape[-1] == 3:
        return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return x


def mouth_opening(frames: np.ndarray, box: Box, threshold: float = 0.6, softness: float = 0.15,
                  ref_percentile: float = 95.0) -> np.ndarray:
    """Mouth opening per frame, in pixels (rows of dark mouth interior inside ``box``).

    Per frame, the luminance of the box is compared with a reference skin level (the
    ``ref_percentile`` percentile of the box luminance, so lighting and skin tone cancel out):
    ``darkness = 1 - lum / ref``. A row counts as open mouth by ``clip((max darkness in the row -
    threshold) / softness, 0, 1)``, and the opening is the sum over rows (a soft count). Lips
    and shading are lighter than ``threshold``; the mouth interior (and a dark gap in generated
    frames) is darker. Returns float64 [T] (a scalar array for a single image).
    """
    f = np.asarray(frames)
    single = f.ndim == 3
    if single:
        f = f[None]
    y0, y1, x0, x1 = box
    g = _gray(f[:, y0:y1, x0:x1])
    ref = np.percentile(g.reshape(g.shape[0], -1), ref_percentile, axis=1)[:, None, None]
    dark = 1.0 - g / np.maximum(ref, 1e-6)
    rows = np.clip((dark.max(axis=2) - threshold) / softness, 0.0, 1.0)
    out = rows.sum(axis=1)
    return out[0] if single else out


def sync_correlation(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation of two equal-length sequences; 0.0 when either is constant."""
    p = np.asarray(pred, np.float64).reshape(-1)
    t = np.asarray(truth, np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"length mismatch {p.shape} vs {t.shape}")
    p, t = p - p.mean(), t - t.mean()
    den = float(np.sqrt((p * p).sum() * (t * t).sum()))
    return float((p * t).sum() / den) if den > 1e-12 else 0.0


def best_offset(pred: np.ndarray, truth: np.ndarray, max_lag: int = 10) -> tuple[int, float]:
    """(lag, correlation) at the lag in [-max_lag, max_lag] of highest correlation.

    ``lag = k`` correlates ``pred[t]`` with ``truth[t - k]``; positive = video late. Ties go to
    the smallest |lag|.
    """
    p = np.asarray(pred, np.float64).reshape(-1)
    t = np.asarray(truth, np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"length mismatch {p.shape} vs {t.shape}")
    n = p.size
    best = (0, -np.inf)
    for k in sorted(range(-max_lag, max_lag + 1), key=abs):
        if n - abs(k) < 2:
            continue
        c = sync_correlation(p[k:], t[: n - k]) if k >= 0 else sync_correlation(p[: n + k], t[-k:])
        if c > best[1] + 1e-12:
            best = (k, c)
    return best[0], float(best[1])


def box_mask(shape: tuple[int, int], box: Box, inside: bool = False) -> np.ndarray:
    """Boolean [H, W] mask: True outside ``box`` (or inside with ``inside=True``)."""
    m = np.zeros(shape, bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m if inside else ~m


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """PSNR in dB over all frames/pixels (or only where the [H, W] ``mask`` is True); inf if equal."""
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    err = (x - y) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.ndim == 2 and x.shape[-1] == 3 and x.ndim >= 3 and x.shape[-3:-1] == m.shape:
            m = m[..., None]
        sel = np.broadcast_to(m, err.shape)
        mse = float(err[sel].mean()) if sel.any() else 0.0
    else:
        mse = float(err.mean())
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


def _gauss(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r * r) / (2 * sigma * sigma))
    return g / g.sum()


def _filt(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering over the last two axes."""
    v = np.lib.stride_tricks.sliding_window_view(x, w.size, axis=-1) @ w
    return np.lib.stride_tricks.sliding_window_view(v, w.size, axis=-2) @ w


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, data_range: float = 255.0) -> float:
    """Single-scale SSIM (Wang et al. 2004) on grayscale, 11x11 Gaussian window (sigma 1.5).

    Averaged over the valid window positions (and frames); with ``mask`` ([H, W] bool, e.g.
    ``box_mask(..., mouth_box)`` = outside the mouth), only over windows centred where it is True.
    """
    x, y = _gray(a), _gray(b)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {y.shape}")
    w = _gauss()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filt(x, w), _filt(y, w)
    sxx = _filt(x * x, w) - mx * mx
    syy = _filt(y * y, w) - my * my
    sxy = _filt(x * y, w) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    if mask is None:
        return float(smap.mean())
    r = w.size // 2
    m = np.asarray(mask, bool)[r:r + smap.shape[-2], r:r + smap.shape[-1]]
    if not m.any():
        raise ValueError("mask selects no SSIM window")
    return float(smap[..., m].mean())


def drift_slope(values_per_segment: np.ndarray | list[float]) -> float:
    """Least-squares slope of the values against the segment index 0, 1, 2, ... (per segment)."""
    v = np.asarray(values_per_segment, np.float64).reshape(-1)
    if v.size < 2:
        return 0.0
    i = np.arange(v.size, dtype=np.float64)
    i -= i.mean()
    return float((i * (v - v.mean())).sum() / (i * i).sum())


def per_segment(metric_fn: Callable[..., Any], *arrays: np.ndarray, fps: int = 25, seconds: float = 10.0,
                **kwargs: Any) -> np.ndarray:
    """``metric_fn`` on consecutive ``seconds``-long segments of the frame-aligned ``arrays``.

    Every array is split along axis 0 into segments of ``fps * seconds`` frames (a trailing
    partial segment of at least half a segment is its own segment, a shorter one is merged into
    the previous segment);
    returns float64 [n_segments] of ``metric_fn(*segments, **kwargs)``.
    """
    if not arrays:
        raise ValueError("per_segment needs at least one array")
    n = int(np.asarray(arrays[0]).shape[0])
    if any(int(np.asarray(x).shape[0]) != n for x in arrays):
        raise ValueError("arrays must have the same number of frames")
    seg = max(1, int(round(fps * seconds)))
    starts = list(range(0, n, seg))
    if len(starts) > 1 and n - starts[-1] < seg / 2:
        starts.pop()
    out = []
    for i, s in enumerate(starts):
        e = n if i == len(starts) - 1 else s + seg
        out.append(float(metric_fn(*(np.asarray(x)[s:e] for x in arrays), **kwargs)))
    return np.asarray(out, np.float64)
