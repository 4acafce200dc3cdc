"""The teacher: bidirectional, multi-step flow matching over fixed-length clips, with CFG.

A clip is the reference latent (the style anchor, at latent-frame position 0, clean, mask 0,
zero audio) followed by ``clip_frames`` latent frames at positions 1..K that all carry the same
noise level. Flow matching: ``x_t = (1 - s) x0 + s eps``, the model predicts ``eps - x0``;
training levels are ``shift``-warped uniform. For classifier-free guidance the audio tokens are
zeroed for a share of the samples (the unconditional branch is "audio zeroed", like the
anchor's zero-padded audio). The sampler is Euler over ``shift``-warped levels and can keep the
states at chosen steps (the stage-1 ODE backfill stores them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig, shift_sigma
from ..model import AvatarDiT, Prefix
from ..rope import RopeTable
from .common import RunningLoss, StageCheckpoint, apply_step
from .data import LatentBank, segment_pcm


@dataclass
class TeacherConfig:
    steps: int = 3000
    batch: int = 8
    clip_frames: int = 8  # K latent frames per clip (32 video frames)
    lr: float = 1e-3
    shift: float = 5.0
    cfg_drop: float = 0.1
    seed: int = 0


class Geometry:
    """RoPE tables of the teacher layout (anchor at 0, clip frames at 1..K) on one device."""

    def __init__(self, cfg: ModelConfig, clip_frames: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.anchor = RopeTable(cfg, [0], device, dtype)
        self.clip = RopeTable(cfg, list(range(1, clip_frames + 1)), device, dtype)
        self.K = clip_frames


def anchor_prefix(model: AvatarDiT, ref: torch.Tensor, rope_anchor: RopeTable,
                  context: torch.Tensor | None) -> list[Prefix]:
    """The style anchor's per-layer keys/values (un-rotated) for a batch of reference latents."""
    n = ref.shape[0]
    zeros_audio = ref.new_zeros(n, 1, model.cfg.audio_token_dim)
    sigma = ref.new_zeros(n, 1)
    _, kvs = model(ref[:, None], sigma, ref, zeros_audio, rope_anchor, mask_value=0.0, context=context)
    return [Prefix(k, v) for k, v in kvs]


def clip_flow(model: AvatarDiT, geo: Geometry, x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor,
              audio: torch.Tensor, prefix: list[Prefix], context: torch.Tensor | None) -> torch.Tensor:
    """Flow prediction for the clip frames x [n, K, C, h, w] at levels sigma [n, K]."""
    flow, _ = model(x, sigma, ref, audio, geo.clip, prefix=prefix, prefix_rope=geo.anchor, context=context)
    return flow


def clip_audio_tokens(model: AvatarDiT, audio: torch.Tensor, clip_idx: Sequence[int], starts: Sequence[int],
                      n_latent: int) -> torch.Tensor:
    """Audio tokens [n, n_latent, a] of clips ``clip_idx`` from latent frame ``starts``."""
    cfg = model.cfg
    k, spf = cfg.frames_per_latent, cfg.samples_per_frame
    assert model.audio_frontend is not None, "the trainer trains log-mel models"
    ctx = model.audio_frontend.context
    pcm = torch.cat([segment_pcm(audio[i:i + 1], s * k, n_latent * k, spf, ctx) for i, s in zip(clip_idx, starts,
                                                                                                strict=True)])
    dev = next(model.parameters()).device
    return model.audio_tokens(pcm.to(dev))


def sample_batch(bank: LatentBank, rng: np.random.Generator, n: int, K: int) -> tuple[list[int], list[int]]:
    """n random (clip, start latent frame) pairs with K latent frames inside the clip."""
    idx = rng.integers(len(bank), size=n).tolist()
    starts = rng.integers(0, bank.frames - K + 1, size=n).tolist()
    return idx, starts


