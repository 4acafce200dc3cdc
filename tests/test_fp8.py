"""FP8 (e4m3) matrix products (avatarforcing/fp8.py) and their stated error against the unquantized engine.

On the CPU both ways of computing an FP8Linear run (``torch._scaled_mm``'s CPU kernel and the float32 emulation),
so they are checked against each other here; the error against bfloat16 is measured at reduced size on a random
model with every kind of block linear (text cross-attention included) and on the shipped, trained tiny model.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from avatarforcing import StreamConfig, StreamEngine, model_preset
from avatarforcing import fp8 as fp8mod
from avatarforcing.checkpoint import load_default
from avatarforcing.fp8 import DEFAULT_TARGETS, FP8Linear, fp8_error, fused_quantize_rows, quantize_blocks, quantize_rows
from avatarforcing.fp8_bench import compare_fp8
from avatarforcing.model import AvatarDiT
from avatarforcing.rope import RopeTable
from avatarforcing.vae import TinyAutoencoder
from service.config import ConfigError, ServerConfig

# A reduced model with every linear the 1.3B one has (self- and cross-attention, FFN, audio), small enough that a
# bf16-vs-fp8 pair of engines runs in a few seconds on a CPU.
CFG = model_preset("tiny", height=64, width=64, text_dim=32, text_len=8, layers=2, audio_layers=(1, 2))
STREAM = StreamConfig(block_frames=2, window_blocks=2, level_steps=(500, 1000))

# FP8Linear against float32 nn.Linear: relative L2 error of the output. e4m3 keeps 3 mantissa bits, so one element
# rounds by up to 2^-4 of itself; a product sums many such errors of both operands, which partly cancel.
LINEAR_REL_TOL = 2**-4  # measured: 0.036 (Linear(256, 384), Gaussian input), the same through either backend
# The engine, bf16 vs bf16 + FP8, same model, avatar, audio and noise (compare_fp8). Random reduced model, 5 steps:
RANDOM_LATENT_REL_TOL = 0.01  # measured: 0.0039-0.0041 (seeds 0-2), the largest latent frame 0.0043
RANDOM_PSNR_MIN_DB = 60.0  # measured: 71.7 dB the lowest frame (its random decoder's frames span only ~25 levels)
# The shipped trained tiny model with the bundled face, 5 steps: the trained weights' wider ranges cost more.
TRAINED_LATENT_REL_TOL = 0.05  # measured: 0.021-0.024 over all latent frames (seeds 0-1), 0.025 the largest frame
TRAINED_PSNR_MIN_DB = 45.0  # measured: 52.6-53.1 dB mean, 51.8 dB the lowest frame, 4-6 levels the largest change
# FP8 attention, emulated (attention.emulate_fp8: e4m3 q/k/v per head, probabilities in e4m3), on the same trained
# model, 8 steps: attention alone latents 0.0201 (largest frame 0.0215), 53.0 dB mean, 52.3 lowest; with the FP8
# products too 0.0263 (0.0285), 52.1 / 51.6 dB. Bounds as for the products.
# Attention alone against float32, random q/k/v [2, 4, 64, 32]: 0.053 relative (diffuse attention: many small
# probabilities, each rounded by e4m3's 3 mantissa bits, or flushed below 2^-9).
ATTENTION_REL_TOL = 0.08


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Products this small run several times faster on one intra-op thread than on two on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _linear(k: int = 256, n: int = 384, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


# ---- FP8Linear -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "scaled_mm", "emulated"])
def test_fp8_linear_error_against_float32_within_stated_bound(backend: str) -> None:
    lin = _linear()
    x = torch.randn(4, 50, 256)
    f = FP8Linear.from_linear(lin, backend=backend)
    with torch.inference_mode():
        err = _rel(f(x), lin(x))
    assert 0.01 < err < LINEAR_REL_TOL  # quantized (not bit-equal), but within e4m3's rounding


def test_per_row_weight_scale_is_what_keeps_the_error_bounded() -> None:
    """One output row 10^5 times larger than the rest: per-row scales keep every other row exactly as it was; one
    scale for the whole tensor pushes the other rows into e4m3's subnormals, and their error grows several-fold."""
    lin = _linear()
    x = torch.randn(200, 256)
    with torch.no_grad():
        ref = lin(x)[:, 1:]
        plain = FP8Linear.from_linear(lin)(x)[:, 1:]
        lin.weight[0] *= 1e5
        per_row = FP8Linear.from_linear(lin)(x)[:, 1:]
        assert torch.equal(per_row, plain)  # the outlier row's scale is its own
        q, s = quantize_rows(lin.weight.reshape(1, -1))  # the per-tensor scale
        w = (q.float() * s).reshape(lin.weight.shape)
        xq, xs = quantize_rows(x)
        per_tensor = ((xq.float() * xs) @ w.t() + lin.bias)[:, 1:]
    assert _rel(per_row, ref) < LINEAR_REL_TOL
    assert _rel(per_tensor, ref) > 3 * LINEAR_REL_TOL  # measured: 0.21 (per row: 0.036)


