"""Training data in memory: synthetic clips (pixels) and, once the autoencoder exists, latents.

Clips come from ``avatarforcing.data.make_clip`` (deterministic by seed, split and index), so a
run folder only caches what is expensive to recompute: the encoded latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import ModelConfig
from ..data import make_clip
from ..vae import TinyAutoencoder, to_unit


@dataclass
class ClipBank:
    """n clips of one split: frames uint8 [n, T, H, W, 3], audio float32 [n, T*spf], refs, boxes."""

    frames: np.ndarray
    audio: np.ndarray
    refs: np.ndarray  # uint8 [n, H, W, 3]
    boxes: np.ndarray  # int64 [n, 4] (y0, y1, x0, x1)

    @classmethod
    def generate(cls, split: str, n: int, seconds: float, seed: int = 0, progress: bool = True,
                 start: int = 0) -> ClipBank:
        clips = [make_clip(split, start + i, seconds, seed)
                 for i in tqdm(range(n), desc=f"generating {split} clips", disable=not progress)]
        return cls(frames=np.stack([c["frames"] for c in clips]), audio=np.stack([c["audio"] for c in clips]),
                   refs=np.stack([c["reference"] for c in clips]),
                   boxes=np.asarray([c["mouth_box"] for c in clips], np.int64))

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def unit_on(frames_u8: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] on ``device``."""
    return to_unit(torch.as_tensor(frames_u8).to(device))


@dataclass
class LatentBank:
    """Encoded clips: latents [n, F, C, h, w], ref latents [n, C, h, w], audio [n, F*4*spf]."""

    lat: torch.Tensor
    ref: torch.Tensor
    audio: torch.Tensor

    def __len__(self) -> int:
        return int(self.lat.shape[0])

    @property
    def frames(self) -> int:
        return int(self.lat.shape[1])

    @classmethod
    @torch.no_grad()
    def encode(cls, bank: ClipBank, vae: TinyAutoencoder, cfg: ModelConfig, device: torch.device,
               progress: bool = True) -> LatentBank:
        k = cfg.frames_per_latent
        n_lat = bank.frames.shape[1] // k
        lats, refs = [], []
        vae = vae.to(device).eval()
        for i in tqdm(range(len(bank)), desc="encoding latents", disable=not progress):
            fr = unit_on(bank.frames[i, : n_lat * k], device)[None]
            lats.append(vae.encode(fr)[0].cpu())
            refs.append(vae.encode_image(unit_on(bank.refs[i], device)[None])[0].cpu())
        spl = n_lat * k * cfg.samples_per_frame
        return cls(lat=torch.stack(lats), ref=torch.stack(refs),
                   audio=torch.from_numpy(np.ascontiguousarray(bank.audio[:, :spl])).float())

    def save(self, path: Path) -> None:
        save_file({"lat": self.lat.contiguous(), "ref": self.ref.contiguous(), "audio": self.audio.contiguous()},
                  str(path))

    @classmethod
    def load(cls, path: Path) -> LatentBank:
        d = load_file(str(path))
        return cls(lat=d["lat"], ref=d["ref"], audio=d["audio"])


def segment_pcm(audio: torch.Tensor, start_frame: int, n_frames: int, spf: int, context: int) -> torch.Tensor:
    """audio [n, S] -> [n, context + n_frames*spf]: video frames [start, start+n) plus left context.

    Context before the clip's start is silence, as at the start of a stream.
    """
    a0 = start_frame * spf - context
    a1 = (start_frame + n_frames) * spf
    if a1 > audio.shape[1]:
        raise ValueError("segment runs past the clip")
    if a0 < 0:
        return torch.cat([audio.new_zeros(audio.shape[0], -a0), audio[:, :a1]], dim=1)
    return audio[:, a0:a1]
