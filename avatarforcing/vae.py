"""A small autoencoder with the video VAE's strides: 4 video frames -> 1 latent frame, 8x8 space.

Four consecutive frames are stacked on the channel axis and compressed together, so the
decoder turns one latent frame back into four distinct video frames (the mouth can move
within a latent frame). A reference image is encoded as four copies of itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] (the autoencoder's input range)."""
    return pixels.movedim(-1, -3).float() / 127.5 - 1.0


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames [..., 3, H, W] (about [-1, 1]) -> uint8 pixels [..., H, W, 3], clamped and rounded."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
                         nn.SiLU())


class TinyAutoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        st, sh, sw = cfg.vae_stride
        if sh != sw or sh != 2 ** len(cfg.vae_channels):
            raise ValueError(f"vae_stride {cfg.vae_stride} must be square and 2**len(vae_channels)")
        self.t = st
        ch = cfg.vae_channels
        enc: list[nn.Module] = [nn.Conv2d(3 * st, ch[0], 3, padding=1), nn.SiLU()]
        cin = ch[0]
        for c in ch:
            enc += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.SiLU(), _block(c, c)]
            cin = c
        enc += [nn.Conv2d(cin, cfg.latent_channels, 1)]
        self.encoder = nn.Sequential(*enc)
        # Decoder: every upsampling conv runs at the LOW resolution and a pixel shuffle doubles
        # the size, which keeps decoding cheap enough for many real-time sessions on a CPU.
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1), nn.SiLU(),
                                nn.Conv2d(ch[-1], ch[-1], 3, padding=1), nn.SiLU()]
        outs = list(reversed(ch[:-1])) + [3 * st]
        cin = ch[-1]
        for i, c in enumerate(outs):
            dec += [nn.Conv2d(cin, 4 * c, 3, padding=1), nn.PixelShuffle(2)]
            if i < len(outs) - 1:
                dec += [nn.SiLU()]
            cin = c
        self.decoder = nn.Sequential(*dec)
        # Per-channel latent statistics, set after training (``set_latent_stats``) so that the
        # diffusion model sees latents of about zero mean and unit variance.
        self.latent_mean: torch.Tensor
        self.latent_std: torch.Tensor
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std.clamp_min(1e-4))

    def _norm(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean[:, None, None].to(z.dtype)) / self.latent_std[:, None, None].to(z.dtype)

    def _denorm(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std[:, None, None].to(z.dtype) + self.latent_mean[:, None, None].to(z.dtype)

    def encode_raw(self, frames: torch.Tensor) -> torch.Tensor:
        """Like ``encode`` but without the latent normalisation (for training the autoencoder)."""
        n, t, c, h, w = frames.shape
        if t % self.t:
            raise ValueError(f"{t} frames is not a multiple of the temporal stride {self.t}")
        k = t // self.t
        z = self.encoder(frames.reshape(n * k, self.t * c, h, w))
        return z.reshape(n, k, *z.shape[1:])

    def decode_raw(self, lat: torch.Tensor) -> torch.Tensor:
        n, k = lat.shape[:2]
        x = self.decoder(lat.reshape(n * k, *lat.shape[2:]))
        return x.reshape(n, k * self.t, 3, x.shape[-2], x.shape[-1])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [n, 4k, 3, H, W] in [-1, 1] -> normalised latents [n, k, C, h, w]."""
        return self._norm(self.encode_raw(frames))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [n, 3, H, W] in [-1, 1] -> latent [n, C, h, w]."""
        return self.encode(image[:, None].expand(-1, self.t, -1, -1, -1))[:, 0]

    def decode(self, lat: torch.Tensor) -> torch.Tensor:
        """normalised latents [n, k, C, h, w] -> frames [n, 4k, 3, H, W] in [-1, 1] (not clamped)."""
        return self.decode_raw(self._denorm(lat))
