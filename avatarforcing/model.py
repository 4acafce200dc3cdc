"""The denoising transformer (Wan2.1 style) with per-frame time modulation and audio injection.

One class serves every size (``ModelConfig``). A pass takes the query frames (the sliding
window, the anchor, or a clean block), optional prefix keys/values (style anchor + temporal
history, stored un-rotated) and returns the flow prediction for the query frames, and on
request each layer's un-rotated keys and values of the query tokens so that they can be cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .audio import AudioFrontEnd
from .config import ModelConfig
from .rope import RopeTable, half_split_permutation, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t (any shape, in [0, 1000]) -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """adaLN: LayerNorm without affine, then x * (1 + scale) + shift."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _heads_first(x: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """[n, N, heads, hd] -> [n, heads, N, hd], the attention kernels' layout (contiguous: also in memory)."""
    x = x.transpose(1, 2)
    return x.contiguous() if contiguous else x


def _rms_heads(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int, contiguous: bool) -> torch.Tensor:
    """RMSNorm over the width, split into heads: [n, N, d] -> [n, heads, N, hd]."""
    return _heads_first(_rms_norm(x, weight, eps).unflatten(-1, (heads, -1)), contiguous)


def _norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
               heads: int, keep_normed: bool, contiguous: bool,
               half_split: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """QK RMSNorm over the width, split into heads, rotate: (normed [n, N, h, hd] if asked for, rotated
    [n, h, N, hd]). ``half_split``: the heads' dimensions are in the half-split RoPE layout."""
    y = _rms_norm(x, weight, eps).unflatten(-1, (heads, -1))
    return (y if keep_normed else None), _heads_first(rotate(y, cos, sin, half_split), contiguous)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, contiguous: bool,
          half_split: bool = False) -> torch.Tensor:
    """Rotate stored un-rotated keys [n, M, h, hd] -> [n, h, M, hd]."""
    return _heads_first(rotate(x, cos, sin, half_split), contiguous)


