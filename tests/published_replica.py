"""Small random replicas of the published AvatarForcing files, in exactly their layout.

The module tree below is built from the facts of ../shared/REFERENCE-CHECKPOINT.md (Wan's module names,
the audio modules, the 33-channel patch embedding), NOT from ``avatarforcing.published``'s key table, and
the LoRA is injected by peft itself, so its key strings and nesting are peft's. The converter is then
checked against what these produce; a mistake in either shows up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

TARGETS = r".*blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.0|ffn\.2)"


class _Norm(nn.Module):  # Wan's RMSNorm / LayerNorm: only a weight (and a bias) as state
    def __init__(self, d: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        if bias:
            self.bias = nn.Parameter(torch.zeros(d))


class _Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = _Norm(d), _Norm(d)


class _Block(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.self_attn = _Attn(d)
        self.norm3 = _Norm(d, bias=True)
        self.cross_attn = _Attn(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, d))


class _Head(nn.Module):
    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.head = nn.Linear(d, out)


class _AudioPack(nn.Module):
    def __init__(self, cin: int, token: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, token)
        self.norm_out = nn.LayerNorm(token)


class ReferenceLayout(nn.Module):
    """Wan2.1's WanModel names plus AvatarForcing's audio modules; parameters only, no forward."""

    def __init__(self, *, dim: int, layers: int, ffn: int, text_dim: int, feature_dim: int, token: int = 32,
                 freq_dim: int = 256, latent: int = 16) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(2 * latent + 1, dim, (1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(_Block(dim, ffn) for _ in range(layers))
        self.head = _Head(dim, latent * 4)
        self.audio_proj = _AudioPack(4 * feature_dim, token)
        self.audio_cond_projs = nn.ModuleList(nn.Linear(token, dim) for _ in range(max(layers // 2 - 1, 0)))


def with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """peft's own injection, adapter "default", B initialised non-zero so that a lost merge shows."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    return inject_adapter_in_model(cfg, model)


def randomize(model: nn.Module, seed: int) -> None:
    """Every parameter random at a moderate scale (norm weights about 1), so no key can be mixed up unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight", "norm_out.weight")):
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(r * (0.5 / max(p.shape[-1], 1) ** 0.5) if p.dim() > 1 else 0.1 * r)


TINY = dict(dim=256, layers=6, ffn=384, text_dim=48, feature_dim=128, token=32)  # 2 heads of Wan's 128
TINY_RANK, TINY_ALPHA = 16, 8.0  # scale 0.5, as published (128, 64)


def tiny_student(seed: int = 0, **sizes: int) -> nn.Module:
    m = ReferenceLayout(**{**TINY, **sizes})
    m = with_lora(m, TINY_RANK, TINY_ALPHA)
    randomize(m, seed)
    return m


def student_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """As the published model.pt stores it: under the ``model.`` prefix."""
    return {f"model.{k}": v.detach().clone() for k, v in m.state_dict().items()}


def write_student(path: Path, m: nn.Module, key: str = "generator", dtype: torch.dtype = torch.float32) -> Path:
    torch.save({key: {k: v.to(dtype) for k, v in student_state(m).items()}}, path)
    return path


# ---- the other published files, tiny -------------------------------------------------------------------
TINY_W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)  # 32*(2+2) = 128


def write_vae(path: Path, seed: int = 0, dim: int = 8) -> Path:
    """A Wan2.1_VAE.pth of Wan's keys (avatarforcing.wan_vae's module has exactly them: tests/test_wan_vae.py
    proves that against diffusers' conversion), random weights, smaller width."""
    from avatarforcing.wan_vae import WanVAE, WanVAEConfig

    torch.manual_seed(seed)
    vae = WanVAE(WanVAEConfig(dim=dim))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    torch.save(vae.state_dict(), path)
    return path


def write_wav2vec(folder: Path, seed: int = 0) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(seed)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_W2V)).save_pretrained(folder)  # type: ignore[arg-type]
    return folder


def write_context(path: Path, text_dim: int = TINY["text_dim"], tokens: int = 9, seed: int = 0) -> Path:
    from avatarforcing.text_context import save_context

    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(512, text_dim)
    ctx[:tokens] = torch.randn(tokens, text_dim, generator=g)
    save_context(path, ctx, "a person talking", tokens)
    return path


def write_published(folder: Path, seed: int = 0, key: str = "generator_ema") -> dict[str, Path]:
    """The four inputs of `avatarforcing convert`, tiny, in the published layouts."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"student": write_student(folder / "model.pt", tiny_student(seed), key=key),
            "vae": write_vae(folder / "Wan2.1_VAE.pth", seed),
            "wav2vec": write_wav2vec(folder / "wav2vec2-base-960h", seed),
            "context": write_context(folder / "prompt.safetensors", seed=seed)}
