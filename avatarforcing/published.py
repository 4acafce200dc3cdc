"""The published AvatarForcing student in, this project's checkpoint out.

The published files (../shared/REFERENCE-CHECKPOINT.md): the student ``model.pt`` (Wan2.1-T2V-1.3B with
an unmerged PEFT LoRA, a 33-channel patch embedding and the audio modules, under ``generator`` or
``generator_ema``), Wan's ``Wan2.1_VAE.pth``, a transformers-format wav2vec2-base-960h folder and a umT5
text context (``avatarforcing encode-prompt``). ``convert`` reads them from local folders and writes ONE
safetensors checkpoint of this project with everything the server needs: the transformer with the LoRA
merged, the VAE, wav2vec2 and a default text context; the configuration goes into the metadata.

Every source key is consumed exactly once. Anything else (a key missing, left over or of another shape,
a file that is not what it should be) stops the conversion with one line naming the file, the key and
the shapes, because a silently half-loaded model renders a face that looks almost right.

What changes between the layouts:
- the LoRA (``lora_A``/``lora_B`` of adapter ``default``) is merged: W = W0 + (alpha / r) B A;
- ``patch_embedding`` is a Conv3d with kernel (1, 2, 2) there and a Linear over the (channel, row,
  column)-ordered patch here: the same numbers, flattened;
- the head's output rows are ordered (row, column, channel) there and (channel, row, column) here: a row
  permutation (a mistake here is silent: the output is a scrambled but plausible latent);
- ``audio_cond_projs[j]`` is added before block j + 2 there; here each block may add audio after
  itself, so projection j lives in block j + 1 (the same sum: nothing runs between two blocks);
- the modulation tables get the per-frame axis this project's blocks broadcast over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, StreamConfig, model_preset
from .model import AvatarDiT

# The LoRA of the published student: rank 128, alpha 64 (scale 0.5), on these linears of every block.
LORA_ALPHA = 64.0
LORA_TARGETS = tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo") + ("ffn.0", "ffn.2")
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


class ConversionError(ValueError):
    """A source file that does not match the published layout; the message names file, key and shapes."""


def _shape(t: torch.Tensor | tuple[int, ...]) -> list[int]:
    return list(t.shape) if isinstance(t, torch.Tensor) else list(t)


def audio_blocks(layers: int) -> tuple[int, int]:
    """The reference adds audio before blocks 2..layers // 2 (``max(layers // 2 - 1, 0)`` projections); in
    this project's terms (audio added after a block) that is after blocks 1..layers // 2 - 1."""
    n = max(layers // 2 - 1, 0)
    return (1, 1 + n) if n else (0, 0)


def published_config(dim: int, layers: int, heads: int, ffn_dim: int, text_dim: int, feature_dim: int,
                     token_dim: int, **overrides: Any) -> ModelConfig:
    """An ``avatarforcing-1.3b``-style configuration of the given sizes (the published one, or a replica)."""
    return model_preset("avatarforcing-1.3b", dim=dim, layers=layers, heads=heads, ffn_dim=ffn_dim,
                        text_dim=text_dim, audio_feature_dim=feature_dim, audio_token_dim=token_dim,
                        audio_layers=audio_blocks(layers), **overrides)


def source_key_table(cfg: ModelConfig, lora_rank: int = 128) -> dict[str, tuple[int, ...]]:
    """Every key of the published ``generator`` state dict (without its ``model.`` prefix) and its shape,
    for a configuration (the published student: 1,457 keys)."""
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.latent_channels
    pt, ph, pw = cfg.patch
    t: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_channels, pt, ph, pw), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (c * pt * ph * pw, d), "head.head.bias": (c * pt * ph * pw,),
        "audio_proj.proj.weight": (cfg.audio_token_dim, cfg.frames_per_latent * cfg.audio_feature_dim),
        "audio_proj.proj.bias": (cfg.audio_token_dim,),
        "audio_proj.norm_out.weight": (cfg.audio_token_dim,), "audio_proj.norm_out.bias": (cfg.audio_token_dim,),
    }
    a0, a1 = cfg.audio_layers
    for j in range(a1 - a0):
        t[f"audio_cond_projs.{j}.weight"] = (d, cfg.audio_token_dim)
        t[f"audio_cond_projs.{j}.bias"] = (d,)
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        t[b + "modulation"] = (1, 6, d)
        for name in LORA_TARGETS:
            cin, cout = (f, d) if name == "ffn.2" else (d, f) if name == "ffn.0" else (d, d)
            t[b + name + ".base_layer.weight"] = (cout, cin)
            t[b + name + ".base_layer.bias"] = (cout,)
            t[b + name + ".lora_A.default.weight"] = (lora_rank, cin)
            t[b + name + ".lora_B.default.weight"] = (cout, lora_rank)
        for a in ("self_attn", "cross_attn"):
            t[b + a + ".norm_q.weight"] = (d,)
            t[b + a + ".norm_k.weight"] = (d,)
        t[b + "norm3.weight"] = (d,)
        t[b + "norm3.bias"] = (d,)
    return t


