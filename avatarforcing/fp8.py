"""FP8 (e4m3) matrix products for the transformer's per-token linears, and the error they cost.

Hopper runs FP8 products at twice the bfloat16 rate. ``quantize_blocks`` replaces the linears every pass runs
on each token (self-attention q, k, v, o; cross-attention cq, co; the FFN's two) with ``FP8Linear``: the weight
is quantized once to ``torch.float8_e4m3fn`` with one float32 scale per output row, and each call quantizes its
activation per token (one scale per row of the flattened input, from that row's absolute maximum), then runs
``torch._scaled_mm`` with both scale vectors (row-wise scaling). Where ``_scaled_mm`` cannot run these inputs (a
GPU older than compute capability 8.9, a width not a multiple of 16, ...) the same quantization runs emulated:
the FP8 values in float32, one float32 product, the scales after it, so the numerics of FP8 storage are the
same either way; which of the two a layer uses is decided once per device, dtype and width.

Not quantized: the cross-attention keys/values (``ck``, ``cv``: once per text context, not per token), the
patch embedding, the head, the time and text embeddings and the audio projection (small, or once per frame).

``fp8_error`` states what FP8 costs against the unquantized engine: the relative error of the latents and the
PSNR of the decoded frames (``avatarforcing.fp8_bench.compare_fp8`` measures both at any size).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from .model import AvatarDiT

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# A row's absolute maximum is clamped to at least this before the scale is taken from it, so that an all-zero
# row (of the weight or of the activation) quantizes to zeros with a finite, non-zero scale instead of 0/0.
_AMAX_FLOOR = 1e-12
# The per-token products of every pass (Block attribute paths).
DEFAULT_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "cq", "co", "ffn.0", "ffn.2")
# Every linear of a block that may be named as a target (a model without text has no cq..cv, some blocks no
# audio_proj: those are skipped where absent).
_BLOCK_LINEARS = frozenset(("q", "k", "v", "o", "cq", "ck", "cv", "co", "ffn.0", "ffn.2", "audio_proj"))
# The dtypes an FP8 weight can be quantized from (and the outputs the products are computed in).
SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "scaled_mm", "emulated")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor [R, C] -> (its e4m3 values [R, C], float32 scale per row [R, 1]) with x ~ values * scale.

    Each row's scale is its absolute maximum / 448 (e4m3's largest finite value), so the row's largest element
    maps to 448; a zero row gets zeros (its scale is the floor's, finite). ``quantize_rows(w.reshape(1, -1))``
    is the per-tensor quantization of ``w``.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=_AMAX_FLOOR) / FP8_MAX
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8).contiguous()  # row-major: what _scaled_mm takes
    return q, scale


_compiled_quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


def fused_quantize_rows() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``quantize_rows`` through ``torch.compile`` (once, for every shape: ``dynamic=True``): one reduction and one
    elementwise kernel that read the activation and write e4m3, where the eager version writes and reads several
    float32 temporaries of its size (on a GPU that traffic costs more than the FP8 product saves)."""
    global _compiled_quantize
    if _compiled_quantize is None:
        _compiled_quantize = torch.compile(quantize_rows, dynamic=True, fullgraph=True)
    return _compiled_quantize


# (device, input dtype, in_features, out_features, bias passed to the kernel) -> whether _scaled_mm runs it.
_SCALED_MM_OK: dict[tuple[str, torch.dtype, int, int, bool], bool] = {}