def _residual_layer_norm(x: torch.Tensor, gate: torch.Tensor | None, delta: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add (gated: x + gate * delta) and the LayerNorm after it: (new x, its norm). Fused, the
    residual stream is read once for both instead of written by the add and read back by the norm."""
    y = x + delta if gate is None else torch.addcmul(x, gate, delta)
    return y, F.layer_norm(y, (y.shape[-1],), weight, bias, eps)


def _residual_modulated_norm(x: torch.Tensor, gate: torch.Tensor | None, delta: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add (gated or not) and the adaLN after it: (new x, modulated norm of it)."""
    y = x + delta if gate is None else torch.addcmul(x, gate, delta)
    return y, _modulated_norm(y, shift, scale, eps)


def _ffn(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return cast(torch.Tensor, ffn(x))


def _ffn_fused_gelu(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The FFN with its tanh GELU applied inside the first matrix product (cuBLASLt's epilogue on CUDA),
    so the wide hidden activation is written once instead of written, read and written again.

    Only on CUDA: the CPU's ``_addmm_activation`` applies the exact (erf) GELU, not the model's tanh one.
    """
    if not x.is_cuda or type(ffn[0]) is not nn.Linear or type(ffn[2]) is not nn.Linear:
        return _ffn(ffn, x)  # (also a quantized FFN: its own products)
    up, down = cast(nn.Linear, ffn[0]), cast(nn.Linear, ffn[2])
    h = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
    return down(h).reshape(*x.shape[:-1], down.out_features)


@dataclass(frozen=True)
class BlockOps:
    """The elementwise stages of a block: eager, or fused (``compiled_ops``)."""

    modulated_norm: Callable[..., torch.Tensor]
    rms_heads: Callable[..., torch.Tensor]
    norm_rope: Callable[..., tuple[torch.Tensor | None, torch.Tensor]]
    norm_rope_q: Callable[..., tuple[torch.Tensor | None, torch.Tensor]]  # the self-attention queries'
    rope: Callable[..., torch.Tensor]
    ffn: Callable[[nn.Sequential, torch.Tensor], torch.Tensor]
    residual_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    residual_modulated_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]


EAGER_OPS = BlockOps(_modulated_norm, partial(_rms_heads, contiguous=False), partial(_norm_rope, contiguous=False),
                     partial(_norm_rope, contiguous=False), partial(_rope, contiguous=False), _ffn,
                     _residual_layer_norm, _residual_modulated_norm)


@functools.cache
def _fused() -> dict[str, Callable[..., Any]]:
    """The elementwise stages compiled (once per process, for every shape: ``dynamic=True``), by name."""
    return {fn.__name__: torch.compile(fn, dynamic=True, fullgraph=True)
            for fn in (_modulated_norm, _rms_heads, _norm_rope, _rope, _residual_layer_norm, _residual_modulated_norm)}


@functools.cache
def compiled_ops(token_first_queries: bool = False) -> BlockOps:
    """The same stages fused: the norms, modulation and RoPE through ``torch.compile`` (one kernel per
    call, which also writes the attention inputs in the heads-first layout the cuDNN kernel runs fastest
    on; compiled once for every shape with ``dynamic=True``, so batch size and resolution cause no
    recompilation), the residual adds inside the norms that follow them, and the FFN's GELU inside its
    first matrix product.

    ``token_first_queries``: the self-attention queries are written token-first instead ([n, heads, N, d] views
    of [n, N, heads, d]). cuDNN's attention returns its output in the queries' layout, so the output projection
    then reads it without the transposing copy that heads-first queries cost (while cuDNN may run slower on
    them: ``avatarforcing bench --gpu`` measures both)."""
    f = _fused()
    return BlockOps(f["_modulated_norm"], partial(f["_rms_heads"], contiguous=True),
                    partial(f["_norm_rope"], contiguous=True),
                    partial(f["_norm_rope"], contiguous=not token_first_queries),
                    partial(f["_rope"], contiguous=True), _ffn_fused_gelu, f["_residual_layer_norm"],
                    f["_residual_modulated_norm"])


@dataclass
class Prefix:
    """Keys/values the query tokens attend to besides themselves, for one layer.

    k is un-rotated; the pass's ``prefix_rope`` rotates it to its positions. Which prefix tokens hold
    data (history frames are missing at the start of a stream) is the first M columns of the pass's
    ``key_mask``.
    """

    k: torch.Tensor  # [n, M, heads, head_dim]
    v: torch.Tensor


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, audio: bool) -> None:
        super().__init__()
        d = cfg.dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)
        self.cross = cfg.text_len > 0
        if self.cross:
            self.norm3 = nn.LayerNorm(d, eps=cfg.eps)
            self.cq, self.ck, self.cv, self.co = (nn.Linear(d, d) for _ in range(4))
            self.norm_cq, self.norm_ck = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, d) / d**0.5)
        self.audio_proj = nn.Linear(cfg.audio_token_dim, d) if audio else None
        # The RoPE layout of the q/k projections' rows (``set_half_split``); the state dict is always in the
        # interleaved layout of the published weights, whichever this block runs in.
        self.half_split = False
        self.register_state_dict_post_hook(Block._state_dict_interleaved)
        self.register_load_state_dict_pre_hook(Block._load_interleaved)

    # ---- the RoPE layout -----------------------------------------------------------------------
    _ROPE_ROWS = ("q.weight", "q.bias", "k.weight", "k.bias", "norm_q.weight", "norm_k.weight")

    def _permutation(self, device: torch.device) -> torch.Tensor:
        return half_split_permutation(self.heads, self.head_dim).to(device)

    @torch.no_grad()
    def set_half_split(self, on: bool) -> None:
        """Permutes the q/k projections' rows (and their RMSNorm weights) into the half-split RoPE layout
        (``on``) or back to the interleaved one, in place; a no-op if already there. The block computes the
        same function either way (``rope.half_split_permutation``); keys it returned before the switch are in
        the old layout and must not be mixed with those after it."""
        if on == self.half_split:
            return
        params = dict(self.named_parameters())
        for name in self._ROPE_ROWS:
            if name not in params:
                raise ValueError(f"cannot change the RoPE layout of a block whose {name} is not a plain "
                                 "parameter (a quantized block): change it before quantizing")
        for name in self._ROPE_ROWS:
            p = params[name]
            perm = self._permutation(p.device)
            p.copy_(p[perm] if on else p[torch.argsort(perm)])
        self.half_split = on

    @staticmethod
    def _state_dict_interleaved(module: nn.Module, sd: dict[str, Any], prefix: str, _meta: Any) -> None:
        blk = cast(Block, module)
        if blk.half_split:
            for name in Block._ROPE_ROWS:
                if prefix + name in sd:
                    t = sd[prefix + name]
                    sd[prefix + name] = t[torch.argsort(blk._permutation(t.device))]

    @staticmethod
    def _load_interleaved(module: nn.Module, sd: dict[str, Any], prefix: str, *_: Any) -> None:
        blk = cast(Block, module)
        if blk.half_split:
            for name in Block._ROPE_ROWS:
                if prefix + name in sd:
                    t = sd[prefix + name]
                    sd[prefix + name] = t[blk._permutation(t.device)]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's cross-attention keys and values of a text context [1, Lc, text width]."""
        return self._heads(self.norm_ck(self.ck(context))), self._heads(self.cv(context))

    def forward(self, x: torch.Tensor, e: torch.Tensor, rope: RopeTable, prefix: Prefix | None,
                prefix_rope: RopeTable | None, key_mask: torch.Tensor | None, audio: torch.Tensor | None,
                cross: tuple[torch.Tensor, torch.Tensor] | None, kv_keep: int | None = None,
                ops: BlockOps = EAGER_OPS) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x [n, F, P, d]; e [n, F, 6, d]; key_mask [n, M + F*P] bool or None (every key takes part).

        ``cross``: this block's cross-attention keys/values (``cross_kv``), computed once per context.
        ``kv_keep``: which un-rotated query keys/values to return: all (None), none (0) or the last k tokens.
        ``ops``: the elementwise stages (``EAGER_OPS`` or ``compiled_ops()``).
        """
        n, f, p, d = x.shape
        mod = (self.modulation + e).unsqueeze(3)  # [n, F, 6, 1, d]
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = mod.unbind(2)
        h = ops.modulated_norm(x, sh_a, sc_a, self.norm1.eps).reshape(n, f * p, d)
        # Attention inputs are [n, heads, tokens, hd]; keys/values kept for the cache are [n, tokens, heads, hd].
        hs = self.half_split
        _, q = ops.norm_rope_q(self.q(h), self.norm_q.weight, self.norm_q.eps, rope.cos, rope.sin, self.heads,
                               False, half_split=hs)
        k, kr = ops.norm_rope(self.k(h), self.norm_k.weight, self.norm_k.eps, rope.cos, rope.sin, self.heads,
                              kv_keep != 0, half_split=hs)
        v = self._heads(self.v(h))
        kv_out = None
        if kv_keep != 0:
            assert k is not None
            kv_out = (k, v) if kv_keep is None else (k[:, -kv_keep:], v[:, -kv_keep:])
        vt = v.transpose(1, 2)
        if prefix is not None:
            assert prefix_rope is not None
            kr = torch.cat([ops.rope(prefix.k, prefix_rope.cos, prefix_rope.sin, half_split=hs), kr], dim=2)
            vt = torch.cat([prefix.v.transpose(1, 2), vt], dim=2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        a = attend(q, kr, vt, mask)
        a = self.o(a.transpose(1, 2).reshape(n, f * p, d)).reshape(n, f, p, d)
        # Each residual add runs inside the norm that reads its result (ops.residual_*).
        if self.cross:
            assert cross is not None
            ck, cv = cross
            x, hn = ops.residual_layer_norm(x, g_a, a, self.norm3.weight, self.norm3.bias, self.norm3.eps)
            hq = ops.rms_heads(self.cq(hn.reshape(n, f * p, d)), self.norm_cq.weight, self.norm_cq.eps, self.heads)
            c = attend(hq, ck.expand(n, -1, -1, -1).transpose(1, 2), cv.expand(n, -1, -1, -1).transpose(1, 2))
            x, hf = ops.residual_modulated_norm(x, None, self.co(c.transpose(1, 2).reshape(n, f * p, d))
                                                .reshape(n, f, p, d), sh_f, sc_f, self.norm2.eps)
        else:
            x, hf = ops.residual_modulated_norm(x, g_a, a, sh_f, sc_f, self.norm2.eps)
        x = torch.addcmul(x, g_f, ops.ffn(self.ffn, hf))
        if self.audio_proj is not None and audio is not None:
            x = x + self.audio_proj(audio)[:, :, None, :]
        return x, kv_out


class AvatarDiT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pt, ph, pw = cfg.patch
        d = cfg.dim
        self.patch_embedding = nn.Linear(cfg.in_channels * pt * ph * pw, d)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.text_len > 0:
            self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                                nn.Linear(d, d))
            if cfg.text_context == "learned":
                # No text encoder ships with the project's models: a learned constant stands in for umT5's.
                self.null_context = nn.Parameter(torch.randn(1, cfg.text_len, cfg.text_dim) * 0.02)
        # The published model's features come from wav2vec2 beside the transformer (avatarforcing.wav2vec).
        self.audio_frontend = AudioFrontEnd(cfg) if cfg.audio_source == "logmel" else None
        # The compiled path's self-attention queries: heads-first (False) or token-first (``compiled_ops``).
        self.token_first_queries = False
        self.audio_token = nn.Sequential(
            nn.Linear(cfg.frames_per_latent * cfg.audio_feature_dim, cfg.audio_token_dim),
            nn.LayerNorm(cfg.audio_token_dim),
        )
        a0, a1 = cfg.audio_layers
        self.blocks = nn.ModuleList(Block(cfg, audio=a0 <= i < a1) for i in range(cfg.layers))
        self.head_norm = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 1, 2, d) / d**0.5)
        self.head = nn.Linear(d, cfg.latent_channels * pt * ph * pw)

    # ---- the RoPE layout -------------------------------------------------------------------
    @property
    def half_split_rope(self) -> bool:
        """Whether the blocks run RoPE on contiguous halves (``set_half_split_rope``)."""
        return all(cast(Block, b).half_split for b in self.blocks)

    def set_half_split_rope(self, on: bool = True) -> None:
        """Every block's q/k rows permuted (in place, exactly) into the half-split RoPE layout, or back: the
        rotation then reads two contiguous halves of each head instead of strided pairs, with no change to
        what the model computes or to its state dict. Keys cached from this model before the switch (a
        style anchor, a history) are in the old layout: switch before computing any."""
        for b in self.blocks:
            cast(Block, b).set_half_split(on)

    # ---- inputs -------------------------------------------------------------------------
    def audio_tokens(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [n, context + T*spf] (T a multiple of frames_per_latent) -> [n, T/4, audio_token_dim]
        (the log-mel front end; a wav2vec2 model packs features computed outside with ``pack_audio``)."""
        if self.audio_frontend is None:
            raise RuntimeError("this model takes wav2vec2 features (pack_audio), not raw audio")
        return self.pack_audio(self.audio_frontend(pcm))

    def pack_audio(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-video-frame features [n, T, Da] -> one token per latent frame [n, T/4, audio_token_dim]: the
        frames_per_latent rows concatenated (frame-major, feature fastest), Linear, LayerNorm."""
        n, t, da = feats.shape
        k = self.cfg.frames_per_latent
        return self.audio_token(feats.reshape(n, t // k, k * da))

    def anchor_audio_token(self) -> torch.Tensor:
        """The style anchor's audio token [1, 1, audio_token_dim]: zero, or the token of zero features
        (LayerNorm of the projection's bias, as the reference computes it), per ``cfg.anchor_audio``."""
        p = next(self.audio_token.parameters())
        if self.cfg.anchor_audio == "zero":
            return torch.zeros(1, 1, self.cfg.audio_token_dim, device=p.device, dtype=p.dtype)
        return self.pack_audio(torch.zeros(1, self.cfg.frames_per_latent, self.cfg.audio_feature_dim,
                                           device=p.device, dtype=p.dtype))

    def context(self, raw: torch.Tensor | None = None) -> torch.Tensor | None:
        """The embedded text context [1, text_len, dim]: of ``raw`` (a umT5 context [text_len, text_dim] or
        [1, text_len, text_dim], zero past the prompt), else the learned constant."""
        if self.cfg.text_len == 0:
            return None
        if raw is None:
            if self.cfg.text_context != "learned":
                raise ValueError("this model needs a text context (avatarforcing encode-prompt)")
            raw = self.null_context
        if raw.dim() == 2:
            raw = raw[None]
        p = cast(nn.Linear, self.text_embedding[0]).weight
        return self.text_embedding(raw.to(p.device, p.dtype))

    def cross_kv(self, context: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every block's cross-attention keys/values of ``context`` (default: the null prompt).

        The context is constant for a model, so a server computes these once instead of per pass.
        """
        if self.cfg.text_len == 0:
            return None
        ctx = self.context() if context is None else context
        assert ctx is not None
        return [cast(Block, blk).cross_kv(ctx) for blk in self.blocks]

    def cross_kv_of(self, raw: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """``cross_kv`` of a raw umT5 context (None: the model's learned constant)."""
        return self.cross_kv(self.context(raw))

    def patchify(self, lat: torch.Tensor, ref: torch.Tensor, mask_value: float) -> torch.Tensor:
        """lat [n, F, C, h, w], ref [n, C, h, w] -> tokens [n, F, P, dim]."""
        n, f, c, h, w = lat.shape
        _, ph, pw = self.cfg.patch
        y = ref[:, None].expand(n, f, c, h, w)
        m = lat.new_full((n, f, 1, h, w), mask_value)
        x = torch.cat([lat, y, m], dim=2)
        ci = x.shape[2]
        x = x.reshape(n, f, ci, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
        x = x.reshape(n, f, (h // ph) * (w // pw), ci * ph * pw)
        return self.patch_embedding(x)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n, f, p, _ = x.shape
        _, ph, pw = self.cfg.patch
        th, tw = self.cfg.tokens_hw
        c = self.cfg.latent_channels
        x = x.reshape(n, f, th, tw, c, ph, pw).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(n, f, c, th * ph, tw * pw)

    # ---- the pass -----------------------------------------------------------------------
    def forward(self, lat: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor | None,
                rope: RopeTable, *, prefix: list[Prefix] | None = None, prefix_rope: RopeTable | None = None,
                key_mask: torch.Tensor | None = None, mask_value: float = 1.0,
                context: torch.Tensor | None = None,
                cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                kv_keep: int | None = None, compiled: bool = False,
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Flow prediction (noise - x0) for the query frames.

        lat [n, F, C, h, w] noisy latents; sigma [n, F] noise level per frame in [0, 1];
        ref [n, C, h, w] reference latent; audio [n, F, audio_token_dim] or None (zero);
        prefix: per-layer keys/values of the anchor and history (or None);
        key_mask [n, M + F*P] True where a key takes part (or None: all);
        context / cross_kv: the text context, or its per-block keys/values (``cross_kv``), default
        the null prompt; kv_keep: which query keys/values to return per layer: all (None), none
        (0: an empty list) or those of the last k tokens; compiled: the blocks' elementwise stages fused
        (``compiled_ops``), else eager.
        Returns (flow [n, F, C, h, w], per-layer un-rotated (k, v) of the query tokens).
        """
        x = self.patchify(lat, ref, mask_value)
        e0 = self.time_embedding(timestep_embedding(sigma * 1000.0, self.cfg.freq_dim).to(x.dtype))
        n, f = sigma.shape
        e = self.time_projection(e0).reshape(n, f, 6, self.cfg.dim)
        if cross_kv is None:
            cross_kv = self.cross_kv(context)
        ops = compiled_ops(self.token_first_queries) if compiled else EAGER_OPS
        kvs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, e, rope, None if prefix is None else prefix[i], prefix_rope, key_mask, audio,
                        None if cross_kv is None else cross_kv[i], kv_keep, ops)
            if kv is not None:
                kvs.append(kv)
        sh, sc = (self.head_modulation + e0[:, :, None, :]).unsqueeze(3).unbind(2)
        out = self.head(torch.addcmul(sh, self.head_norm(x), 1 + sc))
        return self.unpatchify(out), kvs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
