"""Checkpoints: safetensors with the configs in the metadata; the shipped default; random init."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, StreamConfig, model_preset
from .model import AvatarDiT
from .vae import TinyAutoencoder
from .wan_vae import WanVAE, WanVAEConfig

if TYPE_CHECKING:  # transformers is imported only where wav2vec2 runs
    from .wav2vec import Wav2VecFeatures

log = logging.getLogger(__name__)

PACKAGE_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = PACKAGE_CHECKPOINTS / "default.safetensors"


@dataclass
class LoadedModel:
    model: AvatarDiT
    vae: TinyAutoencoder | WanVAE
    model_cfg: ModelConfig
    stream_cfg: StreamConfig
    trained: bool
    source: str  # checkpoint path, or "random-init"
    meta: dict[str, Any] = field(default_factory=dict)
    audio: Wav2VecFeatures | None = None  # the published model's wav2vec2
    context: torch.Tensor | None = None  # its default umT5 text context [text_len, text_dim]


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


PUBLISHED_FORMAT = "avatarforcing-published-v1"


def save_published(path: str | Path, dit: dict[str, torch.Tensor], cfg: ModelConfig, stream_cfg: StreamConfig,
                   vae: WanVAE, audio: Wav2VecFeatures, context: torch.Tensor, meta: dict[str, Any],
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """One file with everything the published model needs: the transformer (LoRA merged), Wan's VAE,
    wav2vec2 and the default text context, the configurations in the metadata. Returns its size in bytes."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()

    tensors = {f"dit.{k}": cast(v) for k, v in dit.items()}
    tensors.update({f"vae.{k}": cast(v) for k, v in vae.state_dict().items()})
    tensors.update({f"wav2vec.{k}": cast(v) for k, v in audio.state_dict().items()})
    tensors["text.context"] = cast(context)
    md = {"format": PUBLISHED_FORMAT, "model_config": json.dumps(cfg.to_dict()),
          "stream_config": json.dumps(stream_cfg.to_dict()), "vae_config": json.dumps(vae.config.to_dict()),
          "wav2vec_config": json.dumps(audio.config_dict()), "meta": json.dumps(meta)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=md)
    return Path(path).stat().st_size


def check_state(module: nn.Module, sd: dict[str, torch.Tensor], file: str, prefix: str) -> None:
    """Every key of ``module`` present in ``sd`` with its shape, and nothing else; else ONE line naming the
    file, the first bad key and the shapes (and how many more there are)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = [f"missing key {prefix}{k} (expected shape {list(s)})" for k, s in want.items() if k not in sd]
    problems += [f"{prefix}{k} has shape {list(sd[k].shape)}, expected {list(s)}"
                 for k, s in want.items() if k in sd and tuple(sd[k].shape) != s]
    problems += [f"unexpected key {prefix}{k} with shape {list(v.shape)}" for k, v in sd.items() if k not in want]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise ValueError(f"{file}: {problems[0]}{more}")


def _load_published(path: Path, md: dict[str, str], mcfg: ModelConfig, scfg: StreamConfig,
                    sd: dict[str, torch.Tensor]) -> LoadedModel:
    from .wav2vec import Wav2VecFeatures

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    for key in ("vae_config", "wav2vec_config"):
        if key not in md:
            raise ValueError(f"{path}: no {key} in its metadata (convert it again with `avatarforcing convert`)")
    if "text.context" not in sd:
        raise ValueError(f"{path}: missing key text.context (the default umT5 context)")
    with torch.device("meta"):  # 1.6 B parameters: no random init to throw away
        model, vae = AvatarDiT(mcfg), WanVAE(WanVAEConfig.from_dict(json.loads(md["vae_config"])))
    for prefix, module in (("dit.", model), ("vae.", vae)):
        part_sd = part(prefix)
        check_state(module, part_sd, str(path), prefix)
        module.load_state_dict(part_sd, strict=True, assign=True)
    vae._reset_latent_stats()
    if vae.config.z_dim != mcfg.latent_channels:
        raise ValueError(f"{path}: the VAE has {vae.config.z_dim} latent channels, the model {mcfg.latent_channels}")
    try:
        audio = Wav2VecFeatures.from_config_and_state(json.loads(md["wav2vec_config"]), part("wav2vec."))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if audio.feature_dim != mcfg.audio_feature_dim:
        raise ValueError(f"{path}: wav2vec2 gives {audio.feature_dim} features per frame, the model takes "
                         f"{mcfg.audio_feature_dim}")
    context = sd["text.context"]
    if tuple(context.shape) != (mcfg.text_len, mcfg.text_dim):
        raise ValueError(f"{path}: text.context has shape {list(context.shape)}, expected "
                         f"{[mcfg.text_len, mcfg.text_dim]}")
    return LoadedModel(model, vae.eval(), mcfg, scfg, trained=True, source=str(path),
                       meta=json.loads(md.get("meta", "{}")), audio=audio, context=context.float())


def _metadata(path: Path, what: str, expected: str) -> dict[str, str]:
    """A safetensors file's metadata; FileNotFoundError ("``what`` PATH does not exist") or one ValueError line
    saying the file is unreadable and what was ``expected``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); {expected}") from None