def test_quantize_rows_roundtrip_and_zero_rows() -> None:
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows six decades apart
    x[2] = 0
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (6, 1) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and (s > 0).all()
    back = q.float() * s
    assert torch.equal(back[2], torch.zeros(64))
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), 448.0))  # each row's max -> 448
    rel = (back - x).abs() / x.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert float(rel.max()) <= 2**-4  # within half a step of e4m3 at each row's own scale


@pytest.mark.parametrize("backend", ["scaled_mm", "emulated"])
def test_zero_rows_and_zero_input_give_zeros_not_nan(backend: str) -> None:
    lin = _linear(64, 48)
    with torch.no_grad():
        lin.weight[5] = 0
        lin.bias.zero_()
    f = FP8Linear.from_linear(lin, backend=backend)
    assert torch.isfinite(f.weight_scale).all()
    with torch.inference_mode():
        y = f(torch.randn(10, 64))
        assert torch.isfinite(y).all() and torch.equal(y[:, 5], torch.zeros(10))
        x = torch.randn(10, 64)
        x[3] = 0
        y = f(x)
        assert torch.isfinite(y).all() and torch.equal(y[3], torch.zeros(48))
        assert torch.equal(f(torch.zeros(2, 7, 64)), torch.zeros(2, 7, 48))


