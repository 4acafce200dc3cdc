"""Distilling the small decoder from Wan's VAE on the published model's own latents (``avatarforcing distill-decoder``).

Wan's causal decoder is most of a published-model step's cost at 480x832; the project's small autoencoder
(``vae.TinyAutoencoder``, one latent frame -> 4 video frames, stateless) runs instead with ``serve --decoder tiny``,
but it has to learn Wan's latent space. The recipe:

1. Latents from the model itself: a ``StreamEngine`` of the converted checkpoint streams reference faces (the bundled
   one and faces of the project's face renderer, fitted to the model's resolution) with speech (the bundled sample
   at a different offset and gain per stream, some blocks silent); ``denoise_step`` hands over each stream's
   emitted clean latents, in order, without decoding them.
2. Teacher targets: Wan's streamed decoder decodes each stream as the engine does (its cache primed with the
   reference latent, then carried from block to block), 4 frames per latent frame, in the engine's dtype.
3. Student: the small autoencoder at the model's sizes with Wan's ``z_dim`` latent channels; only its decoder
   trains, through ``decode`` on the engine's normalised latents (what ``StreamEngine._decode`` passes it where it
   would pass ``WanVAE.decode_step`` the same latents), with L1 (+ optional MSE) against the teacher's frames,
   AdamW, random batches of latent frames. Whole streams are held out; the held-out error (mean absolute error in
   [-1, 1] units, and PSNR of the uint8 frames) is measured before training, every ``eval_every`` steps and at the
   end.
4. ``checkpoint.save_decoder`` writes the decoder and its metadata; ``serve --decoder tiny --decoder-path FILE``
   loads it (``checkpoint.choose_decoder``).
"""

from __future__ import annotations

import dataclasses
import math
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open

from .checkpoint import (
    DECODER_FORMAT,
    PUBLISHED_FORMAT,
    LoadedModel,
    load_checkpoint,
    load_decoder,
    read_decoder_meta,
    save_decoder,
    small_decoder,
)
from .config import ModelConfig
from .engine import DTYPES, StreamEngine
from .train.common import pick_device
from .vae import TinyAutoencoder, to_pixels
from .wan_vae import WanVAE

__all__ = [
    "DECODER_FORMAT",
    "DistillConfig",
    "DistillData",
    "DistillReport",
    "HeldOutError",
    "collect",
    "distill_decoder",
    "evaluate",
    "fit_image",
    "load_decoder",
    "read_decoder_meta",
    "reference_inputs",
    "save_decoder",
    "stream_seed",
    "train_student",
]

ASSETS = Path(__file__).resolve().parent / "assets"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DistillConfig:
    streams: int = 16  # reference faces streamed, one per stream
    blocks_per_stream: int = 8  # emitted blocks per stream (each block_frames latent frames)
    steps: int = 3000  # optimiser steps
    batch: int = 8  # latent frames per step
    lr: float = 5e-4
    weight_decay: float = 1e-4
    mse_weight: float = 0.0  # the loss: L1 + mse_weight * MSE
    heldout: float = 0.2  # fraction of the streams held out (at least one)
    eval_every: int = 100  # held-out error every this many steps
    sessions: int = 8  # streams the engine runs at once
    silent_blocks: float = 0.2  # fraction of blocks whose audio is silence (the mouth closed)
    device: str = "cpu"
    dtype: str = "float32"  # the engine's and the teacher decoder's dtype (the student trains in float32)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.streams < 2:
            raise ValueError(f"streams must be >= 2 (some train, at least one is held out), got {self.streams}")
        for name in ("blocks_per_stream", "steps", "batch", "eval_every", "sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.mse_weight >= 0):
            raise ValueError("lr must be > 0, weight_decay and mse_weight >= 0")
        if not 0 < self.heldout < 1 or not 0 <= self.silent_blocks < 1:
            raise ValueError("heldout must be in (0, 1) and silent_blocks in [0, 1)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}")

    @property
    def heldout_streams(self) -> int:
        return min(self.streams - 1, max(1, round(self.streams * self.heldout)))


@dataclass
class DistillData:
    """Each stream's emitted latents and Wan's frames for them, on the host."""

    latents: torch.Tensor  # [N, C, h, w] float32: the engine's normalised latents, stream after stream, in order
    frames: torch.Tensor  # [N, 4, 3, H, W] float16 in [-1, 1]: Wan's streamed decode of each latent frame
    stream: torch.Tensor  # [N] long: the stream of each latent frame
    refs: torch.Tensor  # [streams, C, h, w] float32: each stream's reference latent (its decoder's first frame)

    def select(self, streams: Sequence[int]) -> DistillData:
        keep = torch.isin(self.stream, torch.tensor(list(streams), dtype=torch.long))
        return DistillData(self.latents[keep], self.frames[keep], self.stream[keep], self.refs)

    def __len__(self) -> int:
        return int(self.latents.shape[0])


@dataclass(frozen=True)
class HeldOutError:
    mae: float  # mean absolute error of the frames in [-1, 1] units (the student's clamped, as the engine shows it)
    psnr: float  # dB, of the uint8 frames (the student's against Wan's)

    def __str__(self) -> str:
        return f"MAE {self.mae:.4f}, PSNR {self.psnr:.2f} dB"


@dataclass
class DistillReport:
    steps: int
    train_frames: int  # latent frames
    heldout_frames: int
    start: HeldOutError
    end: HeldOutError
    history: list[tuple[int, HeldOutError]] = field(default_factory=list)
    seconds_data: float = 0.0
    seconds_train: float = 0.0
    out: Path | None = None
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "train_latent_frames": self.train_frames,
                "heldout_latent_frames": self.heldout_frames,
                "start": dataclasses.asdict(self.start), "end": dataclasses.asdict(self.end),
                "seconds_data": round(self.seconds_data, 2), "seconds_train": round(self.seconds_train, 2)}


