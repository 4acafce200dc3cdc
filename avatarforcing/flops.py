"""How much arithmetic a streaming step does: floating-point operations counted from the shapes.

A multiply-add counts as two operations. Matrix products (the linear layers) and attention (the
two products Q K^T and P V) are counted; normalisations, RoPE, softmax and the other elementwise
work are memory traffic rather than arithmetic and are left out, as is the audio front end (under
0.1% at every size). ``tests/test_flops.py`` checks the count against PyTorch's own operation
counter on a real pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, StreamConfig


@dataclass(frozen=True)
class PassFlops:
    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def __add__(self, other: PassFlops) -> PassFlops:
        return PassFlops(self.linear + other.linear, self.attention + other.attention)

    def scaled(self, k: float) -> PassFlops:
        return PassFlops(self.linear * k, self.attention * k)


def pass_flops(cfg: ModelConfig, query_frames: int, prefix_frames: int, batch: int = 1) -> PassFlops:
    """One transformer pass over ``query_frames`` latent frames attending to ``prefix_frames`` more.

    Cross-attention keys/values of the (constant) text context are computed once per model, not
    per pass, and are not counted.
    """
    d, p = cfg.dim, cfg.tokens_per_frame
    nq = query_frames * p
    nk = (prefix_frames + query_frames) * p
    per_layer_linear = nq * (4 * d * d + 2 * d * cfg.ffn_dim) * 2  # q, k, v, o and the FFN
    per_layer_attn = 4 * nq * nk * d
    if cfg.text_len > 0:
        per_layer_linear += nq * 2 * d * d * 2  # cross-attention query and output projections
        per_layer_attn += 4 * nq * cfg.text_len * d
    a0, a1 = cfg.audio_layers
    audio = (a1 - a0) * query_frames * cfg.audio_token_dim * d * 2
    pt, ph, pw = cfg.patch
    patch_in = cfg.in_channels * pt * ph * pw
    patch_out = cfg.latent_channels * pt * ph * pw
    io = nq * (patch_in + patch_out) * d * 2
    time = query_frames * (cfg.freq_dim * d + d * d + 6 * d * d) * 2
    linear = cfg.layers * per_layer_linear + audio + io + time
    return PassFlops(float(linear * batch), float(cfg.layers * per_layer_attn * batch))


def decoder_flops(cfg: ModelConfig, latent_frames: int) -> float:
    """The autoencoder's decoder (``vae.TinyAutoencoder``) on ``latent_frames`` latent frames."""
    lh, lw = cfg.latent_hw
    ch = cfg.vae_channels
    st = cfg.vae_stride[0]
    total = 0.0
    hw = lh * lw
    total += hw * 9 * (cfg.latent_channels * ch[-1] + ch[-1] * ch[-1])
    cin = ch[-1]
    for c in list(reversed(ch[:-1])) + [3 * st]:
        total += hw * 9 * cin * 4 * c
        hw *= 4
        cin = c
    return 2.0 * total * latent_frames


@dataclass(frozen=True)
class StepFlops:
    """One steady-state engine step for one session (every window block and history frame full)."""

    window: PassFlops  # the denoising pass over the L*B window frames
    clean: PassFlops  # the temporal-anchor pass over the emitted B frames
    decode: float  # decoding the emitted block
    frames: int  # video frames the step emits

    @property
    def denoise(self) -> float:
        return self.window.total + self.clean.total

    @property
    def total(self) -> float:
        return self.denoise + self.decode


def step_flops(cfg: ModelConfig, stream: StreamConfig) -> StepFlops:
    prefix = 1 + stream.history_frames  # style anchor + temporal history
    b = stream.block_frames
    return StepFlops(window=pass_flops(cfg, stream.window_frames, prefix),
                     clean=pass_flops(cfg, b, prefix),
                     decode=decoder_flops(cfg, b),
                     frames=b * cfg.frames_per_latent)