@pytest.mark.parametrize("shape", [(37, 64), (3, 11, 64), (2, 3, 5, 64)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtype_are_those_of_linear(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    lin = _linear(64, 80).to(dtype)
    f = FP8Linear.from_linear(lin)
    assert (f.in_features, f.out_features) == (64, 80)
    assert f.bias is not None and f.bias.dtype == dtype
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        y = f(x)
        assert y.shape == lin(x).shape == (*shape[:-1], 80) and y.dtype == dtype
    with pytest.raises(ValueError, match=r"takes \[\.\.\., 64\]"):
        f(torch.randn(3, 65, dtype=dtype))


@pytest.mark.parametrize("dtype,rel_tol,elem_tol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 3e-4, 2**-6)])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_and_emulated_paths_agree(dtype: torch.dtype, rel_tol: float, elem_tol: float, bias: bool) -> None:
    """Both compute the same e4m3 products: they differ only by float32 summation order and, in bfloat16, where
    the output (and the bias) are rounded: two bf16 steps at most."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 96, bias=bias).to(dtype)
    x = torch.randn(3, 40, 256, dtype=dtype)
    with torch.inference_mode():
        a = FP8Linear.from_linear(lin, backend="scaled_mm")(x).float()
        b = FP8Linear.from_linear(lin, backend="emulated")(x).float()
    assert _rel(a, b) < rel_tol  # measured: 2.1e-7 (float32), 6e-5 / 2e-6 with / without bias (bfloat16)
    if dtype == torch.float32:
        assert float((a - b).abs().max()) <= elem_tol * float(b.abs().max())
    else:  # measured: 0.0093 with bias, 0.0078 without; elements that differ at all: 0.03%
        assert float(((a - b).abs() / b.abs().clamp(min=1e-6)).max()) <= elem_tol
        assert float((a != b).float().mean()) < 0.01


def test_scaled_mm_refusal_is_decided_once_per_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where _scaled_mm refuses the inputs, the first call of a signature falls back to the emulation and later
    calls no longer try it; the output is the emulation's."""
    calls = []

    def refuse(*args: Any, **kw: Any) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0")

    monkeypatch.setattr(fp8mod, "_SCALED_MM_OK", {})
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    lin = _linear(48, 32)
    auto, emulated = FP8Linear.from_linear(lin), FP8Linear.from_linear(lin, backend="emulated")
    x = torch.randn(5, 48)
    with torch.inference_mode():
        outs = [auto(x) for _ in range(3)]
        assert all(torch.equal(o, emulated(x)) for o in outs)
    assert len(calls) == 1 and list(fp8mod._SCALED_MM_OK.values()) == [False]
    with torch.inference_mode():
        auto(torch.randn(2, 48, dtype=torch.bfloat16))  # another signature: tried once more
    assert len(calls) == 2 and len(fp8mod._SCALED_MM_OK) == 2
    with pytest.raises(RuntimeError, match="compute capability"):  # "scaled_mm": no fallback
        FP8Linear.from_linear(lin, backend="scaled_mm")(x)


@pytest.mark.slow  # compiles (about 10 s on a CPU the first time, then from the compiler's cache)
def test_compiled_activation_quantization_is_the_eager_one() -> None:
    lin = _linear(256, 96).to(torch.bfloat16)
    eager, fused = FP8Linear.from_linear(lin), FP8Linear.from_linear(lin, compiled=True)
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    x[0, 3] = 0
    with torch.inference_mode():
        for rows in (x, x[:, :7]):  # two shapes, one compilation (dynamic)
            assert all(torch.equal(a, b) for a, b in zip(fused_quantize_rows()(rows.reshape(-1, 256)),
                                                         quantize_rows(rows.reshape(-1, 256)), strict=True))
            assert torch.equal(fused(rows), eager(rows))


def test_module_to_keeps_the_quantized_weight() -> None:
    """Module.to(dtype) casts every floating tensor, float8 included: the bias follows, the weight and its scales
    stay e4m3 and float32, with the same values."""
    f = FP8Linear.from_linear(_linear(64, 32))
    w, s = f.weight_fp8.clone(), f.weight_scale.clone()
    f.to(torch.bfloat16)
    assert f.weight_fp8.dtype == torch.float8_e4m3fn and torch.equal(f.weight_fp8.float(), w.float())
    assert f.weight_scale.dtype == torch.float32 and torch.equal(f.weight_scale, s)
    assert f.bias is not None and f.bias.dtype == torch.bfloat16
    with pytest.raises(AttributeError, match="call the module instead"):
        _ = f.weight
    with pytest.raises(ValueError, match="convert the model first"):
        FP8Linear.from_linear(nn.Linear(4, 4).double())
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        FP8Linear.from_linear(nn.Linear(4, 4), backend="cublas")


# ---- quantize_blocks -------------------------------------------------------------------------------------------
def _fp8_paths(model: AvatarDiT) -> list[str]:
    return sorted(name for name, m in model.named_modules() if isinstance(m, FP8Linear))


def test_quantize_blocks_replaces_exactly_the_targets() -> None:
    torch.manual_seed(0)
    model = AvatarDiT(CFG)
    n = quantize_blocks(model)
    assert n == CFG.layers * len(DEFAULT_TARGETS) == 16
    assert _fp8_paths(model) == sorted(f"blocks.{i}.{t}" for i in range(CFG.layers) for t in DEFAULT_TARGETS)
    for blk in model.blocks:  # once per text context / per frame / embeddings: left as they were
        assert all(type(m) is nn.Linear for m in (blk.ck, blk.cv))
    assert type(model.blocks[1].audio_proj) is nn.Linear
    assert type(model.patch_embedding) is nn.Linear and type(model.head) is nn.Linear
    assert isinstance(model.get_submodule("blocks.0.ffn.1"), nn.GELU)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_blocks(model)

    plain = AvatarDiT(model_preset("tiny", layers=3))  # no text: no cq/co
    assert quantize_blocks(plain) == 3 * 6
    audio = AvatarDiT(model_preset("tiny", layers=3, audio_layers=(1, 3)))
    assert quantize_blocks(audio, targets=("audio_proj",)) == 2  # skipped where a block has none


def test_quantize_blocks_refuses_what_it_cannot_quantize() -> None:
    model = AvatarDiT(model_preset("tiny", layers=2, audio_layers=(1, 2)))
    with pytest.raises(ValueError, match="unknown FP8 targets"):
        quantize_blocks(model, targets=("q", "qq"))
    with pytest.raises(ValueError, match=r"convert the model first \(model.to\(torch.bfloat16\)\)"):
        quantize_blocks(model.double())
    assert _fp8_paths(model) == []  # nothing replaced by a refused call


def test_fp8_model_pass_is_close_to_the_unquantized_one() -> None:
    torch.manual_seed(0)
    model = AvatarDiT(CFG).to(torch.bfloat16).eval()
    q = AvatarDiT(CFG).to(torch.bfloat16).eval()
    q.load_state_dict(model.state_dict())
    quantize_blocks(q)
    rope = RopeTable(CFG, list(range(4)), torch.device("cpu"), torch.bfloat16)
    lat = torch.randn(1, 4, CFG.latent_channels, *CFG.latent_hw, dtype=torch.bfloat16)
    ref = torch.randn(1, CFG.latent_channels, *CFG.latent_hw, dtype=torch.bfloat16)
    sigma = torch.full((1, 4), 0.5)
    with torch.inference_mode():
        a, _ = model(lat, sigma, ref, None, rope)
        b, _ = q(lat, sigma, ref, None, rope)
    assert 0 < _rel(b.float(), a.float()) < 0.05  # measured: 0.011


# ---- fp8_error -------------------------------------------------------------------------------------------------
def test_fp8_error_measures() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    other = frames.copy()
    other[1, 0, 0, 0] ^= 4  # one channel of one pixel changes by 4
    lat = torch.ones(2, 1, 4, 2, 2)
    lat2 = lat.clone()
    lat2[1, 0, 0] += 0.5  # a quarter of the second frame's elements by half
    e = fp8_error(frames, other, lat, lat2)
    assert e["max_pixel_diff"] == 4 and e["frames"] == 3 and e["latent_frames"] == 2
    assert e["psnr_min_db"] == pytest.approx(10 * np.log10(255**2 / (16 / (8 * 8 * 3))))
    assert e["psnr_db"] == np.inf  # two frames are equal
    assert e["latent_rel"] == pytest.approx(np.sqrt(4 * 0.25) / np.sqrt(32))
    assert e["latent_rel_max"] == pytest.approx(np.sqrt(4 * 0.25) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        fp8_error(frames, other[:2], lat, lat2)


# ---- the engine ------------------------------------------------------------------------------------------------
def test_engine_fp8_setting_quantizes_its_model() -> None:
    eng = StreamEngine(AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, max_sessions=1, dtype="bfloat16", fp8=True)
    assert len(_fp8_paths(eng.model)) == CFG.layers * len(DEFAULT_TARGETS)
    assert not any(m.compiled for m in eng.model.modules() if isinstance(m, FP8Linear))
    plain = StreamEngine(AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, max_sessions=1, dtype="bfloat16")
    assert _fp8_paths(plain.model) == []
    fused = StreamEngine(AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, max_sessions=1, compile=True, fp8=True)
    assert all(m.compiled for m in fused.model.modules() if isinstance(m, FP8Linear))
    # Engines share their model: another FP8 engine on it (a benchmark's next batch size) takes it as it is, and
    # one without FP8 is refused rather than run FP8 unasked.
    again = StreamEngine(eng.model, TinyAutoencoder(CFG), STREAM, max_sessions=2, dtype="bfloat16", fp8=True)
    assert again.model is eng.model and len(_fp8_paths(again.model)) == CFG.layers * len(DEFAULT_TARGETS)
    with pytest.raises(ValueError, match="linears are FP8 already"):
        StreamEngine(eng.model, TinyAutoencoder(CFG), STREAM, max_sessions=1, dtype="bfloat16")


def test_fp8_engine_within_stated_error_of_bf16() -> None:
    torch.manual_seed(0)
    vae = TinyAutoencoder(CFG)
    r = compare_fp8(lambda: AvatarDiT(CFG), vae, STREAM, device="cpu", dtype="bfloat16", steps=5)
    e = r["error"]
    assert r["fp8_layers"] == 16 and e["frames"] == 4 * 2 * 4 and e["latent_frames"] == 4 * 2
    assert 1e-3 < e["latent_rel"] < RANDOM_LATENT_REL_TOL  # FP8 changes the output (bf16 runs are bit-equal)...
    assert e["latent_rel_max"] < 1.5 * RANDOM_LATENT_REL_TOL
    assert e["psnr_min_db"] > RANDOM_PSNR_MIN_DB  # ...but not visibly
    assert r["reference_ms_per_step"] > 0 and r["fp8_ms_per_step"] > 0


def _trained(**kw: Any) -> dict[str, Any]:
    """``compare_fp8`` on the shipped trained model with the bundled face, 5 steps (``kw``: what runs in FP8)."""
    lm = load_default()
    assert lm.trained, "the shipped checkpoint is missing"
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}

    def factory() -> AvatarDiT:
        m = AvatarDiT(lm.model_cfg)
        m.load_state_dict(state)
        return m

    c = lm.model_cfg
    img = Image.open(Path(fp8mod.__file__).parent / "assets" / "reference_face.png").convert("RGB")
    face = np.array(img.resize((c.width, c.height)))
    return compare_fp8(factory, lm.vae, lm.stream_cfg, device="cpu", dtype="bfloat16", steps=5, face=face, **kw)


def test_fp8_engine_within_stated_error_of_bf16_trained_model() -> None:
    r = _trained()
    e = r["error"]
    assert e["latent_frames"] == 2 and e["frames"] == 8
    assert 1e-3 < e["latent_rel"] < TRAINED_LATENT_REL_TOL
    assert e["latent_rel_max"] < TRAINED_LATENT_REL_TOL
    assert e["psnr_min_db"] > TRAINED_PSNR_MIN_DB and e["max_pixel_diff"] >= 1


def test_emulated_fp8_attention_rounds_as_stated() -> None:
    """The FP8-attention study's numerics: within the stated error of float32 attention, not equal to it, masked
    keys still excluded, and only inside ``emulate_fp8`` (this thread)."""
    import threading

    from avatarforcing import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 32) for n in (64, 80, 80))
    mask = torch.rand(2, 1, 1, 80) > 0.3
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = attention.attend_fp8_emulated(q, k, v, mask)
    assert 1e-3 < _rel(got, ref) < ATTENTION_REL_TOL
    # A masked key takes no part: flipping the signs of its key and value (which keeps every per-head scale) changes
    # nothing, while flipping an unmasked one's does.
    hidden = ~mask[:, 0, 0][:, None, :, None].expand_as(v)
    flip = torch.where(hidden, -1.0, 1.0)
    assert torch.equal(attention.attend_fp8_emulated(q, k * flip, v * flip, mask), got)
    assert not torch.allclose(attention.attend_fp8_emulated(q, k, -v, mask), got, atol=1e-3)
    with attention.emulate_fp8():
        assert torch.equal(attention.attend(q, k, v, mask), got)
        seen: list[torch.Tensor] = []
        t = threading.Thread(target=lambda: seen.append(attention.attend(q, k, v, mask)))
        t.start()
        t.join()
        assert torch.allclose(seen[0], ref, atol=1e-5)  # another thread: plain attention
    assert torch.allclose(attention.attend(q, k, v, mask), ref, atol=1e-5)


def test_fp8_attention_study_on_the_trained_model() -> None:
    """What FP8 attention would cost the shipped model (emulated numerics; no fast kernel here): within the bounds
    stated for FP8 products, alone and with them."""
    for products in (False, True):
        r = _trained(fp8_products=products, fp8_attention=True)
        e = r["error"]
        assert r["fp8_attention"] == "emulated" and (r["fp8_layers"] > 0) == products
        assert 1e-3 < e["latent_rel"] < TRAINED_LATENT_REL_TOL and e["latent_rel_max"] < TRAINED_LATENT_REL_TOL
        assert e["psnr_min_db"] > TRAINED_PSNR_MIN_DB


def test_compare_fp8_refuses_fp8_and_too_few_steps() -> None:
    with pytest.raises(ValueError, match="do not pass fp8"):
        compare_fp8(lambda: AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, device="cpu", fp8=True)
    with pytest.raises(ValueError, match="needs something in FP8"):
        compare_fp8(lambda: AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, device="cpu", fp8_products=False)
    with pytest.raises(ValueError, match="emitted no block"):
        compare_fp8(lambda: AvatarDiT(CFG), TinyAutoencoder(CFG), STREAM, device="cpu", dtype="float32", steps=1)


# ---- the setting -----------------------------------------------------------------------------------------------
def test_server_config_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerConfig().fp8 is False and ServerConfig(fp8=True).fp8 is True
    monkeypatch.setenv("AVATARFORCING_FP8", "on")
    assert ServerConfig.from_env().fp8 is True
    monkeypatch.setenv("AVATARFORCING_FP8", "maybe")
    with pytest.raises(ConfigError, match="AVATARFORCING_FP8='maybe' is not a boolean"):
        ServerConfig.from_env()
    with pytest.raises(ConfigError, match="fp8 must be true or false"):
        ServerConfig(fp8="yes")  # type: ignore[arg-type]


def test_server_builds_an_fp8_engine() -> None:
    from avatarforcing.checkpoint import random_init
    from service.server import App

    app = App(ServerConfig(port=0, metrics_port=-1, max_sessions=1, device="cpu", fp8=True), loaded=random_init())
    assert len(_fp8_paths(app.engine.model)) == app.engine.cfg.layers * 6  # the tiny preset has no text: no cq/co
    app = App(ServerConfig(port=0, metrics_port=-1, max_sessions=1, device="cpu"), loaded=random_init())
    assert _fp8_paths(app.engine.model) == []


def test_serve_flag() -> None:
    from tools.cli import _add_server_args

    p = argparse.ArgumentParser()
    _add_server_args(p)
    assert p.parse_args(["--fp8"]).fp8 is True
    assert p.parse_args([]).fp8 is None  # unset: the environment or the default decides
