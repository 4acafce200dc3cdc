"""3D rotary position embedding (time, height, width), positions relative to the window.

Every pass builds its tables from small fixed position ranges (anchor, history, window), so
positions never grow with the stream's length: keys of the anchor and of the clean history are
stored un-rotated and rotated again at their fixed relative offsets on every step.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_angles(cfg: ModelConfig, frame_positions: torch.Tensor) -> torch.Tensor:
    """Angles [F * P, head_dim / 2] for the tokens of the given latent-frame positions.

    Tokens are ordered frame-major, then row, then column, as the patch embedding lays them out.
    """
    dt, dh, dw = cfg.rope_split
    th, tw = cfg.tokens_hw
    f = frame_positions.to(torch.float64)
    a_t = f[:, None] * _inv_freq(dt, cfg.rope_theta)[None, :]  # [F, dt/2]
    a_h = torch.arange(th, dtype=torch.float64)[:, None] * _inv_freq(dh, cfg.rope_theta)[None, :]
    a_w = torch.arange(tw, dtype=torch.float64)[:, None] * _inv_freq(dw, cfg.rope_theta)[None, :]
    nf = f.shape[0]
    at = a_t[:, None, None, :].expand(nf, th, tw, -1)
    ah = a_h[None, :, None, :].expand(nf, th, tw, -1)
    aw = a_w[None, None, :, :].expand(nf, th, tw, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(nf * th * tw, -1)


class RopeTable:
    """cos/sin for a token range, kept on the model's device and dtype."""

    def __init__(self, cfg: ModelConfig, frame_positions: list[int] | torch.Tensor,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        pos = torch.as_tensor(frame_positions)
        ang = rope_angles(cfg, pos)
        # Kept in float32 at least: rotation in half precision loses position detail.
        tdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.cos = ang.cos().to(device=device, dtype=tdtype)
        self.sin = ang.sin().to(device=device, dtype=tdtype)

    def __len__(self) -> int:
        return self.cos.shape[-2]

    @classmethod
    def rows(cls, tables: list[RopeTable]) -> RopeTable:
        """One table per batch row ([n, N, head_dim / 2]): rows whose tokens sit at different positions."""
        t = cls.__new__(cls)
        t.cos = torch.stack([x.cos for x in tables])
        t.sin = torch.stack([x.sin for x in tables])
        return t

    @classmethod
    def cat(cls, tables: list[RopeTable]) -> RopeTable:
        """The tokens of several tables one after the other."""
        t = cls.__new__(cls)
        t.cos = torch.cat([x.cos for x in tables], dim=-2)
        t.sin = torch.cat([x.sin for x in tables], dim=-2)
        return t


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_split: bool = False) -> torch.Tensor:
    """Rotate x [n, N, heads, head_dim] by a table's cos/sin [N, head_dim / 2], or by one table per row
    [n, N, head_dim / 2].

    Pair i of a head is (x[2i], x[2i + 1]) (interleaved: Wan's layout, the published weights') or, with
    ``half_split``, (x[i], x[i + head_dim / 2]): the same rotation of a head whose dimensions were permuted
    by ``half_split_permutation``, computed on two contiguous halves instead of strided pairs.
    """
    dtype = x.dtype
    xf = x.to(cos.dtype)
    if half_split:
        x0, x1 = xf.chunk(2, dim=-1)
    else:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
    c = cos.unsqueeze(-2) if cos.dim() == 3 else cos[None, :, None, :]
    s = sin.unsqueeze(-2) if sin.dim() == 3 else sin[None, :, None, :]
    if half_split:
        out = torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    else:
        out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(dtype)


def half_split_permutation(heads: int, head_dim: int) -> torch.Tensor:
    """The permutation of a [heads * head_dim] width that takes every head from the interleaved pair layout
    to the half-split one: new dimension j < head_dim / 2 of a head is its old 2j, j >= head_dim / 2 its old
    2(j - head_dim / 2) + 1. Applied to the rows of the q and k projections (and their RMSNorm weights) it
    changes no attention score: q.k sums the same products in another order, and the RMSNorm over the
    width is the same sum of squares."""
    half = head_dim // 2
    within = torch.cat([torch.arange(half) * 2, torch.arange(half) * 2 + 1])
    return (torch.arange(heads)[:, None] * head_dim + within[None, :]).reshape(-1)
