"""Checkpoints: safetensors with the configs in the metadata; the shipped default; random init."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, StreamConfig, model_preset
from .model import AvatarDiT
from .vae import TinyAutoencoder

log = logging.getLogger(__name__)

PACKAGE_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = PACKAGE_CHECKPOINTS / "default.safetensors"


@dataclass
class LoadedModel:
    model: AvatarDiT
    vae: TinyAutoencoder
    model_cfg: ModelConfig
    stream_cfg: StreamConfig
    trained: bool
    source: str  # checkpoint path, or "random-init"
    meta: dict[str, Any] = field(default_factory=dict)


# How far below its calibrated mean (in standard deviations) a stream's anchor similarity may fall
# before the server counts it as drifting.
DRIFT_FLOOR_STDS = 4.0


def drift_floor(meta: dict[str, Any]) -> float | None:
    """The anchor-similarity floor calibrated on a checkpoint (None if it carries no calibration).

    ``avatarforcing eval`` measures the similarity over held-out streams and ``scripts/ship_model.py``
    stores it in the metadata; the floor is its mean minus ``DRIFT_FLOOR_STDS`` standard deviations.
    """
    cal = meta.get("drift_calibration", {}).get("anchor_similarity")
    if not cal:
        return None
    return float(cal["mean"]) - DRIFT_FLOOR_STDS * float(cal["std"])


def save_checkpoint(path: str | Path, model: AvatarDiT, vae: TinyAutoencoder, stream_cfg: StreamConfig,
                    meta: dict[str, Any] | None = None) -> None:
    tensors = {f"dit.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"vae.{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()})
    md = {"model_config": json.dumps(model.cfg.to_dict()), "stream_config": json.dumps(stream_cfg.to_dict()),
          "meta": json.dumps(meta or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=md)


def load_checkpoint(path: str | Path) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if "model_config" not in md:
        raise ValueError(f"{path} is not an AvatarForcing checkpoint (no model_config in its metadata)")
    mcfg = ModelConfig.from_dict(json.loads(md["model_config"]))
    scfg = StreamConfig.from_dict(json.loads(md["stream_config"]))
    sd = load_file(str(path))
    model, vae = AvatarDiT(mcfg), TinyAutoencoder(mcfg)
    model.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("dit.")})
    vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
    return LoadedModel(model, vae, mcfg, scfg, trained=True, source=str(path), meta=json.loads(md.get("meta", "{}")))


def random_init(preset: str = "tiny", stream_cfg: StreamConfig | None = None, seed: int = 0) -> LoadedModel:
    mcfg = model_preset(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, vae = AvatarDiT(mcfg), TinyAutoencoder(mcfg)
    return LoadedModel(model, vae, mcfg, stream_cfg or StreamConfig(), trained=False, source="random-init")


def load_default(checkpoint: str | Path | None = None, preset: str = "tiny") -> LoadedModel:
    """The given checkpoint; else the shipped default; else a random-init model of ``preset``."""
    if checkpoint:
        return load_checkpoint(checkpoint)
    if DEFAULT_CHECKPOINT.is_file():
        return load_checkpoint(DEFAULT_CHECKPOINT)
    return random_init(preset)
