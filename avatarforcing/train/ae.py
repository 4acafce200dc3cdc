"""Stage 0: the tiny autoencoder (4 frames -> 1 latent frame at 1/8 size), mouth-weighted.

Loss: squared error with the mouth box weighted ``mouth_weight`` times (the lips are a small
part of the frame but all of the lip sync), with Gaussian noise added to the latents during
training so the decoder tolerates the small errors a one-step student makes. After training,
the per-channel latent mean and standard deviation are stored in the autoencoder, which
normalises its latents with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..vae import TinyAutoencoder
from .common import RunningLoss, StageCheckpoint, apply_step
from .data import ClipBank, unit_on


@dataclass
class AEConfig:
    steps: int = 1500
    batch: int = 12
    lr: float = 2e-3
    mouth_weight: float = 6.0
    latent_noise: float = 0.1  # relative to the latent's std
    ref_fraction: float = 0.1  # share of samples that are a still reference image
    seed: int = 0


def _batch(bank: ClipBank, rng: np.random.Generator, n: int, t: int, ref_fraction: float,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = rng.integers(len(bank), size=n)
    T = bank.frames.shape[1]
    xs, ws = [], []
    H, W = bank.frames.shape[2:4]
    for i in idx:
        if rng.random() < ref_fraction:
            x = np.repeat(bank.refs[i][None], t, axis=0)
        else:
            s = int(rng.integers(0, T - t + 1))
            x = bank.frames[i, s:s + t]
        xs.append(x)
        w = np.ones((H, W), np.float32)
        y0, y1, x0, x1 = bank.boxes[i]
        w[y0:y1, x0:x1] = 0.0
        ws.append(w)
    frames = unit_on(np.stack(xs), device)  # [n, t, 3, H, W]
    weight = torch.from_numpy(np.stack(ws)).to(device)[:, None, None]  # [n,1,1,H,W], 0 in the mouth
    return frames, weight


def ae_loss(vae: TinyAutoencoder, bank: ClipBank, rng: np.random.Generator, tc: AEConfig,
            device: torch.device) -> torch.Tensor:
    """Mouth-weighted reconstruction loss of one batch (randomness from ``rng`` and torch's RNG)."""
    frames, outside = _batch(bank, rng, tc.batch, vae.t, tc.ref_fraction, device)
    z = vae.encode_raw(frames)
    z = z + tc.latent_noise * z.detach().std() * torch.randn_like(z)
    rec = vae.decode_raw(z)
    w = outside + (1.0 - outside) * tc.mouth_weight
    return (w * (rec - frames).square()).mean() / w.mean()


def latent_stats(vae: TinyAutoencoder, bank: ClipBank, device: torch.device, n: int = 64,
                 seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    t = vae.t
    with torch.no_grad():
        frames, _ = _batch(bank, rng, n, t, 0.0, device)
        z = vae.encode_raw(frames)  # [n, 1, C, h, w]
    z = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], -1)  # [n, C, hw]
    return z.mean(dim=(0, 2)).cpu(), z.std(dim=(0, 2)).cpu()


def train_autoencoder(cfg: ModelConfig, bank: ClipBank, ck_dir, tc: AEConfig, device: torch.device,
                      progress: bool = True) -> tuple[TinyAutoencoder, dict[str, float]]:
    torch.manual_seed(tc.seed)
    vae = TinyAutoencoder(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=tc.lr, weight_decay=0.0)
    ck = StageCheckpoint(ck_dir, "autoencoder", {"vae": vae}, {"opt": opt})
    if ck.done():
        ck.load_final()
        return vae.to(device), dict(ck.extra)
    start = ck.start()
    rng = np.random.default_rng([tc.seed, start])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.steps, pct_start=0.05,
                                                last_epoch=start - 1 if start else -1)
    bar = tqdm(range(start, tc.steps), desc="autoencoder", disable=not progress, initial=start, total=tc.steps)
    running = RunningLoss()
    for step in bar:
        loss = ae_loss(vae, bank, rng, tc, device)
        apply_step(opt, vae.parameters(), loss)
        sched.step()
        bar.set_postfix(loss=f"{running.update(loss):.4f}")
        ck.maybe_save(step + 1)
    vae.eval()
    mean, std = latent_stats(vae, bank, device)
    vae.set_latent_stats(mean.to(device), std.to(device))
    ck.extra = {"final_loss": float(running)}
    ck.finish(meta=ck.extra)
    return vae, dict(ck.extra)
