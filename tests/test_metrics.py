import numpy as np

from avatarforcing.metrics import (
    best_offset,
    box_mask,
    drift_slope,
    per_segment,
    psnr,
    ssim,
    sync_correlation,
)


def _signal(n: int = 300, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=n)
    return np.convolve(x, np.ones(3) / 3, mode="same")


def test_perfect_sync():
    s = _signal()
    assert abs(sync_correlation(s, s) - 1.0) < 1e-9
    assert abs(sync_correlation(2 * s + 1, s) - 1.0) < 1e-9
    assert best_offset(s, s) == (0, best_offset(s, s)[1]) and best_offset(s, s)[1] > 0.999
    assert sync_correlation(np.ones(10), s[:10]) == 0.0


def test_best_offset_sign():
    truth = _signal(400)
    for k in (1, 3, 7):
        late = np.concatenate([np.zeros(k), truth[:-k]])  # video repeats truth k frames later
        early = np.concatenate([truth[k:], np.zeros(k)])
        lag, c = best_offset(late, truth, max_lag=10)
        assert lag == k and c > 0.95
        lag, c = best_offset(early, truth, max_lag=10)
        assert lag == -k and c > 0.95


def test_drift_slope():
    assert abs(drift_slope([5.0, 5.0, 5.0, 5.0])) < 1e-12
    assert abs(drift_slope([1.0, 2.0, 3.0, 4.0]) - 1.0) < 1e-12
    assert drift_slope([0.1, 0.15, 0.3, 0.35, 0.5]) > 0


def test_per_segment():
    frames = np.arange(1500, dtype=np.float64)
    means = per_segment(np.mean, frames, fps=25, seconds=10)
    assert means.shape == (6,) and np.allclose(means, np.arange(6) * 250 + 124.5)
    assert drift_slope(means) > 0
    a = np.zeros((500, 4, 4, 3), np.uint8)
    vals = per_segment(lambda x, y: float(np.abs(x.astype(int) - y).mean()), a, a + 1)
    assert np.allclose(vals, [1.0, 1.0])


def test_psnr_ssim():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr(img, img) == float("inf")
    other = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    p = psnr(img, other)
    assert np.isfinite(p) and 15 < p < 40
    assert abs(ssim(img, img) - 1.0) < 1e-9
    assert ssim(img, other) < 0.99
    # Masked: differences only inside the box are invisible outside it.
    box = (20, 40, 20, 40)
    diff = img.copy()
    diff[20:40, 20:40] = 0
    outside = box_mask((64, 64), box)
    assert psnr(img, diff, mask=outside) == float("inf")
    assert np.isfinite(psnr(img, diff))
    far = np.zeros((64, 64), bool)
    far[:10] = True
    assert abs(ssim(img, diff, mask=far) - 1.0) < 1e-9
    assert ssim(img, diff) < 1.0
    video = np.stack([img, other])
    assert abs(ssim(video, video) - 1.0) < 1e-9