def scaled_mm_supported(device: torch.device, dtype: torch.dtype, k: int, n: int) -> bool:
    """Whether ``torch._scaled_mm`` can, as documented, run a row-wise scaled e4m3 product [M, k] x [k, n] with
    output ``dtype`` on ``device`` (checked before the first call; a refusal then still falls back once).

    CUDA (aten/src/ATen/native/cuda/ScaledBlas.cpp): compute capability 8.9 or newer, both widths multiples of
    16, row-wise scales float32 [M, 1] and [1, n], output bfloat16, float16 or float32. ROCm wants the fnuz
    types for row-wise scaling: emulated there. The CPU kernel takes any width.
    """
    if dtype not in SOURCE_DTYPES:
        return False
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and k % 16 == 0 and n % 16 == 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class FP8Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight (per-output-row scale) and per-token e4m3 activations: [..., in] ->
    [..., out] in the input's dtype. Inference only. Made with ``FP8Linear.from_linear``.

    ``backend``: "auto" (``_scaled_mm`` where it runs these inputs, decided once per device, dtype and width),
    "scaled_mm" (always; an error where it cannot run) or "emulated" (the same quantization computed in float32).
    ``compiled``: the activation is quantized by ``fused_quantize_rows`` (the same values), else eagerly.
    """

    weight_fp8: torch.Tensor  # [out, in] e4m3
    weight_scale: torch.Tensor  # [1, out] float32: the layout _scaled_mm takes for the second operand
    bias: torch.Tensor | None  # [out] in the compute dtype

    def __init__(self, in_features: int, out_features: int, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, backend: str = "auto", compiled: bool = False) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {backend!r}; choose one of {list(BACKENDS)}")
        if weight_fp8.shape != (out_features, in_features) or weight_fp8.dtype != FP8:
            raise ValueError(f"weight_fp8 must be {FP8} [{out_features}, {in_features}], got "
                             f"{weight_fp8.dtype} {list(weight_fp8.shape)}")
        if weight_scale.shape != (1, out_features) or weight_scale.dtype != torch.float32:
            raise ValueError(f"weight_scale must be float32 [1, {out_features}], got "
                             f"{weight_scale.dtype} {list(weight_scale.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.compiled = backend, compiled
        self.register_buffer("weight_fp8", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, backend: str = "auto", compiled: bool = False) -> FP8Linear:
        """Quantizes ``lin``'s weight once (its bias stays in the weight's dtype)."""
        w = lin.weight.detach()
        if w.dtype not in SOURCE_DTYPES:
            raise ValueError(f"an FP8 weight is quantized from float32, bfloat16 or float16, not {w.dtype}: "
                             "convert the model first (model.to(torch.bfloat16))")
        q, scale = quantize_rows(w)
        bias = None if lin.bias is None else lin.bias.detach().clone()
        return cls(lin.in_features, lin.out_features, q, scale.reshape(1, -1), bias, backend, compiled)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={self.backend}, compiled={self.compiled}")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FP8Linear:
        # Module.to(dtype) casts every floating tensor, float8 included: the bias follows the model's dtype, the
        # quantized weight and its scales keep theirs (only their device moves).
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_fp8.dtype != FP8:
            self.weight_fp8 = self.weight_fp8.to(FP8)  # exact: every e4m3 value is a float16/bfloat16/float32 one
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:
        if name == "weight":
            raise AttributeError("FP8Linear keeps no weight in the compute dtype (weight_fp8 and weight_scale): "
                                 "code that reads a linear's .weight must call the module instead")
        return super().__getattr__(name)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the products see it, float32 [out, in]."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def _use_scaled_mm(self, x: torch.Tensor, bias_in_kernel: bool) -> bool:
        if self.backend != "auto":
            return self.backend == "scaled_mm"
        key = (str(x.device), x.dtype, self.in_features, self.out_features, bias_in_kernel)
        ok = _SCALED_MM_OK.get(key)
        if ok is None:
            ok = scaled_mm_supported(x.device, x.dtype, self.in_features, self.out_features)
            why = "not supported there"
            if ok and not _capturing(x.device):  # a CUDA graph capture only records: no trial call there
                try:
                    self._scaled_mm(x[:1], bias_in_kernel)
                except (RuntimeError, ValueError, TypeError) as e:
                    ok, why = False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not ok:
                log.warning("torch._scaled_mm cannot run %s (%s): its FP8 products are emulated in float32", key, why)
            _SCALED_MM_OK[key] = ok
        return ok

    def _quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_quantize_rows()(x2) if self.compiled else quantize_rows(x2)

    def _scaled_mm(self, x2: torch.Tensor, bias_in_kernel: bool) -> torch.Tensor:
        xq, xs = self._quantize(x2)
        return torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                bias=self.bias.to(x2.dtype) if bias_in_kernel and self.bias is not None else None,
                                out_dtype=x2.dtype)

    def _emulated(self, x2: torch.Tensor) -> torch.Tensor:
        """What ``_scaled_mm`` computes: the e4m3 values' product accumulated in float32, then both scales."""
        xq, xs = self._quantize(x2)
        return (xq.float() @ self.weight_fp8.float().t()) * xs * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear takes [..., {self.in_features}], got {list(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # CUDA's kernel adds a bias only to a bfloat16 or float16 output, of the output's dtype.
        bias_in_kernel = self.bias is not None and x.dtype in (torch.bfloat16, torch.float16)
        if x.dtype in SOURCE_DTYPES and self._use_scaled_mm(x2, bias_in_kernel):
            y = self._scaled_mm(x2, bias_in_kernel)
            if self.bias is not None and not bias_in_kernel:
                y = y + self.bias.to(y.dtype)
        else:
            yf = self._emulated(x2)
            if self.bias is not None:
                yf = yf + self.bias.float()
            y = yf.to(x.dtype)
        return y.reshape(*lead, self.out_features)


def _module_at(root: nn.Module, path: str) -> nn.Module | None:
    m = root
    for part in path.split("."):
        child = getattr(m, part, None)
        if not isinstance(child, nn.Module):
            return None
        m = child
    return m


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    parent = root
    for part in parents:
        parent = cast(nn.Module, getattr(parent, part))
    setattr(parent, last, new)


def quantize_blocks(model: AvatarDiT, targets: Sequence[str] = DEFAULT_TARGETS, backend: str = "auto",
                    compiled: bool = False) -> int:
    """Replaces, in place, the ``targets`` linears of every block with ``FP8Linear`` (a target a block lacks,
    such as ``cq`` without text or ``audio_proj`` outside the audio blocks, is skipped). Returns how many.
    ``backend``, ``compiled``: those of every ``FP8Linear`` (``compiled``: fused activation quantization).

    Refuses a model already quantized, a weight dtype FP8 is not made from, and a target that is no linear of
    a block. Quantizes on the model's device, in its dtype: move the model first.
    """
    unknown = sorted(set(targets) - _BLOCK_LINEARS)
    if unknown:
        raise ValueError(f"unknown FP8 targets {unknown}: a block's linears are {sorted(_BLOCK_LINEARS)}")
    done = sum(isinstance(m, FP8Linear) for m in model.blocks.modules())
    if done:
        raise ValueError(f"the model is already quantized to FP8 ({done} FP8Linear layers): quantize a model "
                         "once (build or load it again for another choice of targets)")
    found: list[tuple[nn.Module, str, nn.Linear]] = []
    for blk in model.blocks:
        for path in targets:
            lin = _module_at(blk, path)
            if lin is None:
                continue
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"FP8 target {path!r} is a {type(lin).__name__}, not a Linear")
            if lin.weight.dtype not in SOURCE_DTYPES:
                raise ValueError(f"FP8 weights are quantized from float32, bfloat16 or float16, but {path!r} is "
                                 f"{lin.weight.dtype}: convert the model first (model.to(torch.bfloat16))")
            found.append((blk, path, lin))
    for blk, path, lin in found:  # every target checked before the first is replaced
        _set_module(blk, path, FP8Linear.from_linear(lin, backend, compiled))
    return len(found)


# ---- the stated error ------------------------------------------------------------------------------------------
def _frames_of(x: Any, frame_dims: int) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.float64).reshape(-1, *a.shape[a.ndim - frame_dims:])


