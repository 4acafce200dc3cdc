"""Attention through PyTorch's fused kernels, with a chosen kernel where it can run.

``scaled_dot_product_attention`` picks a kernel by a fixed order; on Hopper its cuDNN kernel is
much faster than the flash kernel at the window pass's shapes, but it accepts fewer inputs.
Inside ``prefer("cudnn")`` (the engine enters it around every pass), ``attend`` runs each call
with the preferred kernel alone; a call whose inputs that kernel refuses runs with PyTorch's own
choice instead, and the decision is remembered per input signature (shapes, strides, dtype,
mask), so it is made once, before any CUDA graph capture, and never inside one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")

_local = threading.local()  # .preferred: this thread's preferred kernel (engines may run on several threads)
# (preferred kernel, input signature) -> True when that kernel runs these inputs.
_runs: dict[tuple[object, ...], bool] = {}
# Why a preferred kernel refused some inputs (signature -> reason), for reports.
refusals: dict[str, str] = {}


def _backend(name: str) -> object:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


@contextlib.contextmanager
def only(name: str) -> Iterator[None]:
    """Allows one kernel alone (``auto``: PyTorch's choice); a call it cannot run raises."""
    if name == "auto":
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_backend(name)]):  # type: ignore[list-item]
        yield


@contextlib.contextmanager
def prefer(name: str) -> Iterator[None]:
    """``attend`` calls inside use the kernel ``name`` wherever it accepts the inputs."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {list(BACKENDS)}")
    before = getattr(_local, "preferred", "auto")
    _local.preferred = name
    try:
        yield
    finally:
        _local.preferred = before


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [n, heads, Nq, d], k/v [n, heads, Nk, d]; mask True where a key counts."""
    pref = getattr(_local, "preferred", "auto")
    if pref == "auto" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sig = (pref, tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), v.stride(), q.dtype,
           None if mask is None else (tuple(mask.shape), mask.dtype))
    ok = _runs.get(sig)
    if ok is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with only(pref):
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                _runs[sig] = True
                return out
            except RuntimeError as e:
                reasons = "; ".join(str(w.message) for w in caught) or str(e).splitlines()[0]
                refusals[repr(sig[1:])] = reasons
                log.info("%s attention refuses %s, using PyTorch's choice: %s", pref, sig[1:], reasons)
                _runs[sig] = ok = False
    if ok:
        with only(pref):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
