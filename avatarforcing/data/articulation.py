"""Ground-truth articulation per video frame, derived deterministically from the audio.

Video runs at 25 fps and audio at 16 kHz, so video frame ``k`` covers the samples
``[640 k, 640 (k + 1))``; a clip of ``S`` samples has ``T = S // 640`` frames (a trailing partial
frame is dropped). Three float32 arrays of length ``T``, each in [0, 1]:

``jaw`` (jaw / mouth opening)
    1. ``rms[k]`` = RMS of frame k's 640 samples, in dB: ``e[k] = 20 log10(rms[k] + 1e-6)``.
    2. Per-clip normalisation: ``peak`` = 95th percentile of ``e``; the silence floor is
       ``floor = max(peak - 30 dB, -50 dBFS)``. ``j = clip((e - floor) / (peak - floor), 0, 1)``
       (frames at or below the floor, i.e. silence, are exactly 0; a silent clip is all 0).
    3. Smoothed with the symmetric kernel ``[1, 2, 3, 2, 1] / 9`` (zero phase, so no lag is
       introduced between audio and ground truth), then clipped to [0, 1].

``spread`` and ``round`` (lip spread vs. rounding)
    1. Spectral shape per frame: power spectrum of the Hann-windowed frame (1024-point FFT) and
       ``ratio[k] = log(E(1-4 kHz) + eps) - log(E(100-1000 Hz) + eps)``: front / spread vowels
       (/i/, /e/) and fricatives carry energy high, rounded back vowels (/u/, /o/) low.
    2. Normalised per clip over the voiced frames (``jaw > 0.15`` before smoothing):
       ``u = clip((ratio - p10) / (p90 - p10), 0, 1)`` with p10 / p90 the 10th / 90th
       percentiles of ``ratio`` over voiced frames (0.5 where there are too few voiced frames).
    3. ``spread = clip(2 u - 1, 0, 1) * w`` and ``round = clip(1 - 2 u, 0, 1) * w``, with
       voicing weight ``w = clip(j / 0.3, 0, 1)`` (lips relax to neutral in silence), then
       smoothed with the same kernel. At most one of the two is large in any frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
KERNEL = np.array([1, 2, 3, 2, 1], np.float64) / 9.0
N_FFT = 1024


@dataclass(frozen=True)
class Articulation:
    jaw: np.ndarray  # float32 [T], 0 closed .. 1 fully open
    spread: np.ndarray  # float32 [T], 0 neutral .. 1 fully spread
    round: np.ndarray  # float32 [T], 0 neutral .. 1 fully rounded

    def __len__(self) -> int:
        return int(self.jaw.shape[0])

    def to_dict(self) -> dict[str, np.ndarray]:
        return {"jaw": self.jaw, "spread": self.spread, "round": self.round}

    @classmethod
    def neutral(cls, n: int) -> Articulation:
        z = np.zeros(n, np.float32)
        return cls(z, z.copy(), z.copy())


def _smooth(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    pad = len(KERNEL) // 2
    xp = np.pad(x.astype(np.float64), pad, mode="edge")
    return np.convolve(xp, KERNEL, mode="valid")


def frame_audio(audio: np.ndarray, samples_per_frame: int = SAMPLES_PER_FRAME) -> np.ndarray:
    """[S] -> [T, samples_per_frame] (trailing partial frame dropped)."""
    a = np.asarray(audio, dtype=np.float64).reshape(-1)
    t = a.size // samples_per_frame
    return a[: t * samples_per_frame].reshape(t, samples_per_frame)


def jaw_opening(audio: np.ndarray, samples_per_frame: int = SAMPLES_PER_FRAME) -> np.ndarray:
    """Unsmoothed normalised energy envelope (step 1-2 of ``jaw``), float64 [T]."""
    fr = frame_audio(audio, samples_per_frame)
    if fr.shape[0] == 0:
        return np.zeros(0)
    e = 20.0 * np.log10(np.sqrt(np.mean(fr * fr, axis=1)) + 1e-6)
    peak = float(np.percentile(e, 95))
    floor = max(peak - 30.0, -50.0)
    if peak <= floor:
        return np.zeros(fr.shape[0])
    return np.clip((e - floor) / (peak - floor), 0.0, 1.0)


def spectral_ratio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE,
                   samples_per_frame: int = SAMPLES_PER_FRAME) -> np.ndarray:
    """log high-band (1-4 kHz) minus log low-band (100-1000 Hz) energy per frame, float64 [T]."""
    fr = frame_audio(audio, samples_per_frame)
    spec = np.abs(np.fft.rfft(fr * np.hanning(samples_per_frame), n=N_FFT, axis=1)) ** 2
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / sample_rate)
    lo = spec[:, (freqs >= 100) & (freqs < 1000)].sum(axis=1)
    hi = spec[:, (freqs >= 1000) & (freqs < 4000)].sum(axis=1)
    eps = 1e-9
    return np.log(hi + eps) - np.log(lo + eps)


def articulation_from_audio(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> Articulation:
    """Jaw opening, lip spread and lip rounding per video frame (see the module docstring)."""
    if sample_rate % fps:
        raise ValueError("sample_rate must be a multiple of fps")
    spf = sample_rate // fps
    j = jaw_opening(audio, spf)
    if j.size == 0:
        return Articulation.neutral(0)
    ratio = spectral_ratio(audio, sample_rate, spf)
    voiced = j > 0.15
    if int(voiced.sum()) >= 5:
        p10, p90 = np.percentile(ratio[voiced], [10, 90])
        u = np.clip((ratio - p10) / max(p90 - p10, 1e-6), 0.0, 1.0)
    else:
        u = np.full_like(j, 0.5)
    w = np.clip(j / 0.3, 0.0, 1.0)
    spread = np.clip(2.0 * u - 1.0, 0.0, 1.0) * w
    rnd = np.clip(1.0 - 2.0 * u, 0.0, 1.0) * w

    def fin(x: np.ndarray) -> np.ndarray:
        return np.clip(_smooth(x), 0.0, 1.0).astype(np.float32)

    return Articulation(jaw=fin(j), spread=fin(spread), round=fin(rnd))
