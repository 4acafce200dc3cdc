"""FP8 against the unquantized engine on the same stream: the stated error and the time of a step.

``compare_fp8`` is what a benchmark calls (``tools/gpubench.py`` on a GPU, tests/test_fp8.py on a CPU at reduced
size). It lives beside ``fp8`` rather than in it because it builds engines, and the engine imports ``fp8``.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import attention as attention_kernels
from .config import StreamConfig
from .engine import Autoencoder, StreamEngine
from .fp8 import FP8Linear, fp8_error
from .model import AvatarDiT


class _RecordingEngine(StreamEngine):
    """The engine, keeping a copy of the clean latents of every block it decodes (in the order decoded)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.latents: list[torch.Tensor] = []
        super().__init__(*args, **kw)

    def _decode(self, idx: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        self.latents.append(clean.to(torch.float32, copy=True))
        return super()._decode(idx, clean)


def _run(engine: _RecordingEngine, steps: int, sessions: int, seed: int, face: np.ndarray | None,
         ) -> tuple[np.ndarray, torch.Tensor, list[float]]:
    """Steps ``sessions`` streams of one avatar ``steps`` times: (frames [n, H, W, 3], emitted latents
    [n_latent, C, h, w], wall ms of each step, waited for)."""
    c = engine.cfg
    if face is None:
        face = (np.random.default_rng(seed).random((c.height, c.width, 3)) * 255).astype(np.uint8)
    anchor = engine.prepare_anchor(face)
    slots = [engine.allocate(anchor, seed=seed + i + 1) for i in range(sessions)]
    rng = np.random.default_rng(seed + 1)
    frames: list[np.ndarray] = []
    ms: list[float] = []
    for _ in range(steps):
        pcm = (rng.standard_normal((sessions, engine.block_samples)) * 0.1).astype(np.float32)
        engine.synchronize()
        t0 = time.perf_counter()
        results = engine.step(slots, pcm)  # waits for its frames
        ms.append((time.perf_counter() - t0) * 1e3)
        frames += [r.frames for r in results if r.frames is not None]
    lat = engine.latents
    if not frames or not lat:
        raise ValueError(f"{steps} steps emitted no block (the warm-up takes {engine.warmup_steps}): run more")
    return np.concatenate(frames), torch.cat([t.flatten(0, 1) for t in lat]).cpu(), ms


def compare_fp8(model_factory: Callable[[], AvatarDiT], vae: Autoencoder, stream: StreamConfig, *,
                device: str | torch.device = "cuda", dtype: str = "bfloat16", steps: int = 12, sessions: int = 1,
                seed: int = 0, face: np.ndarray | None = None, fp8_products: bool = True,
                fp8_attention: bool | str = False, **engine_kw: Any) -> dict[str, Any]:
    """Runs the same streams (avatar, audio, noise) through an engine of ``dtype`` and one of ``dtype`` with FP8
    products, one after the other (one model in memory at a time), and compares them.

    ``model_factory`` makes the model (called once per engine, after ``torch.manual_seed(seed)``, so a randomly
    initialised one is the same both times); ``vae`` and ``engine_kw`` (compile, attention, audio, context,
    decoder, ...) go to both engines; ``face``: the reference image, uint8 [H, W, 3] (default: random pixels; a
    trained model's error is its own on a real face). Returns ``fp8_error``'s measures under "error", the median
    ms of a step past the warm-up for each engine (a whole ``step``: denoising, decoding, frames to the host),
    their ratio, and how many linears FP8 replaced.

    What the second engine runs in FP8: its products (``fp8_products``), and its attention with ``fp8_attention``:
    "kernel" runs FlashAttention-3's FP8 kernel (the engine's ``fp8_attention``: CUDA, Hopper, the fa3-fwd
    package), "emulated" (or True) rounds as such a kernel would, in float32 (``attention.emulate_fp8``: a statement
    of the error it would add, not of its speed; the step times then measure the emulation).
    """
    if "fp8" in engine_kw or "fp8_attention" in engine_kw:
        raise ValueError("compare_fp8 runs both engines itself: do not pass fp8 or fp8_attention")
    if fp8_attention not in (False, True, "emulated", "kernel"):
        raise ValueError(f"fp8_attention must be False, 'emulated' or 'kernel', not {fp8_attention!r}")
    kernel, emulated = fp8_attention == "kernel", fp8_attention in (True, "emulated")
    if not (fp8_products or kernel or emulated):
        raise ValueError("compare_fp8 needs something in FP8: fp8_products, fp8_attention or both")
    runs: dict[bool, tuple[np.ndarray, torch.Tensor, list[float]]] = {}
    layers, skip = 0, 0
    for fp8 in (False, True):
        torch.manual_seed(seed)
        eng = _RecordingEngine(model_factory(), vae, stream, max_sessions=sessions, device=device, dtype=dtype,
                               fp8=fp8 and fp8_products, fp8_attention=fp8 and kernel, **engine_kw)
        if fp8:
            layers = sum(isinstance(m, FP8Linear) for m in eng.model.modules())
        with attention_kernels.emulate_fp8(fp8 and emulated):
            runs[fp8] = _run(eng, steps, sessions, seed, face)
        skip = eng.warmup_steps + 1  # the masked warm-up passes and the first steady one (first calls)
        del eng
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    (f0, l0, ms0), (f1, l1, ms1) = runs[False], runs[True]
    skip = min(skip, steps - 1)  # a run too short to get past the warm-up: its last step
    ref_ms, fp8_ms = statistics.median(ms0[skip:]), statistics.median(ms1[skip:])
    return {
        "dtype": dtype,
        "steps": steps,
        "sessions": sessions,
        "fp8_layers": layers,
        "fp8_attention": "kernel" if kernel else "emulated" if emulated else None,
        "error": fp8_error(f0, f1, l0, l1),
        "reference_ms_per_step": ref_ms,
        "fp8_ms_per_step": fp8_ms,
        "speedup": ref_ms / fp8_ms if fp8_ms > 0 else float("nan"),
    }
