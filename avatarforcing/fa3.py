"""FlashAttention-3's forward kernels on Hopper, in bf16 and in FP8 (e4m3), from the ``fa3-fwd`` wheel (PyPI).

``fa3-fwd`` packages upstream FlashAttention-3's forward pass for SM90 (head dims 64 to 256; bf16 inputs, or e4m3
inputs with a float32 descale per batch row and key/value head, bf16 out), built on PyTorch's stable C ABI so that
one wheel loads on later PyTorch releases; it registers ``torch.ops.fa3_fwd``. Install it with the ``hopper`` extra
(``pip install 'avatarforcing-serve[hopper]'``); its kernels take bf16 (no float16 or float32 ones: the engine runs
them in a bfloat16 model only). PyTorch's own FA3 switch (``--flash-impl FA3``) looks for another
package (``flash_attn_interface``, built from source), so this module calls the kernel itself.

``attend(q, k, v, fp8=...)`` takes the engine's layout, [n, heads, N, d] (any strides with a contiguous last
dimension: heads-first tensors and [n, N, heads, d] views both), hands the kernel [n, N, heads, d] views of them
without a copy, and returns [n, heads, Nq, d] (a view of the kernel's token-first output, so the output
projection's reshape copies nothing). No mask: the engine's steady-state passes have none; masked (warm-up) passes
stay with ``scaled_dot_product_attention``. With ``fp8``, q, k and v are quantized here, one scale per (row,
head), as ``attention.attend_fp8_emulated`` models (whose float32 result is the CPU reference for this path's
numerics: tests/test_fa3.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

E4M3_MAX = 448.0
#: The head dimensions the wheel's kernels are built for.
HEAD_DIMS = (64, 96, 128, 192, 256)


@functools.cache
def _ops() -> Any:
    import fa3_fwd_interface  # noqa: F401  (registers torch.ops.fa3_fwd)

    return torch.ops.fa3_fwd._flash_attn_forward


def unavailable(device: torch.device | str | None = None) -> str | None:
    """Why these kernels cannot run (on ``device``, when given), or None when they can."""
    try:
        _ops()
    except Exception as e:  # not installed, or it does not load with this PyTorch / CUDA runtime
        return (f"the fa3-fwd package is not usable here ({type(e).__name__}: {e}); install it with "
                "pip install 'avatarforcing-serve[hopper]'")
    if device is not None:
        dev = torch.device(device)
        if dev.type != "cuda":
            return f"FlashAttention-3 runs on CUDA devices, not {dev.type}"
        major, minor = torch.cuda.get_device_capability(dev)
        if major != 9:
            return f"FlashAttention-3's kernels are built for Hopper (compute capability 9.0), not {major}.{minor}"
    return None


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, heads, N, d] -> (x in e4m3, same shape and strides' order; descale [n, heads] float32): one scale per
    (row, head), the absolute maximum to e4m3's largest value. ``x8.float() * descale`` is the rounded x."""
    amax = x.abs().amax(dim=(-2, -1)).float().clamp(min=1e-12)
    descale = amax / E4M3_MAX
    x8 = (x.float() / descale[:, :, None, None]).to(torch.float8_e4m3fn)
    return x8, descale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fp8: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [n, heads, Nq, d], k/v [n, heads, Nk, d] (no mask), by FlashAttention-3:
    [n, heads, Nq, d] in q's dtype (bf16 from the FP8 kernel)."""
    d = q.shape[-1]
    descales: dict[str, torch.Tensor] = {}
    if fp8:
        (q, descales["q_descale"]), (k, descales["k_descale"]), (v, descales["v_descale"]) = \
            quantize(q), quantize(k), quantize(v)
    out = _ops()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=d ** -0.5, causal=False,
                 num_splits=1, **descales)[0]
    return out.transpose(1, 2)
