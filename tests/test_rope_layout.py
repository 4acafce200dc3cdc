"""The half-split RoPE layout: an exact re-parametrisation of the q/k projections, done once at load.

The published weights rotate interleaved pairs (dimensions 2i, 2i+1 of a head); permuting the q/k rows so that
pair i is (i, i + head_dim/2) lets the rotation read two contiguous halves. Nothing the model computes may
change, and its state dict stays in the published layout.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from avatarforcing import model_preset
from avatarforcing.model import AvatarDiT, Block, Prefix
from avatarforcing.rope import RopeTable, half_split_permutation, rotate

CFG = model_preset("tiny", text_dim=32, text_len=8, layers=3, audio_layers=(1, 2))


def test_permutation_takes_interleaved_pairs_to_halves() -> None:
    perm = half_split_permutation(2, 8)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert sorted(perm.tolist()) == list(range(16))


def test_half_split_rotation_is_the_interleaved_one_permuted() -> None:
    torch.manual_seed(0)
    heads, hd = 3, 16
    x = torch.randn(2, 5, heads, hd, dtype=torch.float64)
    ang = torch.rand(5, hd // 2, dtype=torch.float64) * 6
    cos, sin = ang.cos(), ang.sin()
    within = half_split_permutation(1, hd)
    ref = rotate(x, cos, sin)
    out = rotate(x[..., within], cos, sin, half_split=True)
    torch.testing.assert_close(out, ref[..., within], rtol=0, atol=1e-12)
    # and the permutation matters: the half-split rotation of unpermuted input is another function
    assert (rotate(x, cos, sin, half_split=True) - ref).abs().max() > 0.1


def _inputs(cfg, n: int = 2, f: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    lh, lw = cfg.latent_hw
    lat = torch.randn(n, f, cfg.latent_channels, lh, lw, generator=g)
    ref = torch.randn(n, cfg.latent_channels, lh, lw, generator=g)
    sigma = torch.rand(n, f, generator=g)
    audio = torch.randn(n, f, cfg.audio_token_dim, generator=g)
    m = 2 * cfg.tokens_per_frame
    prefix = [Prefix(torch.randn(n, m, cfg.heads, cfg.head_dim, generator=g),
                     torch.randn(n, m, cfg.heads, cfg.head_dim, generator=g)) for _ in range(cfg.layers)]
    return lat, sigma, ref, audio, prefix


def test_model_computes_the_same_in_either_layout_and_keeps_its_state_dict() -> None:
    torch.manual_seed(0)
    a = AvatarDiT(CFG).eval()
    b = copy.deepcopy(a)
    sd0 = {k: v.clone() for k, v in a.state_dict().items()}
    b.set_half_split_rope(True)
    assert b.half_split_rope and not a.half_split_rope
    # the rows really moved ...
    assert not torch.equal(cast_block(b, 0).q.weight, cast_block(a, 0).q.weight)
    # ... but the state dict is the published (interleaved) layout, bit for bit
    sd1 = b.state_dict()
    assert sd1.keys() == sd0.keys() and all(torch.equal(sd1[k], sd0[k]) for k in sd0)

    lat, sigma, ref, audio, prefix = _inputs(CFG)
    rope = RopeTable(CFG, [3, 4], "cpu", torch.float32)
    prope = RopeTable(CFG, [0, 1], "cpu", torch.float32)
    within = half_split_permutation(1, CFG.head_dim)
    # The cached (un-rotated) prefix keys are in each model's own layout: the half-split model's are permuted.
    prefix_b = [Prefix(p.k[..., within], p.v) for p in prefix]
    with torch.no_grad():
        fa, kva = a(lat, sigma, ref, audio, rope, prefix=prefix, prefix_rope=prope)
        fb, kvb = b(lat, sigma, ref, audio, rope, prefix=prefix_b, prefix_rope=prope)
    torch.testing.assert_close(fb, fa, rtol=1e-5, atol=1e-5)
    for (ka, va), (kb, vb) in zip(kva, kvb, strict=True):
        torch.testing.assert_close(kb, ka[..., within], rtol=1e-5, atol=1e-6)  # keys: permuted
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)  # values: untouched


def cast_block(m: AvatarDiT, i: int) -> Block:
    blk = m.blocks[i]
    assert isinstance(blk, Block)
    return blk


def test_layout_round_trips_exactly_and_loads_published_weights() -> None:
    torch.manual_seed(1)
    a = AvatarDiT(CFG)
    w0 = {k: v.clone() for k, v in a.named_parameters()}
    a.set_half_split_rope(True)
    a.set_half_split_rope(True)  # a no-op, not a second permutation
    moved = cast_block(a, 1).k.weight.clone()
    # Loading published (interleaved) weights into a half-split model lands them in its layout.
    b = AvatarDiT(CFG)
    b.set_half_split_rope(True)
    b.load_state_dict({k: v for k, v in w0.items()}, strict=False)
    assert torch.equal(cast_block(b, 1).k.weight, moved)
    a.set_half_split_rope(False)
    assert all(torch.equal(p, w0[k]) for k, p in a.named_parameters())


def test_a_block_without_plain_qk_parameters_is_refused() -> None:
    blk = cast_block(AvatarDiT(CFG), 0)
    blk.q = nn.Sequential(blk.q)  # stands for a quantized projection: its weight is no longer "q.weight"
    with pytest.raises(ValueError, match="before quantizing"):
        blk.set_half_split(True)
    assert not blk.half_split
