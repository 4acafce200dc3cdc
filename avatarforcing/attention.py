"""Attention through PyTorch's fused kernels, with a chosen kernel where it can run.

``scaled_dot_product_attention`` picks a kernel by a fixed order; on Hopper its cuDNN kernel is
much faster than the flash kernel at the window pass's shapes, but it accepts fewer inputs.
Inside ``prefer("cudnn")`` (the engine enters it around every pass), ``attend`` runs each call
with the preferred kernel alone; a call whose inputs that kernel refuses runs with PyTorch's own
choice instead, and the decision is remembered per input signature (shapes, strides, dtype,
mask), so it is made once, before any CUDA graph capture, and never inside one.

``prefer("fastest")`` times every fused kernel that accepts a signature's inputs the first time it is seen
(a few runs each, on the device, outside any graph capture) and keeps the fastest for that signature: the
window pass and the clean-history pass have different shapes and need not share a kernel. Which flash
kernel "flash" is can be switched process-wide to FlashAttention-3/4 where that package is installed
(``use_flash_impl``).

``prefer("fa3")`` runs the unmasked calls on CUDA through FlashAttention-3's own kernels (``avatarforcing.fa3``, from
the ``fa3-fwd`` wheel; "fastest" times them too where they load), and ``fp8_attention()`` runs them with e4m3
inputs, the FP8 attention the engine's ``fp8_attention`` setting turns on. Masked calls (warm-up passes) keep
``scaled_dot_product_attention`` in both.

``emulate_fp8()`` makes ``attend`` compute with the numerics of an FP8 attention kernel (FlashAttention-3's FP8
forward: q, k and v in e4m3 with a scale per batch row and head, the softmax's probabilities rounded to e4m3 for
the product with v, everything accumulated in float32), in float32 on any device: a study of what FP8 attention
would cost in quality, not a fast path (``fp8_bench.compare_fp8``'s ``fp8_attention``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import fa3

log = logging.getLogger(__name__)

BACKENDS = ("auto", "fastest", "flash", "cudnn", "efficient", "math", "fa3")
# The kernels "fastest" chooses among (math is never the fastest on a GPU and holds the whole score matrix), and
# FlashAttention-3's own where it loads (unmasked calls).
CANDIDATES = ("cudnn", "flash", "efficient")

_local = threading.local()  # .preferred: this thread's preferred kernel (engines may run on several threads)
# (preferred kernel, input signature) -> True when that kernel runs these inputs.
_runs: dict[tuple[object, ...], bool] = {}
# Why a preferred kernel refused some inputs (signature -> reason), for reports.
refusals: dict[str, str] = {}
# "fastest": input signature -> the kernel chosen for it (None: PyTorch's choice), and the timings behind it.
_fastest: dict[tuple[object, ...], str | None] = {}
timings: dict[str, dict[str, float | str]] = {}


def use_flash_impl(impl: str | None) -> str | None:
    """Makes the "flash" kernel FlashAttention-3 or -4 (``impl`` "FA3" / "FA4", which PyTorch lists in
    ``torch.nn.attention.list_flash_attention_impls`` and loads from their own packages, e.g.
    ``flash_attn_interface`` for FA3), or PyTorch's own again (None). Process-wide. Returns the implementation
    active after the call; raises ValueError with the reason when it cannot be activated."""
    from torch.nn import attention as nn_attention

    if impl is None:
        if nn_attention.current_flash_attention_impl() is not None:
            nn_attention.restore_flash_attention_impl()
        return None
    known = nn_attention.list_flash_attention_impls()
    if impl not in known:
        raise ValueError(f"flash attention implementation {impl!r} is not one this PyTorch offers ({known})")
    try:
        nn_attention.activate_flash_attention_impl(impl)
    except Exception as e:  # the kernels' package is not installed, or does not fit this card
        raise ValueError(f"flash attention {impl} cannot be activated: {type(e).__name__}: {e}") from None
    _fastest.clear()  # earlier choices were made against the other flash kernel
    _runs.clear()
    return nn_attention.current_flash_attention_impl()


def choose_fastest(run: Callable[[str], float | None], candidates: tuple[str, ...] = CANDIDATES
                   ) -> tuple[str | None, dict[str, float | str]]:
    """The candidate with the least time ``run(name)`` measures (None from ``run``: that kernel refuses the
    inputs), and every candidate's time or refusal; (None, ...) when all refuse."""
    times: dict[str, float | str] = {}
    for name in candidates:
        try:
            t = run(name)
        except RuntimeError as e:
            times[name] = f"refused: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:300]
            continue
        times[name] = "refused" if t is None else t
    timed = {k: v for k, v in times.items() if isinstance(v, float)}
    return (min(timed, key=lambda k: timed[k]) if timed else None), times