def fp8_error(reference_frames: Any, fp8_frames: Any, reference_latents: Any,
              fp8_latents: Any) -> dict[str, float]:
    """What FP8 costs against the reference run of the same stream.

    Frames: uint8 [..., H, W, 3] (any leading axes; a frame is the last three), latents [..., C, h, w] (a latent
    frame is the last three axes), arrays or tensors, in the same order in both runs. Returns:
    ``latent_rel`` ||ref - fp8|| / ||ref|| over all latent frames, ``latent_rel_max`` the largest of that per
    latent frame (frames whose reference is all zero left out), ``psnr_db`` / ``psnr_min_db`` the mean and the
    lowest per-frame PSNR of the decoded frames (peak 255; inf for a frame equal in both), ``max_pixel_diff`` the
    largest absolute difference of one pixel channel, and the counts compared.
    """
    rf, ff = _frames_of(reference_frames, 3), _frames_of(fp8_frames, 3)
    rl, fl = _frames_of(reference_latents, 3), _frames_of(fp8_latents, 3)
    if rf.shape != ff.shape or rl.shape != fl.shape:
        raise ValueError(f"the runs differ in shape: frames {rf.shape} vs {ff.shape}, latents {rl.shape} vs "
                         f"{fl.shape}")
    if len(rf) == 0 or len(rl) == 0:
        raise ValueError("nothing to compare: no frames or no latents")
    dl = (fl - rl).reshape(len(rl), -1)
    nl = rl.reshape(len(rl), -1)
    ref_norm = np.linalg.norm(nl, axis=1)
    per_frame = np.linalg.norm(dl, axis=1)[ref_norm > 0] / ref_norm[ref_norm > 0]
    mse = ((ff - rf) ** 2).reshape(len(rf), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(255.0**2 / mse)
    return {
        "latent_rel": float(np.linalg.norm(dl) / max(float(np.linalg.norm(nl)), 1e-30)),
        "latent_rel_max": float(per_frame.max()) if per_frame.size else 0.0,
        "psnr_db": float(psnr.mean()),
        "psnr_min_db": float(psnr.min()),
        "max_pixel_diff": float(np.abs(ff - rf).max()),
        "frames": len(rf),
        "latent_frames": len(rl),
    }

