"""Audio features from raw 16 kHz PCM, inside the package: log-mel plus a learned front end.

Each video frame gets one feature vector computed from its own samples and one frame of left
context, so features of a stream can be computed block by block with no look-ahead beyond the
block, and the result does not depend on how the stream was cut into blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

N_FFT = 512
WIN = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, sample_rate: int, n_fft: int = N_FFT,
                   fmin: float = 40.0, fmax: float | None = None) -> torch.Tensor:
    """Triangular HTK-style mel filters, [n_fft // 2 + 1, n_mels]."""
    fmax = fmax or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    m_lo, m_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (fmin, fmax))
    mels = torch.linspace(m_lo, m_hi, n_mels + 2, dtype=torch.float64)
    hz = _mel_to_hz(mels)
    lo, ce, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None, :] - lo) / (ce - lo)
    down = (hi - freqs[None, :]) / (hi - ce)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    return fb.T.to(torch.float32).contiguous()


class LogMel(nn.Module):
    def __init__(self, n_mels: int, sample_rate: int) -> None:
        super().__init__()
        self.window: torch.Tensor
        self.fb: torch.Tensor
        self.register_buffer("window", torch.hann_window(WIN), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_mels, sample_rate), persistent=False)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [n, S] in [-1, 1] -> log-mel [n, 1 + (S - N_FFT) // HOP, n_mels] (no padding)."""
        # Always in float32: the spectrum's dynamic range needs it, whatever the model's dtype.
        spec = torch.stft(pcm.float(), N_FFT, hop_length=HOP, win_length=WIN, window=self.window.float(),
                          center=False, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # [n, freq, frames]
        mel = torch.einsum("nft,fm->ntm", power, self.fb.float())
        return torch.log(mel + 1e-6)


class AudioFrontEnd(nn.Module):
    """PCM -> one feature vector per video frame (learned over log-mel)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        spf = cfg.samples_per_frame
        self.spf = spf
        self.context = spf  # one video frame of left context
        span = self.context + spf
        self.mel_frames = 1 + (span - N_FFT) // HOP
        self.logmel = LogMel(cfg.n_mels, cfg.audio_sample_rate)
        hidden = max(cfg.audio_feature_dim, 64)
        self.net = nn.Sequential(
            nn.Linear(self.mel_frames * cfg.n_mels, hidden), nn.GELU(approximate="tanh"),
            nn.Linear(hidden, cfg.audio_feature_dim),
        )
        self.norm = nn.LayerNorm(cfg.n_mels)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [n, context + T * spf] -> features [n, T, audio_feature_dim]."""
        n, s = pcm.shape
        t = (s - self.context) // self.spf
        if t <= 0 or self.context + t * self.spf != s:
            raise ValueError(f"pcm length {s} is not context {self.context} + a whole number of "
                             f"{self.spf}-sample frames")
        windows = pcm.unfold(1, self.context + self.spf, self.spf)  # [n, T, span]
        mel = self.logmel(windows.reshape(n * t, -1))  # [n*T, mel_frames, n_mels]
        mel = self.norm((mel / math.log(10.0)).to(self.norm.weight.dtype))
        return self.net(mel.reshape(n, t, -1))
