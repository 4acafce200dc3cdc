"""Wan2.1's causal video VAE (4x time, 8x8 space, 16 latent channels), written for streaming.

The module tree mirrors Wan's ``WanVAE_`` so that ``Wan2.1_VAE.pth`` loads with a strict, key-for-key
state dict, but the causal caches are not hidden in the module: every cached convolution takes its
past frames as an argument and hands back its new ones. That is what lets a server keep each
session's decoder cache in its own slot of preallocated memory and decode many sessions in one call
(``decode_step``), while ``encode``/``decode`` reproduce Wan's whole-video behaviour exactly.

Wan's caching, as its code does it (``wan/modules/vae.py``) and as this module reproduces it:

- A causal 3x3x3 convolution sees its input after two frames of history; at the start of a stream
  the history is zeros (Wan pads with zeros when its cache is empty or holds one frame). Here every
  history always has two frames, zero-filled where Wan would hold fewer, which gives the same numbers.
- The decoder's temporal upsamplers skip their time convolution on a stream's first latent frame
  (1 video frame out instead of 4) and mark the cache ``'Rep'``; on the next frame Wan runs the
  time convolution with zero padding, i.e. with a zero history. So ``'Rep'`` is a zero cache here.
- The encoder's temporal downsamplers likewise pass the first frame through, and afterwards stride
  over (last frame of the previous chunk, this chunk); their cache is one frame.
- 1x1x1 shortcut convolutions and the per-frame 2D parts (spatial resampling, attention) carry nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WanVAE",
    "WanVAEConfig",
    "load_wan_vae",
    "wan_vae_state_dict_problems",
]

# Wan2.1's per-channel latent statistics (Wan's ``WanVAE``; diffusers' ``AutoencoderKLWan`` defaults).
# The diffusion model works on (mu - mean) / std.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

_CACHE_T = 2  # frames of history a causal 3x3x3 convolution needs


@dataclass(frozen=True)
class WanVAEConfig:
    """The architecture knobs of Wan's ``WanVAE_`` (the defaults are Wan2.1's released VAE)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # Wan's spelling, kept for its configs

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_res_blocks <= 0 or not self.dim_mult or min(self.dim_mult) <= 0:
            raise ValueError(f"invalid WanVAEConfig sizes: {self}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling), "
                             f"got {self.temperal_downsample}")
        if self.z_dim != len(WAN21_LATENTS_MEAN):
            raise ValueError(f"z_dim {self.z_dim}: only Wan2.1's {len(WAN21_LATENTS_MEAN)}-channel latent space "
                             "has known latent statistics")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists), e.g. for checkpoint metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WanVAEConfig:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
        """Reads the architecture off a ``WanVAE_`` state dict, so replicas of any size load unannounced.

        The encoder's flat ``downsamples`` list fixes everything: residual blocks (their output widths give
        ``dim_mult``), attention blocks (``attn_scales``) and resamplers (``time_conv`` present: temporal).
        The decoder is then checked against it by the strict load.
        """
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in sd:
                raise ValueError(f"missing key {key}")
        dim = int(sd["encoder.conv1.weight"].shape[0])
        z_dim = int(sd["conv2.weight"].shape[0])
        prefix = "encoder.downsamples."
        found = sorted({int(k.split(".")[2]) for k in sd if k.startswith(prefix) and k.split(".")[2].isdigit()})
        if found != list(range(len(found))) or not found:
            raise ValueError(f"{prefix}<i> indices {found} are not 0..n-1")
        widths: list[int] = []  # output width of each level
        res_counts: list[int] = [0]
        attn_levels: set[int] = set()
        temporal: list[bool] = []
        for i in found:
            p = f"{prefix}{i}."
            if p + "residual.2.weight" in sd:
                width = int(sd[p + "residual.2.weight"].shape[0])
                if res_counts[-1] == 0:
                    widths.append(width)
                res_counts[-1] += 1
            elif p + "to_qkv.weight" in sd:
                attn_levels.add(len(res_counts) - 1)
            elif p + "resample.1.weight" in sd:
                temporal.append(p + "time_conv.weight" in sd)
                res_counts.append(0)
            else:
                raise ValueError(f"{p}*: neither a residual, an attention nor a resample block")
        if len(set(res_counts)) != 1 or len(widths) != len(res_counts):
            raise ValueError(f"{prefix}*: residual blocks per level {res_counts} are not all equal")
        bad = [w for w in widths if w % dim]
        if bad:
            raise ValueError(f"{prefix}*: level widths {widths} are not multiples of dim {dim}")
        return cls(dim=dim, z_dim=z_dim, dim_mult=tuple(w // dim for w in widths), num_res_blocks=res_counts[0],
                   attn_scales=tuple(1.0 / 2**lvl for lvl in sorted(attn_levels)),
                   temperal_downsample=tuple(temporal))


# ---------------------------------------------------------------------------------------------------------
# The causal state of one encoder or decoder pass


class _Causal:
    """The caches of one pass, read and written in the order the cached convolutions run.

    ``past`` is None at the start of a stream (every history is zero, the temporal resamplers take
    their first-frame path); otherwise it is the ``new`` list of the previous pass.
    """

    def __init__(self, past: Sequence[torch.Tensor] | None) -> None:
        self.past = past
        self.new: list[torch.Tensor] = []

    @property
    def first(self) -> bool:
        return self.past is None

    def take(self) -> torch.Tensor | None:
        return None if self.past is None else self.past[len(self.new)]

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Runs a causal convolution with its history and records the history for the next pass."""
        past = self.take()
        self.new.append(_last_frames(past, x))
        return conv(x, past)


def _last_frames(past: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The last two frames of (past, x): Wan's cache update, zero-filled where Wan keeps one frame."""
    if x.shape[2] >= _CACHE_T:
        return x[:, :, -_CACHE_T:].clone()  # a copy: a view would keep the whole activation alive
    prev = past[:, :, -1:] if past is not None else torch.zeros_like(x)
    return torch.cat([prev, x], dim=2)


# ---------------------------------------------------------------------------------------------------------
# Layers (attribute names follow Wan's, so the state-dict keys are Wan's)


class _CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2*p_t frames of history (given, or zeros) and none after."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=padding)
        pt, ph, pw = (int(p) for p in self.padding)
        self._history = 2 * pt
        # Spatial zero padding stays inside the convolution (no padded copy); time is padded here.
        self.padding = (0, ph, pw)

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if self._history:
            missing = self._history
            if past is not None:
                x = torch.cat([past, x], dim=2)
                missing -= past.shape[2]
            if missing > 0:
                x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return super().forward(x)


class _RMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(C) and a per-channel gain (no bias)."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm in float32 whatever the activations are (bf16 sums of ~400 squares lose digits).
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


def _per_frame(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Applies a 2D module to every frame of [b, c, t, h, w]."""
    b, t = x.shape[0], x.shape[2]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Indices as in Wan (0 norm, 2 conv, 3 norm, 6 conv); 5 was a dropout, inert at inference.
        self.residual = nn.Sequential(
            _RMSNorm(cin, images=False), nn.SiLU(), _CausalConv3d(cin, cout, 3, padding=1),
            _RMSNorm(cout, images=False), nn.SiLU(), nn.Identity(), _CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut: nn.Module = _CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.cin, self.cout = cin, cout

    def forward(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        r = self.residual
        h = state.conv(r[2], F.silu(r[0](x)))
        h = state.conv(r[6], F.silu(r[3](h)))
        return h + self.shortcut(x)

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        return [(self.cin, _CACHE_T, h, w), (self.cout, _CACHE_T, h, w)]


class _AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (no state across frames)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _frame(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [n, hw, 3c]
        q, k, v = (t.unsqueeze(1) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [n, hw, c]
        return self.proj(y.transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, state: _Causal | None = None) -> torch.Tensor:
        b, t = x.shape[0], x.shape[2]
        y = self._frame(x.transpose(1, 2).flatten(0, 1))
        return x + y.unflatten(0, (b, t)).transpose(1, 2)

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        return []


class _Resample(nn.Module):
    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.dim = dim
        self.time_conv: _CausalConv3d | None = None
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                # Each frame becomes two: 2*dim channels, split in half below.
                self.time_conv = _CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = _CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"resample mode {mode!r}")

    def forward(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, state)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, state)
        return x

    def _double_frames(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        assert self.time_conv is not None
        if state.first:
            # Wan's 'Rep': the first frame passes through, and the next pass sees a zero history.
            b, c, _, h, w = x.shape
            state.new.append(x.new_zeros(b, c, _CACHE_T, h, w))
            return x
        b, c, t, h, w = x.shape
        y = state.conv(self.time_conv, x).unflatten(1, (2, c))  # [b, 2, c, t, h, w]
        return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame order t0a t0b t1a t1b ...

    def _halve_frames(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        assert self.time_conv is not None
        past = state.take()
        state.new.append(x[:, :, -1:].clone())
        if past is None:
            return x  # the first frame passes through
        return self.time_conv(torch.cat([past, x], dim=2))

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        # Only the decoder's state is exposed; the encoder's (1-frame downsampler histories) stays inside encode.
        return [(self.dim, _CACHE_T, h, w)] if self.mode == "upsample3d" else []


class _Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = _CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    blocks.append(_AttentionBlock(cout))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(_Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(_ResidualBlock(dims[-1], dims[-1]), _AttentionBlock(dims[-1]),
                                    _ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(_RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  _CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        x = state.conv(self.conv1, x)
        for layer in (*self.downsamples, *self.middle):
            x = layer(x, state)
        return state.conv(self.head[2], F.silu(self.head[0](x)))


class _Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.z_dim = cfg.z_dim
        self.conv1 = _CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(_ResidualBlock(dims[0], dims[0]), _AttentionBlock(dims[0]),
                                    _ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(mult) - 2)  # Wan's bookkeeping, so attn_scales place blocks where Wan does
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                cin //= 2  # every upsampler halves the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResidualBlock(cin, cout))
                if scale in cfg.attn_scales:
                    blocks.append(_AttentionBlock(cout))
                cin = cout
            if i != len(mult) - 1:
                blocks.append(_Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(_RMSNorm(dims[-1], images=False), nn.SiLU(),
                                  _CausalConv3d(dims[-1], 3, 3, padding=1))
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor, state: _Causal) -> torch.Tensor:
        x = state.conv(self.conv1, x)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, state)
        return state.conv(self.head[2], F.silu(self.head[0](x)))

    def cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = [(self.z_dim, _CACHE_T, h, w)]
        for layer in (*self.middle, *self.upsamples):
            shapes += layer.cache_shapes(h, w)
            if isinstance(layer, _Resample):
                h, w = 2 * h, 2 * w
        shapes.append((self.out_dim, _CACHE_T, h, w))
        return shapes


# ---------------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """Wan2.1's VAE with Wan's state-dict keys; latents in and out are normalised ((mu - mean) / std).

    Works in any floating dtype and on any device; batch rows never interact, so a batch may hold
    unrelated streams.
    """

    latents_mean: torch.Tensor
    latents_std: torch.Tensor

    def __init__(self, cfg: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or WanVAEConfig()
        self.encoder = _Encoder3d(cfg)
        self.conv1 = _CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = _CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = _Decoder3d(cfg)
        self.register_buffer("latents_mean", torch.empty(0), persistent=False)
        self.register_buffer("latents_std", torch.empty(0), persistent=False)
        self._reset_latent_stats()

    def _reset_latent_stats(self) -> None:
        # Rebuilt from the constants, in float32, wherever the weights are: a cast to bf16 would round
        # std 2.8184 to 2.8125, a 0.2% error on every latent.
        device = self.conv2.weight.device
        self.latents_mean = torch.tensor(WAN21_LATENTS_MEAN, dtype=torch.float32, device=device)
        self.latents_std = torch.tensor(WAN21_LATENTS_STD, dtype=torch.float32, device=device)

    def _apply(self, fn: Any, recurse: bool = True) -> WanVAE:  # type: ignore[override]
        super()._apply(fn, recurse)
        self._reset_latent_stats()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _stat(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        return self.latents_mean.view(shape), self.latents_std.view(shape)

    def normalise(self, mu: torch.Tensor) -> torch.Tensor:
        """Raw VAE means -> the latents the diffusion model sees (computed in float32)."""
        mean, std = self._stat(mu)
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stat(z)
        return (z.float() * std + mean).to(z.dtype)

    # --- encoding -----------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [n, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent means [n, z, 1 + k, H/8, W/8].

        Chunked as Wan encodes (the first frame alone, then 4 at a time, carrying the causal state), so
        memory stays that of 4 frames and the numbers are Wan's.
        """
        n, c, t, h, w = video.shape
        s, ts = self.config.spatial_stride, self.config.temporal_stride
        if c != 3 or (t - 1) % ts or h % s or w % s:
            raise ValueError(f"video {tuple(video.shape)}: need [n, 3, 1 + {ts}k, H, W] with H, W multiples of {s}")
        x = video.to(self.dtype)
        past: list[torch.Tensor] | None = None
        outs = []
        for start, stop in [(0, 1)] + [(i, i + ts) for i in range(1, t, ts)]:
            state = _Causal(past)
            outs.append(self.encoder(x[:, :, start:stop], state))
            past = state.new
        mu = self.conv1(torch.cat(outs, dim=2))[:, : self.config.z_dim]
        return self.normalise(mu)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image [n, 3, H, W] -> normalised latent [n, z, H/8, W/8] (a one-frame video)."""
        return self.encode(image.unsqueeze(2)).squeeze(2)

    # --- decoding -----------------------------------------------------------------------------------

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [n, z, F, h, w] -> video [n, 3, 1 + 4(F - 1), 8h, 8w] in [-1, 1].

        One latent frame at a time with the causal state carried, as Wan decodes, so the peak memory is
        that of one latent frame's 4 video frames.
        """
        past: list[torch.Tensor] | None = None
        outs = []
        for i in range(z.shape[2]):
            frames, past = self._step(z[:, :, i:i + 1], past)
            outs.append(frames)
        return torch.cat(outs, dim=2)

    def decoder_cache_shapes(self, h: int, w: int) -> list[tuple[int, ...]]:
        """Per cached convolution, in call order: the (C, 2, H_i, W_i) history of ONE stream at latent size h x w.

        A server allocates these once per session slot; ``decode_step`` reads and returns them in this order.
        """
        return self.decoder.cache_shapes(h, w)

    def init_decoder_cache(self, n: int, h: int, w: int, device: torch.device | str | None = None,
                           dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Zeroed histories for n session slots: buffers a server allocates once and copies new caches into."""
        device = self.conv2.weight.device if device is None else device
        return [torch.zeros((n, *s), device=device, dtype=dtype or self.dtype)
                for s in self.decoder_cache_shapes(h, w)]

    def decode_step(self, z: torch.Tensor, cache: Sequence[torch.Tensor] | None,
                    first: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decodes the next k latent frames of n streams: z [n, z, k, h, w] (normalised) -> (frames, new cache).

        ``first`` marks every stream's very first latent frame (1 video frame out, the temporal upsamplers
        skipped as Wan does); the given cache is then ignored (a recycled slot needs no zeroing; None is
        fine). Otherwise each latent gives 4 frames, and any split of a stream's latents into steps gives
        the same video as ``decode`` (k latents in one step run together: k times one latent's activation
        memory). Rows are independent: gather/scatter per-session caches by index.
        The returned cache tensors are fresh (no aliasing of the inputs), each [n, *decoder_cache_shapes].
        """
        if first:
            frames, new = self._step(z[:, :, :1], None)
            if z.shape[2] > 1:
                rest, new = self._step(z[:, :, 1:], new)
                frames = torch.cat([frames, rest], dim=2)
            return frames, new
        if cache is None:
            raise ValueError("decode_step: a cache is needed unless first=True")
        n, _, _, h, w = z.shape
        expected = self.decoder_cache_shapes(h, w)
        if len(cache) != len(expected):
            raise ValueError(f"decode_step: {len(cache)} cache tensors, expected {len(expected)}")
        for i, (c, s) in enumerate(zip(cache, expected, strict=True)):
            if tuple(c.shape) != (n, *s):
                raise ValueError(f"decode_step: cache[{i}] has shape {list(c.shape)}, expected {[n, *s]}")
        return self._step(z, cache)

    def _step(self, z: torch.Tensor, past: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = _Causal(past)
        x = self.conv2(self.denormalise(z.to(self.dtype)))
        frames = self.decoder(x, state)
        return frames.clamp(-1.0, 1.0), state.new


# ---------------------------------------------------------------------------------------------------------
# Loading


def wan_vae_state_dict_problems(sd: Mapping[str, torch.Tensor], cfg: WanVAEConfig) -> list[str]:
    """Every way sd differs from ``WanVAE(cfg)``'s state dict, one self-contained line each (empty: loads)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}
    problems = []
    for key, shape in expected.items():
        if key not in sd:
            problems.append(f"missing key {key} (expected shape {list(shape)})")
        elif not isinstance(sd[key], torch.Tensor):
            problems.append(f"{key} is a {type(sd[key]).__name__}, not a tensor")
        elif tuple(sd[key].shape) != shape:
            problems.append(f"{key} has shape {list(sd[key].shape)}, expected {list(shape)}")
    for key in sd:
        if key not in expected:
            problems.append(f"unexpected key {key}")
    return problems


def _read_state_dict(path: Path) -> Mapping[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch, zipfile and pickle raise many types for a bad file
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable checkpoint (truncated or not a torch file): {first_line}") from e
    if isinstance(obj, Mapping) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, Mapping):
            obj = only  # {"state_dict": {...}} and the like
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    return obj


def load_wan_vae(path: str | Path) -> WanVAE:
    """A ``Wan2.1_VAE.pth`` (or a .safetensors of the same keys, or a replica of any size) -> WanVAE on the CPU.

    The config is read off the weights, and the load is strict: a ValueError lists every missing,
    unexpected or misshapen key, one line each, naming the file, so a wrong file fails loudly at start-up
    instead of decoding noise.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    try:
        cfg = WanVAEConfig.from_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    problems = wan_vae_state_dict_problems(sd, cfg)
    if problems:
        raise ValueError("\n".join(f"{path}: {p}" for p in problems))
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model._reset_latent_stats()
    return model.eval().requires_grad_(False)
