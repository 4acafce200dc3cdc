"""Configuration objects: one per concern (model, stream), validated at construction.

Sizes are configuration: the same code runs the ``tiny`` preset on a CPU and the ``wan-1.3b``
preset (the reference dimensions of ../shared/ALGORITHM.md) on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """The denoising transformer, its autoencoder and its audio front end."""

    name: str = "tiny"
    # Video and latent geometry.
    height: int = 128
    width: int = 128
    fps: float = 25.0
    latent_channels: int = 16
    vae_stride: tuple[int, int, int] = (4, 8, 8)  # (time, height, width)
    patch: tuple[int, int, int] = (1, 2, 2)
    # Transformer.
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn_dim: int = 512
    freq_dim: int = 256  # sinusoidal timestep embedding width
    rope_theta: float = 10000.0
    eps: float = 1e-6
    # Text cross-attention (Wan's umT5 context); 0 disables it. No text encoder ships with
    # the project: the context is a learned constant ("null prompt") computed once.
    text_dim: int = 0
    text_len: int = 0
    # Audio: log-mel front end over raw 16 kHz PCM, one feature vector per video frame.
    audio_sample_rate: int = 16000
    n_mels: int = 40
    audio_feature_dim: int = 128  # per video frame, after the learned front end
    audio_token_dim: int = 32  # per latent frame (4 video frames packed), Linear + LayerNorm
    audio_layers: tuple[int, int] = (1, 3)  # [start, end): blocks whose residual gets audio
    # Tiny autoencoder (the wan-1.3b preset uses the same class at its sizes for timing).
    vae_channels: tuple[int, ...] = (24, 48, 64)
    # Where the per-video-frame audio features come from: "logmel" (the learned log-mel front end inside
    # the transformer, the project's own models) or "wav2vec2" (the published model: transformers'
    # wav2vec2, 14 hidden states per frame, computed by ``avatarforcing.wav2vec`` beside the transformer).
    audio_source: str = "logmel"
    # The style anchor's audio token: "zero" (a zero token: what the project's models are trained with)
    # or "zero_features" (the token of all-zero features, LayerNorm(proj(0)): what the reference computes).
    anchor_audio: str = "zero"
    # The text context: "learned" (a learned constant stands in for a prompt; no text encoder) or
    # "external" (a umT5 context [text_len, text_dim] from ``avatarforcing encode-prompt``, carried by the
    # checkpoint as its default and attachable per avatar).
    text_context: str = "learned"
    # The autoencoder: "tiny" (``vae.TinyAutoencoder``) or "wan" (``wan_vae.WanVAE``, Wan2.1's causal VAE).
    vae: str = "tiny"

    def __post_init__(self) -> None:
        _check(self.dim % self.heads == 0, f"dim {self.dim} must be divisible by heads {self.heads}")
        _check(self.head_dim % 2 == 0, "head_dim must be even (RoPE rotates pairs)")
        _check(all(s % 2 == 0 for s in self.rope_split), f"RoPE split {self.rope_split} must be even")
        st, sh, sw = self.vae_stride
        _check(self.height % (sh * self.patch[1]) == 0 and self.width % (sw * self.patch[2]) == 0,
               f"{self.height}x{self.width} must be divisible by stride*patch "
               f"{sh * self.patch[1]}x{sw * self.patch[2]}")
        _check(self.patch[0] == 1, "temporal patch must be 1 (one latent frame per token row)")
        _check(0 <= self.audio_layers[0] <= self.audio_layers[1] <= self.layers,
               f"audio_layers {self.audio_layers} must lie within [0, {self.layers}]")
        _check(self.audio_sample_rate % int(self.fps) == 0 and float(int(self.fps)) == self.fps,
               "audio_sample_rate must be a whole multiple of an integral fps")
        _check((self.text_dim == 0) == (self.text_len == 0), "text_dim and text_len are both 0 or both > 0")
        _check(self.audio_source in ("logmel", "wav2vec2"), f"audio_source {self.audio_source!r}: logmel | wav2vec2")
        _check(self.anchor_audio in ("zero", "zero_features"),
               f"anchor_audio {self.anchor_audio!r}: zero | zero_features")
        _check(self.text_context in ("learned", "external"), f"text_context {self.text_context!r}: learned | external")
        _check(self.text_context == "learned" or self.text_len > 0, "an external text context needs text_len > 0")
        _check(self.vae in ("tiny", "wan"), f"vae {self.vae!r}: tiny | wan")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head dim split time/height/width (Wan: 44/42/42 for 128)."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def in_channels(self) -> int:
        """Noisy latent + reference latent + mask."""
        return 2 * self.latent_channels + 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    @property
    def tokens_hw(self) -> tuple[int, int]:
        lh, lw = self.latent_hw
        return lh // self.patch[1], lw // self.patch[2]

    @property
    def tokens_per_frame(self) -> int:
        th, tw = self.tokens_hw
        return th * tw

    @property
    def frames_per_latent(self) -> int:
        return self.vae_stride[0]

    @property
    def samples_per_frame(self) -> int:
        return self.audio_sample_rate // int(self.fps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        _check(not unknown, f"unknown model config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def shift_sigma(s: float, shift: float) -> float:
    """Flow-matching timestep shift: sigma' = shift*s / (1 + (shift-1)*s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclass(frozen=True)