# ---- inputs ---------------------------------------------------------------------------------------------------
def fit_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: the centre cropped to the target's aspect, then resized."""
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        cw = max(1, round(h * target))
        image = image[:, (w - cw) // 2:(w - cw) // 2 + cw]
    else:
        ch = max(1, round(w / target))
        image = image[(h - ch) // 2:(h - ch) // 2 + ch]
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    img = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def _read_speech(path: Path) -> np.ndarray:
    """16-bit mono 16 kHz WAV -> float32 [S] in [-1, 1]."""
    with wave.open(str(path)) as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 16000):
            raise ValueError(f"{path}: expected 16-bit mono 16 kHz audio")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def reference_inputs(cfg: ModelConfig, streams: int, samples: int, block_samples: int, seed: int = 0,
                     silent_blocks: float = 0.2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(face uint8 [H, W, 3] at the model's resolution, audio float32 [samples] at 16 kHz) per stream.

    Faces: the bundled reference face, then faces of the project's renderer (``data.face``), each fitted to the
    model's resolution. Audio: the bundled speech from a random offset (wrapping around), at a random gain, with a
    fraction ``silent_blocks`` of the blocks silent."""
    from .data.face import render_reference, sample_identity

    rng = np.random.default_rng([0xD157, seed])
    speech = _read_speech(ASSETS / "speech_16k.wav")
    bundled = np.asarray(Image.open(ASSETS / "reference_face.png").convert("RGB"), dtype=np.uint8)
    out = []
    for i in range(streams):
        face = bundled if i == 0 else render_reference(sample_identity(10_000 * seed + i))
        start = int(rng.integers(len(speech)))
        audio = np.take(speech, np.arange(start, start + samples), mode="wrap") * float(rng.uniform(0.3, 1.0))
        for b in range(0, samples, block_samples):
            if rng.random() < silent_blocks:
                audio[b:b + block_samples] = 0.0
        out.append((fit_image(face, cfg.height, cfg.width), audio.astype(np.float32)))
    return out


# ---- latents and the teacher's frames -------------------------------------------------------------------------
def stream_seed(dc: DistillConfig, stream: int) -> int:
    """The engine's noise seed of a stream (``StreamEngine.allocate``)."""
    return dc.seed * 100_003 + stream


def collect(lm: LoadedModel, dc: DistillConfig, progress: Progress | None = None) -> DistillData:
    """Streams ``dc.streams`` faces through the model and decodes each stream's emitted latents with Wan's decoder.

    The engine runs ``dc.sessions`` streams at a time; each stream's latents are what ``denoise_step`` returns,
    and its teacher frames are Wan's ``decode_step`` over them with the cache the engine keeps: primed with the
    reference latent (``first=True``, its frame dropped), then carried block after block.
    """
    vae = lm.vae
    if not isinstance(vae, WanVAE):
        raise ValueError(f"{lm.source}: not a converted published checkpoint (it has no Wan VAE to distil from; "
                         "convert the published files with `avatarforcing convert`)")
    dev = pick_device(dc.device)
    sessions = min(dc.sessions, dc.streams)
    # The engine only encodes the references and denoises here (``decoder``: a stand-in, never run), so it keeps
    # no decoder cache of its own; the teacher's caches below are the ones it would keep.
    eng = StreamEngine(lm.model, vae, lm.stream_cfg, max_sessions=sessions, device=dev, dtype=dc.dtype,
                       audio=lm.audio, context=lm.context, decoder=small_decoder(lm.model_cfg, vae.config.z_dim))
    steps = eng.L - 1 + dc.blocks_per_stream
    inputs = reference_inputs(lm.model_cfg, dc.streams, steps * eng.block_samples, eng.block_samples, dc.seed,
                              dc.silent_blocks)
    latents: list[torch.Tensor] = []
    frames: list[torch.Tensor] = []
    stream_ids: list[torch.Tensor] = []
    refs: list[torch.Tensor] = []
    for first in range(0, dc.streams, sessions):
        group = list(range(first, min(first + sessions, dc.streams)))
        anchors = [eng.prepare_anchor(inputs[i][0]) for i in group]
        slots = [eng.allocate(a, seed=stream_seed(dc, i)) for a, i in zip(anchors, group, strict=True)]
        with torch.inference_mode():
            ref = torch.stack([a.ref_latent for a in anchors]).to(dev, eng.dtype)  # [n, C, h, w]
            _, cache = vae.decode_step(ref[:, :, None], None, first=True)
            lat_g, fr_g = [], []
            for k in range(steps):
                pcm = np.stack([inputs[i][1][k * eng.block_samples:(k + 1) * eng.block_samples] for i in group])
                clean = eng.denoise_step(slots, pcm)  # [m, B, C, h, w]: every slot of the group, or none
                if clean.shape[0] == 0:
                    continue
                if clean.shape[0] != len(group):
                    raise RuntimeError(f"{clean.shape[0]} of {len(group)} streams emitted a block")
                out, cache = vae.decode_step(clean.transpose(1, 2), cache, first=False)  # [n, 3, 4B, H, W]
                n, B = clean.shape[:2]
                per = out.transpose(1, 2)  # [n, 4B, 3, H, W]
                lat_g.append(clean.float().cpu())
                fr_g.append(per.reshape(n, B, per.shape[1] // B, *per.shape[2:]).cpu())
        for s in slots:
            eng.free(s)
        lat = torch.cat(lat_g, dim=1)  # [n, K, C, h, w]
        fr = torch.cat(fr_g, dim=1)  # [n, K, 4, 3, H, W]
        for j, i in enumerate(group):
            latents.append(lat[j])
            refs.append(anchors[j].ref_latent.float().cpu())
            frames.append(fr[j].to(torch.float16))
            stream_ids.append(torch.full((lat.shape[1],), i, dtype=torch.long))
        if progress is not None:
            progress(f"streams {group[-1] + 1}/{dc.streams}: {lat.shape[1]} latent frames each")
    del eng
    # Made outside inference mode (the per-stream tensors too): ordinary tensors that training may save for backward.
    return DistillData(torch.cat(latents), torch.cat(frames), torch.cat(stream_ids), torch.stack(refs))


# ---- the student ----------------------------------------------------------------------------------------------
def _decode(student: TinyAutoencoder, latents: torch.Tensor) -> torch.Tensor:
    """Latent frames [n, C, h, w] -> [n, 4, 3, H, W], as the engine calls the decoder (one latent frame each)."""
    return student.decode(latents[:, None])


@torch.no_grad()
def evaluate(student: TinyAutoencoder, data: DistillData, device: torch.device, chunk: int = 16) -> HeldOutError:
    """The student's error against Wan's frames over ``data``: MAE of its clamped frames, PSNR of the uint8 ones."""
    abs_sum, sq_sum, count = 0.0, 0.0, 0
    was_training = student.training
    student.eval()
    for i in range(0, len(data), chunk):
        lat = data.latents[i:i + chunk].to(device)
        want = data.frames[i:i + chunk].to(device, torch.float32)
        got = _decode(student, lat).float()
        abs_sum += float((got.clamp(-1, 1) - want).abs().sum())
        sq_sum += float(((to_pixels(got).float() - to_pixels(want).float()) ** 2).sum())
        count += want.numel()
    student.train(was_training)
    mse = sq_sum / max(count, 1)
    psnr = 10 * math.log10(255.0**2 / mse) if mse > 0 else 100.0
    return HeldOutError(abs_sum / max(count, 1), min(psnr, 100.0))


def train_student(train: DistillData, heldout: DistillData, model_cfg: ModelConfig, z_dim: int, dc: DistillConfig,
                  progress: Progress | None = None) -> tuple[TinyAutoencoder, list[tuple[int, HeldOutError]]]:
    """Trains the small decoder on ``train`` (AdamW, L1 + ``mse_weight`` MSE, a short warm-up then cosine decay to a
    tenth of ``lr``); returns it and the held-out error at step 0, every ``eval_every`` steps and the last step."""
    dev = pick_device(dc.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dc.seed)
        student = small_decoder(model_cfg, z_dim)
    student.encoder = torch.nn.Sequential()  # never used: the engine only decodes with it
    student.to(dev).train()
    params = list(student.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=dc.lr, weight_decay=dc.weight_decay)
    warm = min(100, max(1, dc.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, dc.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(dc.seed)
    history = [(0, evaluate(student, heldout, dev))]
    if progress is not None:
        progress(f"step 0/{dc.steps}: held-out {history[0][1]}")
    run_loss, run_n = 0.0, 0
    for step in range(1, dc.steps + 1):
        idx = torch.randint(len(train), (dc.batch,), generator=gen)
        lat = train.latents[idx].to(dev, non_blocking=True)
        want = train.frames[idx].to(dev, torch.float32, non_blocking=True)
        got = _decode(student, lat)
        loss = F.l1_loss(got, want)
        if dc.mse_weight:
            loss = loss + dc.mse_weight * F.mse_loss(got, want)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
        if step % dc.eval_every == 0 or step == dc.steps:
            err = evaluate(student, heldout, dev)
            history.append((step, err))
            if progress is not None:
                progress(f"step {step}/{dc.steps}: train loss {run_loss / run_n:.4f}, held-out {err}")
            run_loss, run_n = 0.0, 0
    return student.eval(), history


def _check_published(path: Path) -> None:
    """Refuses a checkpoint that is not a converted published one before loading it (1.3 B parameters); files
    that cannot be read are left to ``load_checkpoint``, whose messages say why."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError):
        return
    if "model_config" in md and md.get("format") != PUBLISHED_FORMAT:
        raise ValueError(f"{path}: not a converted published checkpoint (it has no Wan VAE to distil from; convert "
                         "the published files with `avatarforcing convert`)")


def distill_decoder(checkpoint: str | Path, out: str | Path | None, dc: DistillConfig,
                    progress: Progress | None = None, loaded: LoadedModel | None = None) -> DistillReport:
    """The whole recipe on a converted published checkpoint: latents, Wan's frames, training, the file ``out``
    (None: not written). ``loaded``: the checkpoint already loaded (else it is loaded from ``checkpoint``)."""
    if loaded is None:
        _check_published(Path(checkpoint))
    lm = loaded if loaded is not None else load_checkpoint(checkpoint)
    if not isinstance(lm.vae, WanVAE):
        raise ValueError(f"{checkpoint}: not a converted published checkpoint (it has no Wan VAE to distil from; "
                         "convert the published files with `avatarforcing convert`)")
    z_dim = lm.vae.config.z_dim
    t0 = time.perf_counter()
    data = collect(lm, dc, progress)
    held = list(range(dc.streams - dc.heldout_streams, dc.streams))
    train, heldout = data.select(range(dc.streams - dc.heldout_streams)), data.select(held)
    t1 = time.perf_counter()
    if progress is not None:
        progress(f"{len(train)} latent frames to train on, {len(heldout)} held out (streams {held[0]}.."
                 f"{held[-1]}), collected in {t1 - t0:.1f} s")
    student, history = train_student(train, heldout, lm.model_cfg, z_dim, dc, progress)
    t2 = time.perf_counter()
    rep = DistillReport(dc.steps, len(train), len(heldout), history[0][1], history[-1][1], history, t1 - t0, t2 - t1)
    if out is not None:
        meta = {"steps": dc.steps, "heldout_error": dataclasses.asdict(rep.end), "source_checkpoint": str(checkpoint),
                "report": rep.to_dict(), "distill": dataclasses.asdict(dc)}
        rep.bytes = save_decoder(out, student, lm.model_cfg, z_dim, meta)
        rep.out = Path(out)
    return rep
