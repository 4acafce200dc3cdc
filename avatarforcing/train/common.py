"""Shared training plumbing: device choice, resumable stage checkpoints (safetensors), EMA."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger("avatarforcing.train")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available")
    return dev


def module_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            out[f"{name}.{k}"] = v.detach().to("cpu").contiguous()
    return out


def save_modules(path: Path, modules: dict[str, nn.Module], meta: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(module_tensors(modules), str(tmp), metadata={"meta": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_modules(path: Path, modules: dict[str, nn.Module]) -> None:
    sd = load_file(str(path))
    for name, m in modules.items():
        pre = name + "."
        part = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
        if not part:
            raise ValueError(f"{path} holds no weights for {name!r}")
        m.load_state_dict(part)


class StageCheckpoint:
    """One stage's resumable state in ``run_dir``.

    ``<stage>.safetensors`` holds the final weights (the stage is done when it exists);
    ``<stage>.resume.safetensors`` + ``<stage>.resume.pt`` (optimizer states, step, RNG) are
    written every ``every`` steps and removed when the stage finishes.
    """

    def __init__(self, run_dir: Path, stage: str, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], every: int = 100) -> None:
        self.run_dir, self.stage = Path(run_dir), stage
        self.modules, self.optimizers, self.every = modules, optimizers, every
        self.final = self.run_dir / f"{stage}.safetensors"
        self.resume_w = self.run_dir / f"{stage}.resume.safetensors"
        self.resume_s = self.run_dir / f"{stage}.resume.pt"
        self.extra: dict[str, Any] = {}

    def done(self) -> bool:
        return self.final.is_file()

    def start(self) -> int:
        """Loads the resume state if there is one; returns the step to start from."""
        if not (self.resume_w.is_file() and self.resume_s.is_file()):
            return 0
        load_modules(self.resume_w, self.modules)
        st = torch.load(self.resume_s, map_location="cpu", weights_only=False)
        for k, opt in self.optimizers.items():
            opt.load_state_dict(st["optimizers"][k])
        torch.set_rng_state(st["rng"])
        self.extra = st.get("extra", {})
        log.info("resuming stage %s at step %d", self.stage, st["step"])
        return int(st["step"])

    def maybe_save(self, step: int, force: bool = False) -> None:
        if not force and (step == 0 or step % self.every):
            return
        save_modules(self.resume_w, self.modules)
        tmp = self.resume_s.with_suffix(".tmp")
        torch.save({"step": step, "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                    "rng": torch.get_rng_state(), "extra": self.extra}, tmp)
        os.replace(tmp, self.resume_s)

    def finish(self, final_modules: dict[str, nn.Module] | None = None, meta: dict[str, Any] | None = None) -> None:
        save_modules(self.final, final_modules or self.modules, meta)
        for p in (self.resume_w, self.resume_s):
            p.unlink(missing_ok=True)

    def load_final(self, modules: dict[str, nn.Module] | None = None) -> None:
        load_modules(self.final, modules or self.modules)


def read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    return dict(json.loads(md.get("meta", "{}")))


def apply_step(opt: torch.optim.Optimizer, params: Any, loss: torch.Tensor, clip: float = 1.0) -> None:
    """Backward, gradient-norm clipping and one optimizer step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


class RunningLoss:
    """An exponential moving average of a loss, for progress bars and the stage's final report."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.value: float | None = None

    def update(self, loss: torch.Tensor) -> float:
        x = float(loss.item())
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x
        return self.value

    def __float__(self) -> float:
        return float(self.value or 0.0)


class EMA:
    """Exponential moving average of a module's parameters (kept in a copy of the module)."""

    def __init__(self, model: nn.Module, shadow: nn.Module, decay: float) -> None:
        self.model, self.shadow, self.decay = model, shadow, decay
        shadow.load_state_dict(model.state_dict())
        shadow.requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        for ps, pm in zip(self.shadow.parameters(), self.model.parameters(), strict=True):
            ps.lerp_(pm.detach(), 1.0 - self.decay)
