"""The whole recipe, stage by stage, into one run folder (resumable), and the serving checkpoint.

Stages, in order (``avatarforcing train --stages ...``):

``ae``       the tiny autoencoder on pixel clips of the train split;
``latents``  every train clip encoded once (cached as ``latents.safetensors``);
``teacher``  bidirectional multi-step flow matching with CFG dropout;
``ode``      teacher trajectories sampled and stored (``trajectories.safetensors``);
``stage1``   the AvatarForcing student regressed on mixed-level windows from them;
``ar1``      the autoregressive-forcing baseline, the same regression with no local future;
``dmd``      stage 2 for the student: DMD on its own sliding-window rollouts;
``ar2``      stage 2 for the baseline with the same budget;
``export``   ``student.safetensors`` / ``ar.safetensors`` / ``teacher.safetensors`` serving
             checkpoints (model + autoencoder + stream config + model card metadata).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, StreamConfig, model_preset
from ..model import AvatarDiT
from ..vae import TinyAutoencoder
from .ae import AEConfig, train_autoencoder
from .common import load_modules, pick_device
from .data import ClipBank, LatentBank
from .distill import DMDConfig, ODEConfig, Stage1Config, level_steps, make_trajectories, train_dmd, train_stage1
from .teacher import TeacherConfig, train_teacher

log = logging.getLogger("avatarforcing.train")

STAGES = ("ae", "latents", "teacher", "ode", "stage1", "ar1", "dmd", "ar2", "export")


@dataclass
class Budget:
    """Sizes and step counts of every stage (``default``: the shipped model, on 2 CPU cores)."""

    name: str = "default"
    preset: str = "tiny"
    seed: int = 0
    train_clips: int = 160
    clip_seconds: float = 10.0
    ae: AEConfig = field(default_factory=AEConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    stream: dict[str, Any] = field(default_factory=lambda: StreamConfig().to_dict())
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def budget(name: str) -> Budget:
    if name == "default":
        return Budget(ae=AEConfig(steps=3000, batch=16), teacher=TeacherConfig(steps=3000, batch=8),
                      ode=ODEConfig(trajectories=256, batch=16), stage1=Stage1Config(steps=800, batch=16),
                      dmd=DMDConfig(steps=120, batch=4, critic_steps=3, lr=4e-5))
    if name == "smoke":  # every stage for a few steps (tests, CI)
        return Budget(name="smoke", train_clips=3, clip_seconds=3.0, ae=AEConfig(steps=3, batch=2),
                      teacher=TeacherConfig(steps=3, batch=2, clip_frames=8),
                      ode=ODEConfig(trajectories=2, batch=2), stage1=Stage1Config(steps=3, batch=2),
                      dmd=DMDConfig(steps=2, batch=1, critic_steps=1))
    raise ValueError(f"unknown budget {name!r}; choose default or smoke")


class Run:
    """One training run folder and the objects its stages pass to each other."""

    def __init__(self, run_dir: Path, b: Budget, device: torch.device, progress: bool = True) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.b, self.device, self.progress = b, device, progress
        self.cfg: ModelConfig = model_preset(b.preset)
        self.stats: dict[str, Any] = {}
        self._bank: ClipBank | None = None
        self.vae: TinyAutoencoder | None = None
        self.latents: LatentBank | None = None
        budget_file = self.dir / "budget.json"
        if budget_file.is_file():
            old = json.loads(budget_file.read_text())
            if old != json.loads(json.dumps(b.to_dict())):
                raise ValueError(f"{self.dir} was trained with another budget ({old.get('name')}); "
                                 f"use a new --run folder")
        else:
            budget_file.write_text(json.dumps(b.to_dict(), indent=1))

    # ---- shared inputs -------------------------------------------------------------------
    def bank(self) -> ClipBank:
        if self._bank is None:
            self._bank = ClipBank.generate("train", self.b.train_clips, self.b.clip_seconds, self.b.seed,
                                           self.progress)
        return self._bank

    def autoencoder(self) -> TinyAutoencoder:
        if self.vae is None:
            path = self.dir / "autoencoder.safetensors"
            if not path.is_file():
                raise RuntimeError("stage 'ae' has not run in this run folder")
            vae = TinyAutoencoder(self.cfg)
            load_modules(path, {"vae": vae})
            self.vae = vae.to(self.device).eval()
        return self.vae

    def latent_bank(self) -> LatentBank:
        if self.latents is None:
            path = self.dir / "latents.safetensors"
            if not path.is_file():
                raise RuntimeError("stage 'latents' has not run in this run folder")
            self.latents = LatentBank.load(path)
        return self.latents

    def teacher_model(self) -> AvatarDiT:
        path = self.dir / "teacher.safetensors"
        if not path.is_file():
            raise RuntimeError("stage 'teacher' has not run in this run folder")
        m = AvatarDiT(self.cfg)
        load_modules(path, {"dit": m})
        return m.to(self.device).eval()

    # ---- stages ------------------------------------------------------------------------
    def stage_ae(self) -> None:
        self.vae, st = train_autoencoder(self.cfg, self.bank(), self.dir, self.b.ae, self.device, self.progress)
        self.stats["ae"] = st

    def stage_latents(self) -> None:
        path = self.dir / "latents.safetensors"
        if path.is_file():
            return
        lb = LatentBank.encode(self.bank(), self.autoencoder(), self.cfg, self.device, self.progress)
        lb.save(path)
        self.latents = lb

    def stage_teacher(self) -> None:
        torch.manual_seed(self.b.seed)
        model = AvatarDiT(self.cfg)
        self.stats["teacher"] = train_teacher(model, self.latent_bank(), self.dir, self.b.teacher, self.device,
                                              self.progress)

    @property
    def stream(self) -> StreamConfig:
        return StreamConfig.from_dict(self.b.stream)

    def trajectories(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.dir / "trajectories.safetensors"
        if not path.is_file():
            raise RuntimeError("stage 'ode' has not run in this run folder")
        return load_file(str(path))

    def stage_ode(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / "trajectories.safetensors"
        if path.is_file():
            return
        keep = sorted(set(level_steps(self.stream, self.b.ode.n_steps))
                      | set(level_steps(StreamConfig.ar_baseline(), self.b.ode.n_steps)))
        tr = make_trajectories(self.teacher_model(), self.latent_bank(), self.b.teacher.clip_frames, self.b.ode,
                               keep, self.device, self.progress)
        save_file({k: v.contiguous() for k, v in tr.items()}, str(path))

    def _stage1(self, name: str, stream: StreamConfig) -> None:
        model = self.teacher_model().train()  # the student starts from the teacher's weights
        self.stats[name] = train_stage1(model, stream, self.trajectories(), self.latent_bank(), self.dir, name,
                                        self.b.stage1, self.device, self.progress)

    def stage_stage1(self) -> None:
        self._stage1("stage1", self.stream)

    def stage_ar1(self) -> None:
        self._stage1("ar1", StreamConfig.ar_baseline())

    def _dmd(self, name: str, init: str, stream: StreamConfig) -> None:
        path = self.dir / f"{init}.safetensors"
        if not path.is_file():
            raise RuntimeError(f"stage {init!r} has not run in this run folder")
        student = AvatarDiT(self.cfg)
        load_modules(path, {"dit": student})
        _, st = train_dmd(student, self.teacher_model(), stream, self.latent_bank(), self.dir, name, self.b.dmd,
                          self.device, self.progress)
        self.stats[name] = st

    def stage_dmd(self) -> None:
        self._dmd("dmd", "stage1", self.stream)

    def stage_ar2(self) -> None:
        self._dmd("ar2", "ar1", StreamConfig.ar_baseline())

    def stage_export(self) -> None:
        from ..checkpoint import save_checkpoint
        from .common import read_meta

        vae = self.autoencoder()
        card = {"budget": self.b.to_dict(), "train_seconds": self._seconds()}
        for out, src, stream, role in (("student", "dmd", self.stream, "avatarforcing-student"),
                                       ("ar", "ar2", StreamConfig.ar_baseline(), "ar-baseline"),
                                       ("teacher", "teacher", self.stream, "teacher")):
            m = AvatarDiT(self.cfg)
            path = self.dir / f"{src}.safetensors"
            load_modules(path, {"dit": m})
            meta = dict(card, role=role, stage=src, stage_stats=read_meta(path))
            save_checkpoint(self.dir / f"{out}.safetensors", m, vae, stream, meta)

    def _seconds(self) -> dict[str, float]:
        return {f.stem: float(f.read_text()) for f in sorted(self.dir.glob("*.seconds"))}

    def run(self, stages: list[str]) -> dict[str, Any]:
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
        for s in STAGES:
            if s in stages:
                t0 = time.perf_counter()
                log.info("stage %s", s)
                getattr(self, f"stage_{s}")()
                dt = round(time.perf_counter() - t0, 1)
                self.stats.setdefault("seconds", {})[s] = dt
                # one file per stage, so that stages may run in parallel processes (AF and AR)
                f = self.dir / f"{s}.seconds"
                prev = float(f.read_text()) if f.is_file() and s != "export" else 0.0
                f.write_text(f"{prev + dt:.1f}\n")
        return self.stats


def train_main(run_dir: str | Path, stages: str = "all", budget_name: str = "default", device: str = "auto",
               threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    want = list(STAGES) if stages == "all" else [s.strip() for s in stages.split(",") if s.strip()]
    r = Run(Path(run_dir), budget(budget_name), pick_device(device), progress)
    return r.run(want)