def teacher_loss(model: AvatarDiT, bank: LatentBank, rng: np.random.Generator, tc: TeacherConfig, geo: Geometry,
                 device: torch.device) -> torch.Tensor:
    """Flow-matching loss of one batch of clips (CFG dropout zeroes the audio of some samples)."""
    K = tc.clip_frames
    idx, starts = sample_batch(bank, rng, tc.batch, K)
    x0 = torch.stack([bank.lat[i, s:s + K] for i, s in zip(idx, starts, strict=True)]).to(device)
    ref = bank.ref[idx].to(device)
    n = x0.shape[0]
    u = torch.rand(n, device=device)
    s_ = (tc.shift * u / (1 + (tc.shift - 1) * u))[:, None, None, None, None]
    sigma = s_.flatten()[:, None].expand(n, K)
    eps = torch.randn_like(x0)
    xt = (1 - s_) * x0 + s_ * eps
    context = model.context()
    audio = clip_audio_tokens(model, bank.audio, idx, starts, K)
    keep = (torch.rand(n, 1, 1, device=device) >= tc.cfg_drop).to(audio.dtype)
    prefix = anchor_prefix(model, ref, geo.anchor, context)
    flow = clip_flow(model, geo, xt, sigma, ref, audio * keep, prefix, context)
    return (flow - (eps - x0)).square().mean()


def train_teacher(model: AvatarDiT, bank: LatentBank, ck_dir, tc: TeacherConfig, device: torch.device,
                  progress: bool = True) -> dict[str, float]:
    torch.manual_seed(tc.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ck = StageCheckpoint(ck_dir, "teacher", {"dit": model}, {"opt": opt})
    if ck.done():
        ck.load_final()
        return dict(ck.extra)
    start = ck.start()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.steps, pct_start=0.05,
                                                last_epoch=start - 1 if start else -1)
    rng = np.random.default_rng([tc.seed, start])
    geo = Geometry(model.cfg, tc.clip_frames, device)
    bar = tqdm(range(start, tc.steps), desc="teacher", disable=not progress, initial=start, total=tc.steps)
    running = RunningLoss()
    for step in bar:
        loss = teacher_loss(model, bank, rng, tc, geo, device)
        apply_step(opt, model.parameters(), loss)
        sched.step()
        bar.set_postfix(loss=f"{running.update(loss):.4f}")
        ck.maybe_save(step + 1)
    model.eval()
    ck.extra = {"final_loss": float(running)}
    ck.finish(meta=ck.extra)
    return dict(ck.extra)


def sampler_levels(n_steps: int, shift: float) -> list[float]:
    """Noise levels of the Euler sampler, 1.0 down to 0.0 (n_steps + 1 values)."""
    return [shift_sigma(1.0 - i / n_steps, shift) if i < n_steps else 0.0 for i in range(n_steps + 1)]


@torch.no_grad()
def cfg_x0(model: AvatarDiT, geo: Geometry, x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor,
           audio: torch.Tensor, prefix: list[Prefix], context: torch.Tensor | None, scale: float,
           ) -> torch.Tensor:
    """x0 prediction with classifier-free guidance (the unconditional branch has zero audio)."""
    n = x.shape[0]
    both = clip_flow(model, geo, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([ref, ref]),
                     torch.cat([audio, torch.zeros_like(audio)]),
                     [Prefix(torch.cat([p.k, p.k]), torch.cat([p.v, p.v])) for p in prefix], context)
    fc, fu = both[:n], both[n:]
    flow = fu + scale * (fc - fu)
    return x - sigma[:, :, None, None, None] * flow


@torch.no_grad()
def sample(model: AvatarDiT, geo: Geometry, ref: torch.Tensor, audio: torch.Tensor, noise: torch.Tensor, *,
           n_steps: int = 20, shift: float = 5.0, scale: float = 4.5, keep: Sequence[int] = (),
           ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Euler sampling of a clip from ``noise`` [n, K, C, h, w]; returns (x0, {step: state})."""
    model.eval()
    context = model.context()
    prefix = anchor_prefix(model, ref, geo.anchor, context)
    levels = sampler_levels(n_steps, shift)
    x = noise
    states: dict[int, torch.Tensor] = {}
    n, K = noise.shape[:2]
    for i in range(n_steps):
        if i in keep:
            states[i] = x.clone()
        s, s_next = levels[i], levels[i + 1]
        sigma = x.new_full((n, K), s)
        x0 = cfg_x0(model, geo, x, sigma, ref, audio, prefix, context, scale)
        if s_next == 0.0:
            x = x0
        else:
            eps = (x - (1 - s) * x0) / s
            x = (1 - s_next) * x0 + s_next * eps
    return x, states
