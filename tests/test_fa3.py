"""FlashAttention-3's own kernels (avatarforcing/fa3.py, the fa3-fwd wheel): the FP8 quantization against the emulation
that states FP8 attention's error, the calls into the kernel against its own shape function (on the meta device: the
kernels themselves run only on Hopper), where the engine routes attention, and the settings' refusals on a CPU.
The kernels' numbers are checked on a Hopper card (the last test; skipped elsewhere)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from avatarforcing import StreamEngine, attention, fa3
from avatarforcing.checkpoint import random_init
from avatarforcing.fp8_bench import compare_fp8
from avatarforcing_service.config import ConfigError, ServerConfig

pytestmark = pytest.mark.skipif(fa3.unavailable() is not None, reason=str(fa3.unavailable()))


def token_first(n: int, heads: int, tokens: int, d: int, **kw: Any) -> torch.Tensor:
    """[n, heads, N, d] view of a [n, N, heads, d] tensor: the engine's usual layout."""
    return torch.randn(n, tokens, heads, d, **kw).transpose(1, 2)


def test_quantization_is_the_emulations_and_keeps_the_layout() -> None:
    torch.manual_seed(0)
    x = token_first(2, 3, 50, 64) * torch.tensor([1.0, 30.0, 1e-3])[None, :, None, None]  # heads of other ranges
    x8, descale = fa3.quantize(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 3) and descale.dtype == torch.float32
    assert x8.stride(-1) == 1 and x8.transpose(1, 2).is_contiguous()  # still token-first: no copy for the kernel
    torch.testing.assert_close(x8.float() * descale[:, :, None, None], attention._e4m3_per_head(x), rtol=0, atol=0)
    assert x8.float().abs().amax() == attention.E4M3_MAX  # each (row, head) uses e4m3's whole range


class Recorder:
    """Stands in for the kernel's op: records the arguments, then runs the op's own shape function (meta)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[torch.Tensor, ...], dict[str, Any]]] = []

    def __call__(self, *args: torch.Tensor, **kw: Any) -> Any:
        self.calls.append((args, kw))
        return torch.ops.fa3_fwd._flash_attn_forward(*args, **kw)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("layout", ["token-first", "heads-first"])
def test_the_kernel_gets_token_first_views_and_returns_token_first(monkeypatch: pytest.MonkeyPatch, fp8: bool,
                                                                   layout: str) -> None:
    n, h, nq, nk, d = 2, 12, 300, 900, 128
    meta = {"device": "meta", "dtype": torch.bfloat16}
    if layout == "token-first":
        q, k, v = token_first(n, h, nq, d, **meta), token_first(n, h, nk, d, **meta), token_first(n, h, nk, d, **meta)
    else:
        q, k, v = (torch.empty(n, h, s, d, **meta) for s in (nq, nk, nk))  # type: ignore[arg-type]
    rec = Recorder()
    monkeypatch.setattr(fa3, "_ops", lambda: rec)
    out = fa3.attend(q, k, v, fp8=fp8)
    assert out.shape == (n, h, nq, d) and out.dtype == torch.bfloat16
    assert out.transpose(1, 2).is_contiguous()  # the output projection's reshape copies nothing
    (args, kw), = rec.calls
    for passed, mine in zip(args, (q, k, v), strict=True):
        assert passed.shape == mine.transpose(1, 2).shape and passed.stride(-1) == 1
        assert passed.dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)
        if not fp8:
            assert passed.stride() == mine.transpose(1, 2).stride()  # a view: no copy
    assert kw["softmax_scale"] == d ** -0.5 and kw["causal"] is False and kw["num_splits"] == 1
    if fp8:
        for name in ("q_descale", "k_descale", "v_descale"):
            assert kw[name].shape == (n, h) and kw[name].dtype == torch.float32
    else:
        assert not any(name in kw for name in ("q_descale", "k_descale", "v_descale"))


def test_on_a_cpu_attention_stays_with_pytorchs_kernels() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, s, 64) for s in (20, 30, 30))
    mask = torch.rand(1, 1, 20, 30) > 0.3
    want = F.scaled_dot_product_attention(q, k, v)
    with attention.prefer("fa3"), attention.fp8_attention():
        torch.testing.assert_close(attention.attend(q, k, v), want)
        torch.testing.assert_close(attention.attend(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    assert attention.candidates(q, None) == attention.CANDIDATES  # "fastest" times FA3 only where it runs


def test_the_settings_are_refused_where_they_cannot_run() -> None:
    loaded = random_init("tiny")
    for kw, what in (({"fp8_attention": True}, "fp8_attention"), ({"attention": "fa3"}, "attention fa3")):
        with pytest.raises(ValueError, match=f"{what} cannot run: FlashAttention-3 runs on CUDA devices, not cpu"):
            StreamEngine(loaded.model, loaded.vae, loaded.stream_cfg, max_sessions=1, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fp8_attention needs a CUDA device"):
        ServerConfig(fp8_attention=True, device="cpu")
    assert ServerConfig(attention="fa3").attention == "fa3"
    with pytest.raises(ValueError, match="fp8_attention must be False, 'emulated' or 'kernel'"):
        compare_fp8(lambda: loaded.model, loaded.vae, loaded.stream_cfg, device="cpu", fp8_attention="fast")


def test_where_the_kernels_load_they_still_need_their_head_dims_and_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from avatarforcing.model import AvatarDiT

    monkeypatch.setattr(fa3, "unavailable", lambda device=None: None)  # as on a Hopper card with the wheel
    loaded = random_init("tiny")
    assert loaded.model_cfg.head_dim == 32
    with pytest.raises(ValueError, match=r"head dims \(64, 96, 128, 192, 256\), not 32"):
        StreamEngine(loaded.model, loaded.vae, loaded.stream_cfg, max_sessions=1, fp8_attention=True)
    cfg = dataclasses.replace(loaded.model_cfg, heads=2)  # head dim 64
    with pytest.raises(ValueError, match="run a bfloat16 model .* not float32: use dtype bfloat16"):
        StreamEngine(AvatarDiT(cfg), loaded.vae, loaded.stream_cfg, max_sessions=1, attention="fa3")


hopper = torch.cuda.is_available() and fa3.unavailable("cuda") is None


@pytest.mark.skipif(not hopper, reason="FlashAttention-3's kernels run on a Hopper card")
def test_on_hopper_the_kernels_agree_with_the_references() -> None:
    torch.manual_seed(0)
    n, h, d = 1, 12, 128
    q, k, v = (token_first(n, h, s, d, device="cuda", dtype=torch.bfloat16) for s in (1560, 7800, 7800))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    bf16 = fa3.attend(q, k, v)
    assert ((bf16.float() - ref).norm() / ref.norm()).item() < 1e-2
    fp8 = fa3.attend(q, k, v, fp8=True)
    emulated = attention.attend_fp8_emulated(q, k, v).float()
    assert ((fp8.float() - ref).norm() / ref.norm()).item() < 0.08  # the emulation's stated bound
    assert ((fp8.float() - emulated).norm() / ref.norm()).item() < 0.05
