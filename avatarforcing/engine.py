"""The batched streaming engine: many sessions' sliding windows in preallocated slots.

Each slot holds one stream's whole state in device memory: the window latents at their noise
levels, the window's audio tokens, the reference latent, the style anchor's per-layer keys and
values (un-rotated), the temporal-anchor history keys and values (un-rotated), and the tail of
the audio for the front end's left context. ``step`` runs ONE forward pass for any subset of
slots (the denoising step of ../shared/ALGORITHM.md), then a short clean pass for the slots that
emitted a block (temporal anchor), slides their windows, and decodes the emitted blocks.

Positions are relative to the window on every step: anchor at latent-frame position 0, history
at 1..H, window at H+1..H+L*B, so RoPE tables are fixed and a stream can run for hours at
constant cost. Noise for a slot's step comes from a generator seeded by (session seed, step), so
a slot's output does not depend on which other slots share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig, StreamConfig
from .model import AvatarDiT, Prefix
from .rope import RopeTable
from .vae import TinyAutoencoder, to_pixels, to_unit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NoFreeSlotError(RuntimeError):
    """Every slot is taken."""


class SlotError(RuntimeError):
    """A slot was used that is not allocated (or freed twice)."""


@dataclass
class AnchorState:
    """What a reference image gives a session, computed once per avatar."""

    ref_latent: torch.Tensor  # [C, h, w]
    k: torch.Tensor  # [layers, P, heads, head_dim], un-rotated
    v: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ref_latent, self.k, self.v))


@dataclass
class SlotResult:
    slot: int
    step: int  # this slot's step counter before the step
    emitted_block: int | None  # index of the emitted block in the stream, None during warm-up
    frames: np.ndarray | None  # uint8 [frames_per_block, H, W, 3]
    anchor_similarity: float | None  # cosine similarity of the emitted latents to the reference


def _mix_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) % (2**63 - 1)


class StreamEngine:
    def __init__(self, model: AvatarDiT, vae: TinyAutoencoder, stream: StreamConfig, *, max_sessions: int,
                 device: str | torch.device = "cpu", dtype: str = "float32") -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.cfg: ModelConfig = model.cfg
        self.stream = stream
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(self.device, self.dtype).eval()
        self.vae = vae.to(self.device, self.dtype).eval()
        self.capacity = max_sessions
        c = self.cfg
        B, L, H = stream.block_frames, stream.window_blocks, stream.history_frames
        P = c.tokens_per_frame
        lh, lw = c.latent_hw
        self.B, self.L, self.H, self.P = B, L, H, P
        self.frames_per_block = B * c.frames_per_latent
        self.block_samples = self.frames_per_block * c.samples_per_frame
        self.context_samples = self.model.audio_frontend.context
        dev, dt = self.device, self.dtype
        S, nl = max_sessions, c.layers
        kv_shape = (S, nl, P, c.heads, c.head_dim)
        # ---- the slots (preallocated once) -----------------------------------------------
        self.win_lat = torch.zeros(S, L * B, c.latent_channels, lh, lw, device=dev, dtype=dt)
        self.win_audio = torch.zeros(S, L * B, c.audio_token_dim, device=dev, dtype=dt)
        self.win_valid = torch.zeros(S, L, device=dev, dtype=torch.bool)
        self.ref_lat = torch.zeros(S, c.latent_channels, lh, lw, device=dev, dtype=dt)
        self.anchor_k = torch.zeros(kv_shape, device=dev, dtype=dt)
        self.anchor_v = torch.zeros(kv_shape, device=dev, dtype=dt)
        hist_shape = (S, nl, H * P, c.heads, c.head_dim)
        self.hist_k = torch.zeros(hist_shape, device=dev, dtype=dt)
        self.hist_v = torch.zeros(hist_shape, device=dev, dtype=dt)
        self.hist_valid = torch.zeros(S, H, device=dev, dtype=torch.bool)
        self.audio_tail = torch.zeros(S, self.context_samples, device=dev, dtype=torch.float32)
        self._allocated = [False] * S
        self._steps = [0] * S
        self._seeds = [0] * S
        # ---- fixed tables ------------------------------------------------------------------
        self.rope_anchor = RopeTable(c, [0], dev, dt)
        self.rope_prefix = RopeTable(c, list(range(0, H + 1)), dev, dt)
        self.rope_window = RopeTable(c, list(range(H + 1, H + 1 + L * B)), dev, dt)
        self.rope_clean = RopeTable(c, list(range(H + 1, H + 1 + B)), dev, dt)
        lv = torch.tensor(stream.levels, dtype=torch.float32, device=dev)
        self.sigma_window = lv.repeat_interleave(B)[None]  # [1, L*B]
        self.sigma_renoise = lv[:-1].repeat_interleave(B)[None, :, None, None, None].to(dt)
        self._gen = torch.Generator(device=dev)
        with torch.inference_mode():
            self._context = self.model.context()
            silence = torch.zeros(1, self.context_samples + self.block_samples, device=dev, dtype=dt)
            self.silence_tokens = self.model.audio_tokens(silence)[0]  # [B, a]

    # ---- slots ------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self._allocated.count(False)

    def slot_bytes(self) -> int:
        """Device memory one slot's state takes."""
        per = 0
        for t in (self.win_lat, self.win_audio, self.win_valid, self.ref_lat, self.anchor_k, self.anchor_v,
                  self.hist_k, self.hist_v, self.hist_valid, self.audio_tail):
            per += t[0].numel() * t.element_size()
        return per

    def allocate(self, anchor: AnchorState, seed: int) -> int:
        try:
            s = self._allocated.index(False)
        except ValueError:
            raise NoFreeSlotError(f"all {self.capacity} session slots are in use") from None
        self._allocated[s] = True
        self._steps[s] = 0
        self._seeds[s] = int(seed)
        with torch.inference_mode():
            self.win_lat[s].zero_()
            self.win_audio[s].zero_()
            self.win_valid[s] = False
            self.ref_lat[s] = anchor.ref_latent.to(self.device, self.dtype)
            self.anchor_k[s] = anchor.k.to(self.device, self.dtype)
            self.anchor_v[s] = anchor.v.to(self.device, self.dtype)
            self.hist_k[s].zero_()
            self.hist_v[s].zero_()
            self.hist_valid[s] = False
            self.audio_tail[s].zero_()
        return s

    def free(self, slot: int) -> None:
        if not (0 <= slot < self.capacity) or not self._allocated[slot]:
            raise SlotError(f"slot {slot} is not allocated")
        self._allocated[slot] = False

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.capacity and self._allocated[slot]

    def steps_done(self, slot: int) -> int:
        return self._steps[slot]

    def clear_audio(self, slot: int) -> None:
        """Interrupt: the blocks still in the window finish as silence (the mouth closes)."""
        if not self.is_allocated(slot):
            raise SlotError(f"slot {slot} is not allocated")
        with torch.inference_mode():
            self.win_audio[slot] = self.silence_tokens.repeat(self.L, 1)
            self.audio_tail[slot].zero_()

    # ---- the anchor ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prepare_anchor(self, image: np.ndarray) -> AnchorState:
        """uint8 [H, W, 3] at the model's resolution -> the style anchor (computed once per avatar)."""
        c = self.cfg
        if image.shape != (c.height, c.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"reference image must be uint8 [{c.height}, {c.width}, 3], got "
                             f"{image.dtype} {list(image.shape)}")
        img = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        img = to_unit(img)[None].to(self.dtype)
        ref = self.vae.encode_image(img)  # [1, C, h, w]
        zeros_audio = torch.zeros(1, 1, c.audio_token_dim, device=self.device, dtype=self.dtype)
        sigma = torch.zeros(1, 1, device=self.device)
        _, kvs = self.model(ref[:, None], sigma, ref, zeros_audio, self.rope_anchor, mask_value=0.0,
                            context=self._context)
        k = torch.stack([kv[0][0] for kv in kvs])
        v = torch.stack([kv[1][0] for kv in kvs])
        return AnchorState(ref_latent=ref[0].clone(), k=k.clone(), v=v.clone())

    # ---- the step -------------------------------------------------------------------------------
    def _noise(self, slots: Sequence[int]) -> torch.Tensor:
        shape = self.win_lat.shape[1:]
        out = torch.empty((len(slots), *shape), device=self.device, dtype=torch.float32)
        for i, s in enumerate(slots):
            self._gen.manual_seed(_mix_seed(self._seeds[s], self._steps[s]))
            out[i] = torch.randn(shape, generator=self._gen, device=self.device)
        return out.to(self.dtype)

    def _prefix(self, idx: torch.Tensor, layer: int) -> Prefix:
        k = torch.cat([self.anchor_k[idx, layer], self.hist_k[idx, layer]], dim=1)
        v = torch.cat([self.anchor_v[idx, layer], self.hist_v[idx, layer]], dim=1)
        return Prefix(k, v)

    def _prefix_mask(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[0]
        anchor = torch.ones(n, self.P, dtype=torch.bool, device=self.device)
        return torch.cat([anchor, self.hist_valid[idx].repeat_interleave(self.P, dim=1)], dim=1)

    @torch.inference_mode()
    def step(self, slots: Sequence[int], pcm: np.ndarray | torch.Tensor) -> list[SlotResult]:
        """One denoising step for each slot in ``slots`` (one batched pass).

        pcm: float32 [n, block_samples] in [-1, 1], the newest block's audio at 16 kHz per slot.
        """
        n = len(slots)
        if n == 0:
            return []
        if len(set(slots)) != n:
            raise ValueError("a slot appears twice in one step")
        for s in slots:
            if not self.is_allocated(s):
                raise SlotError(f"slot {s} is not allocated")
        pcm_t = torch.as_tensor(pcm, dtype=torch.float32).to(self.device)
        if pcm_t.shape != (n, self.block_samples):
            raise ValueError(f"pcm must be [{n}, {self.block_samples}], got {list(pcm_t.shape)}")
        B, L, P = self.B, self.L, self.P
        idx = torch.tensor(list(slots), device=self.device)
        # Audio: the new block's tokens, from its samples plus the stored left context.
        full = torch.cat([self.audio_tail[idx], pcm_t], dim=1)
        tok = self.model.audio_tokens(full.to(self.dtype))
        self.audio_tail[idx] = full[:, -self.context_samples:]
        aud = self.win_audio[idx]
        aud[:, -B:] = tok
        valid = self.win_valid[idx]
        valid[:, -1] = True
        noise = self._noise(slots)
        lat = self.win_lat[idx]
        lat[:, -B:] = noise[:, -B:]  # the fresh block enters at the newest slot as pure noise
        sigma = self.sigma_window.expand(n, -1)
        prefix = [self._prefix(idx, i) for i in range(self.cfg.layers)]
        pmask = self._prefix_mask(idx)
        key_mask = torch.cat([pmask, valid.repeat_interleave(B * P, dim=1)], dim=1)
        flow, _ = self.model(lat, sigma, self.ref_lat[idx], aud, self.rope_window, prefix=prefix,
                             prefix_rope=self.rope_prefix, key_mask=key_mask, context=self._context)
        x0 = lat - sigma[:, :, None, None, None].to(self.dtype) * flow
        emit = valid[:, 0].clone()
        rows = emit.nonzero().flatten()
        clean = x0[rows, :B]
        if rows.numel() > 0 and self.H > 0:
            self._temporal_anchor(idx[rows], clean, aud[rows, :B], pmask[rows])
        # Slide: block i's x0 is re-noised (fresh noise) to level i-1 and kept for the next step.
        new_lat = torch.zeros_like(lat)
        new_lat[:, : (L - 1) * B] = (1 - self.sigma_renoise) * x0[:, B:] + self.sigma_renoise * noise[:, : (L - 1) * B]
        self.win_lat[idx] = new_lat
        self.win_valid[idx] = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        self.win_audio[idx] = torch.cat([aud[:, B:], torch.zeros_like(aud[:, :B])], dim=1)
        frames_np: np.ndarray | None = None
        sims: list[float] = []
        if rows.numel() > 0:
            frames = self.vae.decode(clean)  # [m, 4B, 3, H, W]
            frames_np = to_pixels(frames).contiguous().cpu().numpy()
            ref = self.ref_lat[idx[rows]].float().flatten(1)[:, None]
            sims = F.cosine_similarity(clean.float().flatten(2), ref, dim=-1).mean(1).tolist()
        out: list[SlotResult] = []
        e = 0
        for i, s in enumerate(slots):
            step = self._steps[s]
            self._steps[s] = step + 1
            if bool(emit[i]):
                assert frames_np is not None
                out.append(SlotResult(s, step, step - (L - 1), frames_np[e], sims[e]))
                e += 1
            else:
                out.append(SlotResult(s, step, None, None, None))
        return out

    def _temporal_anchor(self, idx: torch.Tensor, clean: torch.Tensor, audio: torch.Tensor,
                         pmask: torch.Tensor) -> None:
        """Run the emitted clean block at t = 0 and keep its last H frames' keys/values as history."""
        m = idx.shape[0]
        prefix = [self._prefix(idx, i) for i in range(self.cfg.layers)]
        key_mask = torch.cat([pmask, torch.ones(m, self.B * self.P, dtype=torch.bool, device=self.device)], 1)
        sigma = torch.zeros(m, self.B, device=self.device)
        _, kvs = self.model(clean, sigma, self.ref_lat[idx], audio, self.rope_clean, prefix=prefix,
                            prefix_rope=self.rope_prefix, key_mask=key_mask, context=self._context)
        keep = self.H * self.P
        hk = torch.stack([kv[0] for kv in kvs], dim=1)  # [m, layers, B*P, heads, hd]
        hv = torch.stack([kv[1] for kv in kvs], dim=1)
        self.hist_k[idx] = torch.cat([self.hist_k[idx], hk], dim=2)[:, :, -keep:]
        self.hist_v[idx] = torch.cat([self.hist_v[idx], hv], dim=2)[:, :, -keep:]
        ones = torch.ones(m, self.B, dtype=torch.bool, device=self.device)
        self.hist_valid[idx] = torch.cat([self.hist_valid[idx], ones], dim=1)[:, -self.H:]
