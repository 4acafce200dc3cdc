"""Two-stage streaming distillation of the teacher into a one-step sliding-window student.

``StreamRollout`` is the engine's step (``avatarforcing.engine.StreamEngine.step``) written as a
differentiable function over a batch of streams that start together: the same window layout,
RoPE positions, re-noising, temporal-anchor pass and history, so what is trained is exactly what
the server runs (``tests/test_training.py`` checks the two agree to float precision).

Stage 1 (ODE backfill, ``train_stage1``): teacher trajectories of K-frame clips are sampled
once and stored at the sampler steps whose levels are the stream's window levels. A training
window takes each of its blocks from the trajectory at that slot's level (the newest slot is
the trajectory's initial noise); the clean history before the window is the teacher's final
output; the student regresses the teacher's final clean latents (MSE). Windows that start
before the clip's first frame are the stream's warm-up (their older slots are empty).

Stage 2 (DMD, ``train_dmd``): the student is rolled out in its own streaming mode from the
start of a stream for K emitted frames; the emitted clean latents x get the gradient
``(x0_fake - x0_real) / mean|x - x0_real|`` with x0_real the teacher's CFG prediction and x0_fake
a critic's, both at a shift-warped level in [0.02, 0.98]; loss ``0.5 * MSE(x, sg(x - grad))``.
The critic (initialised from the teacher) is trained alongside with flow matching on the
student's samples, ``critic_steps`` updates per generator update. Adam betas (0, 0.999); an
EMA of the generator is what is exported.

The autoregressive-forcing baseline (``StreamConfig.ar_baseline()``) goes through the same two
functions: a window of one block at pure noise and clean history only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from ..config import StreamConfig
from ..model import AvatarDiT, Prefix
from ..rope import RopeTable
from .common import EMA, RunningLoss, StageCheckpoint, apply_step
from .data import LatentBank
from .teacher import (
    Geometry,
    anchor_prefix,
    cfg_x0,
    clip_audio_tokens,
    clip_flow,
    sample,
    sample_batch,
    sampler_levels,
)


class StreamRollout:
    """A batch of n streams advanced together, one window step at a time (differentiable)."""

    def __init__(self, model: AvatarDiT, stream: StreamConfig, ref: torch.Tensor, anchor: list[Prefix],
                 context: torch.Tensor | None) -> None:
        c = model.cfg
        self.model, self.stream, self.ref, self.anchor, self.context = model, stream, ref, anchor, context
        B, L, H = stream.block_frames, stream.window_blocks, stream.history_frames
        self.B, self.L, self.H, self.P = B, L, H, c.tokens_per_frame
        n = ref.shape[0]
        dev, dt = ref.device, ref.dtype
        lh, lw = c.latent_hw
        self.n = n
        self.win_lat = torch.zeros(n, L * B, c.latent_channels, lh, lw, device=dev, dtype=dt)
        self.win_audio = torch.zeros(n, L * B, c.audio_token_dim, device=dev, dtype=dt)
        self.win_valid = torch.zeros(n, L, device=dev, dtype=torch.bool)
        self.hist_k: list[torch.Tensor] = [torch.zeros(n, H * self.P, c.heads, c.head_dim, device=dev, dtype=dt)
                                           for _ in range(c.layers)]
        self.hist_v: list[torch.Tensor] = [t.clone() for t in self.hist_k]
        self.hist_valid = torch.zeros(n, H, device=dev, dtype=torch.bool)
        self.rope_prefix = RopeTable(c, list(range(0, H + 1)), dev, dt)
        self.rope_window = RopeTable(c, list(range(H + 1, H + 1 + L * B)), dev, dt)
        self.rope_clean = RopeTable(c, list(range(H + 1, H + 1 + B)), dev, dt)
        lv = torch.tensor(stream.levels, dtype=torch.float32, device=dev)
        self.sigma_window = lv.repeat_interleave(B)[None].expand(n, -1)
        self.sigma_renoise = lv[:-1].repeat_interleave(B)[None, :, None, None, None].to(dt)
        self.steps = 0

    def _prefix(self) -> list[Prefix]:
        return [Prefix(torch.cat([a.k, hk], 1), torch.cat([a.v, hv], 1))
                for a, hk, hv in zip(self.anchor, self.hist_k, self.hist_v, strict=True)]

    def _pmask(self) -> torch.Tensor:
        ones = torch.ones(self.n, self.P, dtype=torch.bool, device=self.ref.device)
        return torch.cat([ones, self.hist_valid.repeat_interleave(self.P, dim=1)], dim=1)

    def denoise(self, lat: torch.Tensor, aud: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x0 prediction of a window ``lat`` at the stream's levels (slots where ``valid``)."""
        pmask = self._pmask()
        key_mask = torch.cat([pmask, valid.repeat_interleave(self.B * self.P, dim=1)], dim=1)
        flow, _ = self.model(lat, self.sigma_window, self.ref, aud, self.rope_window, prefix=self._prefix(),
                             prefix_rope=self.rope_prefix, key_mask=key_mask, context=self.context)
        return lat - self.sigma_window[:, :, None, None, None].to(lat.dtype) * flow

    def push_history(self, clean: torch.Tensor, audio: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The temporal anchor: the clean block at t = 0; its keys/values become history.

        ``rows`` [n] bool: only these streams take the block (the others keep their history).
        """
        if self.H == 0:
            return
        pmask = self._pmask()
        key_mask = torch.cat([pmask, torch.ones(self.n, self.B * self.P, dtype=torch.bool,
                                                device=self.ref.device)], 1)
        sigma = self.ref.new_zeros(self.n, self.B, dtype=torch.float32)
        _, kvs = self.model(clean, sigma, self.ref, audio, self.rope_clean, prefix=self._prefix(),
                            prefix_rope=self.rope_prefix, key_mask=key_mask, context=self.context)
        keep = self.H * self.P

        def take(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            if rows is None:
                return new
            return torch.where(rows.view(-1, *([1] * (new.dim() - 1))), new, old)

        self.hist_k = [take(hk, torch.cat([hk, k], 1)[:, -keep:]) for hk, (k, _) in zip(self.hist_k, kvs, strict=True)]
        self.hist_v = [take(hv, torch.cat([hv, v], 1)[:, -keep:]) for hv, (_, v) in zip(self.hist_v, kvs, strict=True)]
        ones = torch.ones(self.n, self.B, dtype=torch.bool, device=self.ref.device)
        self.hist_valid = take(self.hist_valid, torch.cat([self.hist_valid, ones], dim=1)[:, -self.H:])

    def step(self, tok: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
        """tok [n, B, a] the newest block's audio tokens; noise [n, L*B, C, h, w].

        Returns the emitted clean block [n, B, C, h, w], or None during the warm-up.
        """
        B, L = self.B, self.L
        # the newest slot (emptied by the previous slide) takes the fresh block, as pure noise
        aud = torch.cat([self.win_audio[:, :-B], tok], dim=1)
        valid = torch.cat([self.win_valid[:, :-1], torch.ones_like(self.win_valid[:, :1])], dim=1)
        lat = torch.cat([self.win_lat[:, :-B], noise[:, -B:]], dim=1)
        x0 = self.denoise(lat, aud, valid)
        emitted = None
        if bool(valid[0, 0]):
            emitted = x0[:, :B]
            self.push_history(emitted, aud[:, :B])
        kept = (1 - self.sigma_renoise) * x0[:, B:] + self.sigma_renoise * noise[:, : (L - 1) * B]
        self.win_lat = torch.cat([kept, torch.zeros_like(x0[:, :B])], dim=1)
        self.win_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        self.win_audio = torch.cat([aud[:, B:], torch.zeros_like(aud[:, :B])], dim=1)
        self.steps += 1
        return emitted


# ---- stage 1: ODE backfill ----------------------------------------------------------------------
@dataclass
class ODEConfig:
    trajectories: int = 256
    batch: int = 16
    n_steps: int = 20
    cfg_scale: float = 4.5
    shift: float = 5.0
    seed: int = 1


def level_steps(stream: StreamConfig, n_steps: int) -> list[int]:
    """Sampler step index of each window level (oldest slot first)."""
    levels = sampler_levels(n_steps, stream.shift)
    out = []
    for lv in stream.levels:
        i = int(np.argmin([abs(x - lv) for x in levels]))
        if abs(levels[i] - lv) > 1e-6:
            raise ValueError(f"window level {lv:.4f} is not a step of the {n_steps}-step sampler; choose "
                             f"level_steps that are multiples of {stream.num_train_steps // n_steps}")
        out.append(i)
    return out


@torch.no_grad()
def make_trajectories(teacher: AvatarDiT, bank: LatentBank, K: int, oc: ODEConfig, keep: list[int],
                      device: torch.device, progress: bool = True) -> dict[str, torch.Tensor]:
    """Teacher samples of K-frame clips at random places of the train clips, states at ``keep``."""
    rng = np.random.default_rng(oc.seed)
    geo = Geometry(teacher.cfg, K, device)
    gen = torch.Generator(device="cpu").manual_seed(oc.seed)
    states, finals, clips, starts = [], [], [], []
    for b0 in tqdm(range(0, oc.trajectories, oc.batch), desc="teacher trajectories", disable=not progress):
        n = min(oc.batch, oc.trajectories - b0)
        idx, st = sample_batch(bank, rng, n, K)
        ref = bank.ref[idx].to(device)
        audio = clip_audio_tokens(teacher, bank.audio, idx, st, K)
        noise = torch.randn((n, K, *bank.lat.shape[2:]), generator=gen).to(device)
        x0, kept = sample(teacher, geo, ref, audio, noise, n_steps=oc.n_steps, shift=oc.shift,
                          scale=oc.cfg_scale, keep=keep)
        states.append(torch.stack([kept[i].cpu() for i in keep], dim=1))  # [n, len(keep), K, ...]
        finals.append(x0.cpu())
        clips += idx
        starts += st
    return {"states": torch.cat(states), "x0": torch.cat(finals), "clip": torch.tensor(clips),
            "start": torch.tensor(starts), "steps": torch.tensor(list(keep)), "n_steps": torch.tensor(oc.n_steps)}


@dataclass
class Stage1Config:
    steps: int = 1500
    batch: int = 16
    lr: float = 3e-4
    seed: int = 2


def _stage1_batch(model: AvatarDiT, stream: StreamConfig, traj: dict[str, torch.Tensor], bank: LatentBank,
                  rng: np.random.Generator, n: int, device: torch.device,
                  ) -> tuple[StreamRollout, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One window per sample, built from a stored trajectory (see the module docstring)."""
    B, L, H = stream.block_frames, stream.window_blocks, stream.history_frames
    states, finals = traj["states"], traj["x0"]
    K = finals.shape[1]
    nb = K // B  # blocks per trajectory clip
    kept = traj["steps"].tolist()
    pos = [kept.index(i) for i in level_steps(stream, int(traj["n_steps"]))]  # state index of each slot
    ti = rng.integers(states.shape[0], size=n)
    # window start (in blocks): from -(L-1) (warm-up, one valid slot) to nb - L (the last full window)
    w = rng.integers(-(L - 1), nb - L + 1, size=n)
    clip_idx = traj["clip"][ti].tolist()
    cstart = traj["start"][ti].tolist()
    context = model.context()
    ref = bank.ref[clip_idx].to(device)
    anchor = anchor_prefix(model, ref, RopeTable(model.cfg, [0], device, ref.dtype), context)
    ro = StreamRollout(model, stream, ref, anchor, context)
    # audio tokens of the whole trajectory clip (and of its history)
    tok = clip_audio_tokens(model, bank.audio, clip_idx, cstart, K)  # [n, K, a]
    shape = finals.shape[2:]
    lat = torch.zeros(n, L * B, *shape)
    target = torch.zeros(n, L * B, *shape)
    aud = torch.zeros(n, L * B, tok.shape[-1], device=device)
    valid = torch.zeros(n, L, dtype=torch.bool)
    for r in range(n):
        for slot in range(L):
            blk = int(w[r]) + slot
            if blk < 0:
                continue
            f0, f1 = blk * B, (blk + 1) * B
            valid[r, slot] = True
            lat[r, slot * B:(slot + 1) * B] = states[ti[r], pos[slot], f0:f1]
            target[r, slot * B:(slot + 1) * B] = finals[ti[r], f0:f1]
            aud[r, slot * B:(slot + 1) * B] = tok[r, f0:f1]
    # clean history: the teacher's output for the H frames before the window (none at the start)
    hist_blocks = (H + B - 1) // B if H else 0
    for j in range(hist_blocks, 0, -1):
        hb = torch.as_tensor(w, dtype=torch.long) - j
        have = hb >= 0
        if not bool(have.any()):
            continue
        clean = torch.zeros(n, B, *shape)
        a = torch.zeros(n, B, tok.shape[-1], device=device)
        for r in range(n):
            if have[r]:
                clean[r] = finals[ti[r], int(hb[r]) * B:(int(hb[r]) + 1) * B]
                a[r] = tok[r, int(hb[r]) * B:(int(hb[r]) + 1) * B]
        # rows without this history block (the window starts earlier in the clip) keep their history
        ro.push_history(clean.to(device), a, rows=have.to(device))
    return ro, lat.to(device), aud, valid.to(device), target.to(device), valid.repeat_interleave(B, 1).to(device)


def stage1_loss(model: AvatarDiT, stream: StreamConfig, traj: dict[str, torch.Tensor], bank: LatentBank,
                rng: np.random.Generator, batch: int, device: torch.device) -> torch.Tensor:
    """Regression of the window's x0 onto the teacher's clean latents (valid slots only)."""
    ro, lat, aud, valid, target, fvalid = _stage1_batch(model, stream, traj, bank, rng, batch, device)
    x0 = ro.denoise(lat, aud, valid)
    err = (x0 - target).square().mean(dim=(2, 3, 4))  # [n, L*B]
    return (err * fvalid).sum() / fvalid.sum().clamp_min(1)


def train_stage1(model: AvatarDiT, stream: StreamConfig, traj: dict[str, torch.Tensor], bank: LatentBank, ck_dir,
                 name: str, sc: Stage1Config, device: torch.device, progress: bool = True) -> dict[str, float]:
    torch.manual_seed(sc.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ck = StageCheckpoint(ck_dir, name, {"dit": model}, {"opt": opt})
    if ck.done():
        ck.load_final()
        return dict(ck.extra)
    start = ck.start()
    rng = np.random.default_rng([sc.seed, start])
    bar = tqdm(range(start, sc.steps), desc=name, disable=not progress, initial=start, total=sc.steps)
    running = RunningLoss()
    for step in bar:
        loss = stage1_loss(model, stream, traj, bank, rng, sc.batch, device)
        apply_step(opt, model.parameters(), loss)
        bar.set_postfix(loss=f"{running.update(loss):.4f}")
        ck.maybe_save(step + 1)
    model.eval()
    ck.extra = {"final_loss": float(running)}
    ck.finish(meta=ck.extra)
    return dict(ck.extra)


# ---- stage 2: DMD -------------------------------------------------------------------------------
@dataclass
class DMDConfig:
    steps: int = 150
    batch: int = 4
    emit_frames: int = 8  # latent frames emitted per rollout (scored as one teacher clip)
    lr: float = 2e-5
    critic_lr: float = 1e-4
    critic_steps: int = 3
    cfg_scale: float = 4.5
    shift: float = 5.0
    ema: float = 0.95
    seed: int = 3


def rollout(model: AvatarDiT, stream: StreamConfig, ref: torch.Tensor, tok: torch.Tensor, n_emit: int,
            gen: torch.Generator | None = None) -> torch.Tensor:
    """Stream ``n_emit`` latent frames from the start of a stream; tok [n, n_emit + (L-1)*B, a]."""
    context = model.context()
    anchor = anchor_prefix(model, ref, RopeTable(model.cfg, [0], ref.device, ref.dtype), context)
    ro = StreamRollout(model, stream, ref, anchor, context)
    B, L = stream.block_frames, stream.window_blocks
    out: list[torch.Tensor] = []
    shape = (ref.shape[0], L * B, *ref.shape[1:])
    b = 0
    while sum(o.shape[1] for o in out) < n_emit:
        noise = torch.randn(shape, generator=gen).to(ref.device) if gen is not None else torch.randn(
            shape, device=ref.device)
        e = ro.step(tok[:, b * B:(b + 1) * B], noise)
        b += 1
        if e is not None:
            out.append(e)
    return torch.cat(out, dim=1)[:, :n_emit]


@dataclass
class DMDBatch:
    idx: list[int]
    starts: list[int]
    ref: torch.Tensor


def dmd_batch(bank: LatentBank, rng: np.random.Generator, n: int, n_tok: int, device: torch.device) -> DMDBatch:
    idx, starts = sample_batch(bank, rng, n, n_tok)
    return DMDBatch(idx, starts, bank.ref[idx].to(device))


def score_level(n: int, shift: float, device: torch.device) -> torch.Tensor:
    """Score timesteps: uniform in [0.02, 0.98], shift-warped (ALGORITHM: t in [20, 980])."""
    u = torch.rand(n, device=device) * 0.96 + 0.02
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def dmd_target(teacher: AvatarDiT, critic: AvatarDiT, geo: Geometry, bank: LatentBank, b: DMDBatch,
               x: torch.Tensor, dc: DMDConfig) -> torch.Tensor:
    """sg(x - grad) with grad = (x0_fake - x0_real) / mean|x - x0_real| at a random level."""
    n, K = x.shape[:2]
    s = score_level(n, dc.shift, x.device)[:, None, None, None, None]
    sig = s.flatten()[:, None].expand(n, K)
    xt = (1 - s) * x + s * torch.randn_like(x)
    ctx_t = teacher.context()
    tok_t = clip_audio_tokens(teacher, bank.audio, b.idx, b.starts, K)
    x0_real = cfg_x0(teacher, geo, xt, sig, b.ref, tok_t, anchor_prefix(teacher, b.ref, geo.anchor, ctx_t), ctx_t,
                     dc.cfg_scale)
    ctx_c = critic.context()
    tok_c = clip_audio_tokens(critic, bank.audio, b.idx, b.starts, K)
    x0_fake = xt - s * clip_flow(critic, geo, xt, sig, b.ref, tok_c, anchor_prefix(critic, b.ref, geo.anchor, ctx_c),
                                 ctx_c)
    norm = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
    return (x - (x0_fake - x0_real) / norm).detach()


def critic_loss(critic: AvatarDiT, geo: Geometry, bank: LatentBank, b: DMDBatch, xd: torch.Tensor,
                dc: DMDConfig) -> torch.Tensor:
    """Flow matching of the critic on the student's (detached) samples."""
    n, K = xd.shape[:2]
    s = score_level(n, dc.shift, xd.device)[:, None, None, None, None]
    eps = torch.randn_like(xd)
    xt = (1 - s) * xd + s * eps
    ctx = critic.context()
    tok = clip_audio_tokens(critic, bank.audio, b.idx, b.starts, K)
    flow = clip_flow(critic, geo, xt, s.flatten()[:, None].expand(n, K), b.ref, tok,
                     anchor_prefix(critic, b.ref, geo.anchor, ctx), ctx)
    return (flow - (eps - xd)).square().mean()


def train_dmd(student: AvatarDiT, teacher: AvatarDiT, stream: StreamConfig, bank: LatentBank, ck_dir, name: str,
              dc: DMDConfig, device: torch.device, progress: bool = True) -> tuple[AvatarDiT, dict[str, float]]:
    torch.manual_seed(dc.seed)
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    ema_model = copy.deepcopy(student).eval()
    ema = EMA(student, ema_model, dc.ema)
    g_opt = torch.optim.Adam(student.parameters(), lr=dc.lr, betas=(0.0, 0.999))
    c_opt = torch.optim.Adam(critic.parameters(), lr=dc.critic_lr, betas=(0.0, 0.999))
    ck = StageCheckpoint(ck_dir, name, {"dit": student, "critic": critic, "ema": ema_model},
                         {"g": g_opt, "c": c_opt}, every=25)
    if ck.done():
        ck.load_final({"dit": ema_model})
        return ema_model, dict(ck.extra)
    start = ck.start()
    rng = np.random.default_rng([dc.seed, start])
    K = dc.emit_frames
    geo = Geometry(student.cfg, K, device)
    B, L = stream.block_frames, stream.window_blocks
    n_tok = K + (L - 1) * B
    bar = tqdm(range(start, dc.steps), desc=name, disable=not progress, initial=start, total=dc.steps)
    g_run, c_run = RunningLoss(0.9), RunningLoss(0.9)

    for step in bar:
        batch = dmd_batch(bank, rng, dc.batch, n_tok, device)
        x = rollout(student, stream, batch.ref, clip_audio_tokens(student, bank.audio, batch.idx, batch.starts, n_tok),
                    K)
        target = dmd_target(teacher, critic, geo, bank, batch, x, dc)
        g_loss = 0.5 * (x - target).square().mean()
        apply_step(g_opt, student.parameters(), g_loss)
        ema.update()
        # critic updates on the student's samples (flow matching)
        xd = x.detach()
        c_loss = torch.zeros(())
        for _ in range(dc.critic_steps):
            c_loss = critic_loss(critic, geo, bank, batch, xd, dc)
            apply_step(c_opt, critic.parameters(), c_loss)
        bar.set_postfix(g=f"{g_run.update(g_loss):.4f}", critic=f"{c_run.update(c_loss):.4f}")
        ck.maybe_save(step + 1)
    ck.extra = {"final_generator_loss": float(g_run), "final_critic_loss": float(c_run)}
    ck.finish({"dit": ema_model}, meta=ck.extra)
    return ema_model, dict(ck.extra)