class StreamConfig:
    """The sliding window of one stream.

    ``mode="avatarforcing"``: L blocks at heterogeneous noise levels, one pass per step, the
    oldest block emitted. ``mode="ar"``: the autoregressive-forcing baseline, one block at a
    time from pure noise, conditioned on clean history only (no local future).
    """

    mode: Literal["avatarforcing", "ar"] = "avatarforcing"
    block_frames: int = 1  # B, latent frames per block
    window_blocks: int = 4  # L
    # Denoising steps (of `num_train_steps`) for each window slot, oldest to newest, before
    # the shift; the reference uses [200, 400, 800, 1000].
    level_steps: tuple[int, ...] = (200, 400, 800, 1000)
    num_train_steps: int = 1000
    shift: float = 5.0
    history_frames: int = 2  # clean latent frames kept as the temporal anchor
    # RoPE positions. "relative" (ours): the anchor sits just before the history, the history just before
    # the window, in every pass, so a stream runs for hours at constant cost. "reference": the published
    # code's positions, for comparison: the anchor just before the first cached frame in a window pass, but
    # at absolute position 0 in the clean-block pass (its distance grows with the stream, and the
    # reference's 1,024-entry table ends after about 163 s).
    positions: Literal["relative", "reference"] = "relative"

    def __post_init__(self) -> None:
        _check(self.mode in ("avatarforcing", "ar"), f"unknown stream mode {self.mode!r}")
        _check(self.block_frames >= 1 and self.window_blocks >= 1, "block_frames and window_blocks >= 1")
        _check(len(self.level_steps) == self.window_blocks,
               f"level_steps has {len(self.level_steps)} entries for {self.window_blocks} window blocks")
        _check(list(self.level_steps) == sorted(self.level_steps), "level_steps must increase (oldest first)")
        _check(self.level_steps[-1] == self.num_train_steps, "the newest slot must be pure noise")
        _check(self.level_steps[0] > 0, "the oldest slot must still carry noise (it is denoised this step)")
        _check(self.history_frames >= 0, "history_frames >= 0")
        _check(self.positions in ("relative", "reference"), f"positions {self.positions!r}: relative | reference")
        if self.mode == "ar":
            _check(self.window_blocks == 1, "mode 'ar' uses a window of one block (no local future)")

    @classmethod
    def ar_baseline(cls, block_frames: int = 1, history_frames: int = 2) -> StreamConfig:
        return cls(mode="ar", block_frames=block_frames, window_blocks=1, level_steps=(1000,),
                   history_frames=history_frames)

    @property
    def levels(self) -> tuple[float, ...]:
        """Noise level (sigma in [0, 1]) of each window slot, oldest to newest."""
        return tuple(shift_sigma(s / self.num_train_steps, self.shift) for s in self.level_steps)

    @property
    def window_frames(self) -> int:
        return self.block_frames * self.window_blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamConfig:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    # The reference dimensions (Wan2.1-T2V-1.3B style) at 480x832.
    "wan-1.3b": ModelConfig(
        name="wan-1.3b", height=480, width=832, latent_channels=16, dim=1536, layers=30, heads=12,
        ffn_dim=8960, text_dim=4096, text_len=512, n_mels=80, audio_feature_dim=768,
        audio_token_dim=32, audio_layers=(2, 16), vae_channels=(128, 256, 512),
    ),
    # The published AvatarForcing student (Wan2.1-T2V-1.3B + LoRA) exactly: wav2vec2-base features
    # (14 x 768 per video frame) packed 4 frames -> 32 per latent frame, added before blocks 2..15
    # (= after blocks 1..14), the anchor's token from zero features, umT5 text context, Wan's VAE.
    # `avatarforcing convert` writes checkpoints of it from the published files (avatarforcing/published.py).
    "avatarforcing-1.3b": ModelConfig(
        name="avatarforcing-1.3b", height=480, width=832, latent_channels=16, dim=1536, layers=30, heads=12,
        ffn_dim=8960, text_dim=4096, text_len=512, audio_feature_dim=14 * 768, audio_token_dim=32,
        audio_layers=(1, 15), audio_source="wav2vec2", anchor_audio="zero_features", text_context="external",
        vae="wan", vae_channels=(128, 256, 512),  # vae_channels: the small decoder (`serve --decoder tiny`)
    ),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.max_sessions >= 1, "max_sessions >= 1")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}")


def dumps(*cfgs: Any) -> str:
    return json.dumps({type(c).__name__: dataclasses.asdict(c) for c in cfgs}, sort_keys=True)