def _time_kernel(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 repeats: int = 3) -> float:
    """Median seconds of one call with kernel ``name`` alone (CUDA events, after one warm-up call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with only(name):
            _call(name, q, k, v, mask)
            ts = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                _call(name, q, k, v, mask)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1000)
    return sorted(ts)[len(ts) // 2]


def _call(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One call with kernel ``name`` (inside ``only(name)``): FlashAttention-3's own, or PyTorch's fused attention."""
    if name == "fa3":
        if mask is not None:
            raise RuntimeError("FlashAttention-3 is called here without a mask")
        return fa3.attend(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def candidates(q: torch.Tensor, mask: torch.Tensor | None) -> tuple[str, ...]:
    """The kernels "fastest" times for these inputs: PyTorch's fused ones, and FlashAttention-3's where it runs."""
    if mask is None and q.shape[-1] in fa3.HEAD_DIMS and fa3.unavailable(q.device) is None:
        return (*CANDIDATES, "fa3")
    return CANDIDATES


def _attend_fastest(sig: tuple[object, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    if sig not in _fastest:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: PyTorch's choice there
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        best, times = choose_fastest(lambda name: _time_kernel(name, q, k, v, mask), candidates(q, mask))
        _fastest[sig] = best
        timings[repr(sig[1:])] = times
        log.info("fastest attention for %s: %s (%s)", sig[1:], best, times)
    best = _fastest[sig]
    if best is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with only(best):
        return _call(best, q, k, v, mask)


def _backend(name: str) -> object:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


@contextlib.contextmanager
def only(name: str) -> Iterator[None]:
    """Allows one kernel alone (``auto``: PyTorch's choice; ``fa3``: none of PyTorch's, FlashAttention-3 being
    called directly); a call it cannot run raises."""
    if name in ("auto", "fa3"):
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


E4M3_MAX = 448.0


def _e4m3_per_head(x: torch.Tensor) -> torch.Tensor:
    """x [n, heads, N, d] rounded to e4m3 with one scale per (row, head) (amax to e4m3's largest), in float32."""
    scale = x.float().abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn).float() * scale


def attend_fp8_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attend`` with an FP8 kernel's rounding (module doc), computed in float32; the output in q's dtype.
    The scores are made a block of queries at a time (at most about 256 MiB of them), so long passes fit."""
    qd, kd, vd = _e4m3_per_head(q), _e4m3_per_head(k), _e4m3_per_head(v)
    n, h, nq, d = q.shape
    rows = max(1, (256 << 20) // (4 * n * h * k.shape[-2]))
    out = torch.empty(n, h, nq, vd.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(0, nq, rows):
        s = (qd[:, :, i:i + rows] @ kd.transpose(-1, -2)) * d**-0.5
        if mask is not None:
            s = s.masked_fill(~(mask[..., i:i + rows, :] if mask.shape[-2] > 1 else mask), float("-inf"))
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # in (0, 1]: e4m3 without a scale, as the kernel keeps it
        out[:, :, i:i + rows] = (p.to(torch.float8_e4m3fn).float() @ vd) / p.sum(dim=-1, keepdim=True)
    return out.to(q.dtype)


@contextlib.contextmanager
def _thread_flag(name: str, on: bool) -> Iterator[None]:
    """Sets this thread's flag ``name`` within, and restores it after."""
    old = getattr(_local, name, False)
    setattr(_local, name, on)
    try:
        yield
    finally:
        setattr(_local, name, old)


def fp8_attention(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within (this thread): unmasked calls on CUDA run FlashAttention-3's FP8 kernel (``fa3.attend(fp8=True)``)."""
    return _thread_flag("fp8", on)


def emulate_fp8(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within (this thread): ``attend`` rounds as an FP8 attention kernel would (``attend_fp8_emulated``)."""
    return _thread_flag("fp8_emulated", on)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [n, heads, Nq, d], k/v [n, heads, Nk, d]; mask True where a key counts."""
    if getattr(_local, "fp8_emulated", False):
        return attend_fp8_emulated(q, k, v, mask)
    pref, fp8 = getattr(_local, "preferred", "auto"), getattr(_local, "fp8", False)
    if q.is_cuda and mask is None and (pref == "fa3" or fp8):
        return fa3.attend(q, k, v, fp8=fp8)
    if pref in ("auto", "fa3") or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sig = (pref, tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), v.stride(), q.dtype,
           None if mask is None else (tuple(mask.shape), mask.dtype))
    if pref == "fastest":
        return _attend_fastest(sig, q, k, v, mask)
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