def _our_linear(name: str) -> str:
    """Block-relative source name of a (LoRA-carrying) linear -> this project's."""
    attn, _, proj = name.partition(".")
    if attn == "self_attn":
        return proj
    if attn == "cross_attn":
        return "c" + proj
    return name  # ffn.0 / ffn.2


def strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops the ``model.`` prefix and FSDP's ``_fsdp_wrapped_module.`` from every key."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k2 = k.replace("_fsdp_wrapped_module.", "")
        k2 = k2[len("model."):] if k2.startswith("model.") else k2
        out[k2] = v
    return out


def infer_config(sd: Mapping[str, torch.Tensor], *, heads: int | None = None, file: str = "model.pt",
                 **overrides: Any) -> ModelConfig:
    """The configuration the published weights describe, read from their shapes. Heads cannot be read
    from the weights: Wan's heads are 128 wide (12 at 1.3B), so ``dim // 128`` unless given."""
    def need(k: str) -> torch.Tensor:
        if k not in sd:
            raise ConversionError(f"{file}: missing key model.{k}; is this the AvatarForcing student model.pt?")
        return sd[k]

    pe = need("patch_embedding.weight")
    if pe.dim() != 5:
        raise ConversionError(f"{file}: model.patch_embedding.weight has shape {_shape(pe)}, expected "
                              f"[dim, 33, 1, 2, 2] (a Conv3d)")
    dim, in_ch = int(pe.shape[0]), int(pe.shape[1])
    layers = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))), default=-1)
    ffn = int(need("blocks.0.ffn.0.base_layer.weight").shape[0])
    text_dim = int(need("text_embedding.0.weight").shape[1])
    freq_dim = int(need("time_embedding.0.weight").shape[1])
    token_dim, packed = (int(x) for x in need("audio_proj.proj.weight").shape)
    latent = int(need("head.head.weight").shape[0]) // 4
    if heads is None:
        if dim % 128:
            raise ConversionError(f"{file}: width {dim} is not a multiple of Wan's 128-wide heads: give --heads")
        heads = dim // 128
    if in_ch != 2 * latent + 1:
        raise ConversionError(f"{file}: model.patch_embedding.weight has {in_ch} input channels, expected "
                              f"{2 * latent + 1} (noisy latent, reference latent, mask)")
    return published_config(dim, layers, heads, ffn, text_dim, packed // 4, token_dim, freq_dim=freq_dim,
                            latent_channels=latent, **overrides)