def load_checkpoint(path: str | Path) -> LoadedModel:
    path = Path(path)
    md = _metadata(path, "checkpoint", "a converted or trained checkpoint of this project is")
    if "model_config" not in md:
        raise ValueError(f"{path} is not an AvatarForcing checkpoint (no model_config in its metadata)")
    try:
        mcfg = ModelConfig.from_dict(json.loads(md["model_config"]))
        scfg = StreamConfig.from_dict(json.loads(md["stream_config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: its configuration is not valid ({e})") from None
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot be read ({e}); is it truncated?") from None
    if md.get("format") == PUBLISHED_FORMAT:
        return _load_published(path, md, mcfg, scfg, sd)
    model, vae = AvatarDiT(mcfg), TinyAutoencoder(mcfg)
    model.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("dit.")})
    vae.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("vae.")})
    return LoadedModel(model, vae, mcfg, scfg, trained=True, source=str(path), meta=json.loads(md.get("meta", "{}")))


def choose_decoder(lm: LoadedModel, choice: str, path: str | Path | None = None) -> TinyAutoencoder | None:
    """The decoder to run instead of the checkpoint's own autoencoder (None: its own).

    ``choice``: "auto" or "wan" (the checkpoint's: Wan's VAE for a converted one) or "tiny" (the project's
    small decoder at the model's sizes: a fraction of Wan's decode time and no per-session cache, but it
    has to be trained for Wan's latents; without weights in the checkpoint it is random and says so).
    ``path``: with "tiny", a small decoder distilled for this model's Wan latents (``avatarforcing
    distill-decoder``, ``load_decoder``), loaded instead of a random one."""
    if path and choice != "tiny":
        raise ValueError(f"decoder file {path}: a distilled small decoder goes with decoder 'tiny', not {choice!r}")
    if choice in ("auto", "wan"):
        if choice == "wan" and not isinstance(lm.vae, WanVAE):
            raise ValueError(f"{lm.source}: has no Wan VAE (decoder 'wan' needs a converted published checkpoint)")
        return None
    if not isinstance(lm.vae, WanVAE):
        if path:
            raise ValueError(f"{path}: a distilled decoder decodes Wan's latents, and {lm.source} has no Wan VAE "
                             "(it decodes with its own small autoencoder)")
        return None  # the project's own models already decode with the small autoencoder
    if path:
        return load_decoder(path, lm.model_cfg, lm.vae.config.z_dim)
    dec = small_decoder(lm.model_cfg, lm.vae.config.z_dim)
    log.warning("decoder 'tiny' for %s: no trained small decoder for Wan's latents ships with it, so it is "
                "randomly initialised: frames show noise (use it to measure time and memory only)", lm.source)
    return dec


DECODER_FORMAT = "avatarforcing-distilled-decoder-v1"


def small_decoder(model_cfg: ModelConfig, z_dim: int) -> TinyAutoencoder:
    """The small autoencoder at the model's sizes for a VAE of ``z_dim`` latent channels (only its decoder is used)."""
    return TinyAutoencoder(dataclasses.replace(model_cfg, latent_channels=z_dim))


def save_decoder(path: str | Path, decoder: TinyAutoencoder, model_cfg: ModelConfig, z_dim: int,
                 meta: dict[str, Any] | None = None) -> int:
    """One safetensors file: the small autoencoder's decoder (float32, keys ``decoder.*``) and in the metadata the
    model's configuration, ``z_dim`` and each entry of ``meta`` as JSON. Returns its size in bytes.

    Its latent statistics are not stored: a distilled decoder is trained through ``decode`` with them at their
    defaults (zero mean, unit std), on the latents the engine hands it, and ``load_decoder`` builds it so."""
    if not (torch.all(decoder.latent_mean == 0) and torch.all(decoder.latent_std == 1)):
        raise ValueError("save_decoder: the decoder's latent statistics are not the defaults (mean 0, std 1)")
    tensors = {f"decoder.{k}": v.detach().float().cpu().contiguous() for k, v in decoder.decoder.state_dict().items()}
    md = {"format": DECODER_FORMAT, "model_config": json.dumps(model_cfg.to_dict()), "z_dim": str(int(z_dim))}
    md.update({k: json.dumps(v) for k, v in (meta or {}).items() if k not in md})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=md)
    return Path(path).stat().st_size


def read_decoder_meta(path: str | Path) -> dict[str, Any]:
    """A distilled decoder file's metadata, each entry decoded (``model_config`` a dict, ``z_dim`` an int, ...)."""
    path = Path(path)
    md = _metadata(path, "decoder", "a file from `avatarforcing distill-decoder` is")
    if md.get("format") != DECODER_FORMAT:
        raise ValueError(f"{path} is not a distilled decoder (no format {DECODER_FORMAT} in its metadata; make one "
                         "with `avatarforcing distill-decoder`)")
    try:
        return {k: v if k == "format" else json.loads(v) for k, v in md.items()}
    except ValueError as e:
        raise ValueError(f"{path}: its metadata is not valid ({e})") from None


def load_decoder(path: str | Path, model_cfg: ModelConfig, z_dim: int) -> TinyAutoencoder:
    """A decoder file of ``save_decoder`` as the small autoencoder of this model (``small_decoder``), in eval mode.

    A file made for other sizes is refused in one line naming the file and its first bad key (``check_state``);
    one distilled at another resolution loads (the decoder is convolutional) with a warning."""
    path = Path(path)
    meta = read_decoder_meta(path)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot be read ({e}); is it truncated?") from None
    dec = small_decoder(model_cfg, z_dim)
    check_state(nn.ModuleDict({"decoder": dec.decoder}), sd, str(path), "")
    dec.decoder.load_state_dict({k[len("decoder."):]: v.float() for k, v in sd.items()}, strict=True)
    made = meta.get("model_config", {})
    if (made.get("height"), made.get("width")) != (model_cfg.height, model_cfg.width):
        log.warning("decoder %s was distilled at %sx%s; this model runs at %dx%d", path, made.get("height"),
                    made.get("width"), model_cfg.height, model_cfg.width)
    return dec.eval()


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