def convert_dit(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, *, file: str = "model.pt",
                lora_alpha: float = LORA_ALPHA) -> dict[str, torch.Tensor]:
    """The published ``generator`` state dict (wrappers stripped) -> an ``AvatarDiT`` state dict, LoRA merged.

    Works on any device, the meta device included. Raises ``ConversionError`` (one line: file, key, shapes)
    unless every key of ``source_key_table(cfg)`` is present with its shape and nothing else is.
    """
    src = dict(sd)
    rank = int(src["blocks.0.self_attn.q.lora_A.default.weight"].shape[0]) \
        if "blocks.0.self_attn.q.lora_A.default.weight" in src else 128
    table = source_key_table(cfg, rank)
    for k, shape in table.items():
        if k not in src:
            raise ConversionError(f"{file}: missing key model.{k} (expected shape {list(shape)})")
        if tuple(src[k].shape) != shape:
            raise ConversionError(f"{file}: model.{k} has shape {_shape(src[k])}, expected {list(shape)} "
                                  f"(a checkpoint of other sizes than {cfg.name} dim {cfg.dim}?)")
    extra = sorted(set(src) - set(table))
    if extra:
        raise ConversionError(f"{file}: unexpected key model.{extra[0]} with shape {_shape(src[extra[0]])}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    used: set[str] = set()

    def take(k: str) -> torch.Tensor:
        if k in used:  # a bug in this table, never the user's: fail loudly
            raise AssertionError(f"source key {k} consumed twice")
        used.add(k)
        return src[k].float()

    scale = lora_alpha / rank  # PEFT's scaling of B A
    out: dict[str, torch.Tensor] = {}
    w = take("patch_embedding.weight")
    out["patch_embedding.weight"] = w.reshape(w.shape[0], -1)
    out["patch_embedding.bias"] = take("patch_embedding.bias")
    for mod in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        for p in ("weight", "bias"):
            out[f"{mod}.{p}"] = take(f"{mod}.{p}")
    out["head_modulation"] = take("head.modulation")[:, None]
    # Head rows: source (ph, pw, c), ours (c, ph, pw).
    c = cfg.latent_channels
    _, ph, pw = cfg.patch
    perm = torch.arange(c * ph * pw).reshape(ph, pw, c).permute(2, 0, 1).reshape(-1)
    out["head.weight"] = take("head.head.weight")[perm.to(src["head.head.weight"].device)]
    out["head.bias"] = take("head.head.bias")[perm.to(src["head.head.bias"].device)]
    out["audio_token.0.weight"] = take("audio_proj.proj.weight")
    out["audio_token.0.bias"] = take("audio_proj.proj.bias")
    out["audio_token.1.weight"] = take("audio_proj.norm_out.weight")
    out["audio_token.1.bias"] = take("audio_proj.norm_out.bias")
    a0, a1 = cfg.audio_layers
    for j in range(a1 - a0):
        out[f"blocks.{a0 + j}.audio_proj.weight"] = take(f"audio_cond_projs.{j}.weight")
        out[f"blocks.{a0 + j}.audio_proj.bias"] = take(f"audio_cond_projs.{j}.bias")
    for i in range(cfg.layers):
        b = f"blocks.{i}."
        out[b + "modulation"] = take(b + "modulation")[:, None]
        for name in LORA_TARGETS:
            base = take(b + name + ".base_layer.weight")
            lora_a, lora_b = take(b + name + ".lora_A.default.weight"), take(b + name + ".lora_B.default.weight")
            ours = b + _our_linear(name)
            out[ours + ".weight"] = base + scale * (lora_b @ lora_a)
            out[ours + ".bias"] = take(b + name + ".base_layer.bias")
        out[b + "norm_q.weight"] = take(b + "self_attn.norm_q.weight")
        out[b + "norm_k.weight"] = take(b + "self_attn.norm_k.weight")
        out[b + "norm_cq.weight"] = take(b + "cross_attn.norm_q.weight")
        out[b + "norm_ck.weight"] = take(b + "cross_attn.norm_k.weight")
        out[b + "norm3.weight"] = take(b + "norm3.weight")
        out[b + "norm3.bias"] = take(b + "norm3.bias")
    assert used == set(table), sorted(set(table) - used)[:3]
    return out


def read_student(path: str | Path, *, ema: bool | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The DiT state dict of a published ``model.pt``: ``generator`` (or ``generator_ema``, or whichever one
    exists when ``ema`` is None, preferring the EMA), wrappers stripped. Returns (state dict, which key)."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"{p}: no such file (the student checkpoint model.pt)")
    try:
        try:  # memory-mapped: the 1.6 B-parameter file is not read into memory twice
            obj = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(p), map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except Exception as e:  # truncated, not a torch file, pickled code
        raise ConversionError(f"{p}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{p}: holds a {type(obj).__name__}, expected a dict with 'generator'")
    keys = ["generator_ema", "generator"] if ema is None else (["generator_ema"] if ema else ["generator"])
    for k in keys:
        if k in obj and isinstance(obj[k], Mapping):
            return strip_wrappers(obj[k]), k
    raise ConversionError(f"{p}: has no {' or '.join(repr(k) for k in keys)} state dict "
                          f"(top-level keys: {sorted(map(str, obj))[:6]})")


@dataclass(frozen=True)
class ConvertReport:
    out: Path
    model_cfg: ModelConfig
    generator_key: str
    source_keys: int
    parameters: int
    bytes: int


def published_stream() -> StreamConfig:
    """The published stream: blocks of 4 latent frames (16 video frames), a window of 4 blocks at
    t = [555.6, 769.2, 952.4, 1000] (steps 200..1000 with shift 5), 2 clean history frames."""
    return StreamConfig(block_frames=4, window_blocks=4, level_steps=(200, 400, 800, 1000), shift=5.0,
                        history_frames=2)


def parse_resolution(text: str) -> tuple[int, int]:
    """'480x832' -> (480, 832), height x width (the published model: 480x832 or 832x480)."""
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution {text!r}: write HEIGHTxWIDTH, e.g. 480x832 or 832x480") from None
    return h, w


def convert(student: str | Path, vae: str | Path, wav2vec: str | Path, context: str | Path, out: str | Path, *,
            ema: bool | None = None, heads: int | None = None, lora_alpha: float = LORA_ALPHA,
            resolution: tuple[int, int] = (480, 832), dtype: torch.dtype = torch.bfloat16) -> ConvertReport:
    """The published files -> one checkpoint of this project (see the module's docstring).

    ``ema``: take ``generator_ema`` (True), ``generator`` (False) or whichever exists, preferring the EMA
    (None). Raises ``ConversionError`` / ``ValueError`` with one line naming the file and key.
    """
    from .checkpoint import save_published
    from .text_context import load_context
    from .wan_vae import load_wan_vae
    from .wav2vec import Wav2VecFeatures

    sd, which = read_student(student, ema=ema)
    name = Path(student).name
    h, w = resolution
    cfg = infer_config(sd, heads=heads, file=name, height=h, width=w)
    dit = convert_dit(sd, cfg, file=name, lora_alpha=lora_alpha)
    n_src = len(sd)
    del sd
    with torch.device("meta"):  # the layout is checked against the model itself, not only the table
        AvatarDiT(cfg).load_state_dict(dit, strict=True, assign=True)
    wan = load_wan_vae(vae)
    if wan.config.z_dim != cfg.latent_channels:
        raise ConversionError(f"{Path(vae).name}: the VAE has {wan.config.z_dim} latent channels, {name} "
                              f"takes {cfg.latent_channels}")
    w2v = Wav2VecFeatures.from_folder(wav2vec)
    if w2v.feature_dim != cfg.audio_feature_dim:
        raise ConversionError(f"{wav2vec}: wav2vec2 gives {w2v.feature_dim} features per video frame, {name}'s "
                              f"audio_proj.proj takes {cfg.frames_per_latent} x {cfg.audio_feature_dim}")
    ctx = load_context(context, text_len=cfg.text_len, text_dim=cfg.text_dim)
    meta = {"source": {"student": str(Path(student).resolve()), "generator_key": which, "vae": str(Path(vae).resolve()),
                       "wav2vec": str(Path(wav2vec).resolve()), "context": str(Path(context).resolve())},
            "lora_alpha": lora_alpha}
    size = save_published(out, dit, cfg, published_stream(), wan, w2v, ctx, meta, dtype)
    return ConvertReport(Path(out), cfg, which, n_src, sum(v.numel() for v in dit.values()), size)
