"""Splits, clips and on-disk datasets of the synthetic talking-head benchmark.

``make_splits(seed)`` partitions every pool so that train / val / test share nothing:

* identities: identity seeds come from disjoint ranges (train ``[0, 1e6)``, val ``[1e6, 2e6)``,
  test ``[2e6, 3e6)``; clip ``i`` of a split uses seed ``start + i``);
* voices: the espeak-ng base voices and the variants are each shuffled (by ``seed``) and
  partitioned, so no (base, variant) voice - and no base or variant - appears in two splits;
* sentences: the sentence pool is shuffled and partitioned (about 70 / 15 / 15 %).

``make_clip(split, index, seconds)`` is deterministic in (seed, split, index, seconds).
``LONG_FORM`` is the long-form test configuration (clips of 60 s = 1,500 frames).

On disk (``write_dataset``): one ``clip_XXXXX.npz`` per clip (``np.savez_compressed``) holding
``audio`` float32 [S], ``frames`` uint8 [T, 128, 128, 3], ``jaw`` / ``spread`` / ``round``
float32 [T], ``reference`` uint8 [128, 128, 3], ``mouth_box`` int64 [4] and ``meta`` (a JSON
string: identity parameters, voice, texts, split, index, fps, sample rate), plus a
``manifest.json``. ``load_clip(path)`` reads one back into the ``make_clip`` dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .articulation import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, articulation_from_audio
from .face import Identity, mouth_box, render, render_reference, sample_identity
from .speech import BASE_VOICES, SENTENCES, VARIANTS, Voice, make_speech, sample_voice

SPLITS = ("train", "val", "test")
IDENTITY_RANGE = 1_000_000


@dataclass(frozen=True)
class SplitSpec:
    name: str
    seed: int
    identity_start: int
    identity_stop: int
    base_voices: tuple[str, ...]
    variants: tuple[str, ...]
    sentences: tuple[str, ...]

    @property
    def voices(self) -> tuple[str, ...]:
        """All espeak-ng voice names (base+variant) this split may use."""
        return tuple(f"{b}+{v}" for b in self.base_voices for v in self.variants)

    def identity_seed(self, index: int) -> int:
        if not 0 <= index < self.identity_stop - self.identity_start:
            raise IndexError(f"clip index {index} out of range for split {self.name!r}")
        return self.identity_start + index


@dataclass(frozen=True)
class LongFormConfig:
    split: str = "test"
    seconds: float = 60.0
    n_clips: int = 8

    @property
    def frames(self) -> int:
        return int(round(self.seconds * FPS))


LONG_FORM = LongFormConfig()


def _partition(items: tuple[str, ...], rng: np.random.Generator, fracs: tuple[float, float] = (0.7, 0.15),
               ) -> list[tuple[str, ...]]:
    order = [items[i] for i in rng.permutation(len(items))]
    n = len(order)
    n_train = int(round(fracs[0] * n))
    n_val = max(1, int(round(fracs[1] * n)))
    return [tuple(order[:n_train]), tuple(order[n_train:n_train + n_val]), tuple(order[n_train + n_val:])]


def make_splits(seed: int = 0) -> dict[str, SplitSpec]:
    """train / val / test with disjoint identities, voices and sentences (see module docstring)."""
    rng = np.random.default_rng([0x5EED, int(seed)])
    bases = _partition(BASE_VOICES, rng)
    variants = _partition(VARIANTS, rng)
    sents = _partition(SENTENCES, rng)
    return {
        name: SplitSpec(name=name, seed=int(seed), identity_start=i * IDENTITY_RANGE,
                        identity_stop=(i + 1) * IDENTITY_RANGE, base_voices=bases[i], variants=variants[i],
                        sentences=sents[i])
        for i, name in enumerate(SPLITS)
    }


def _spec(split: str | SplitSpec, seed: int) -> SplitSpec:
    if isinstance(split, SplitSpec):
        return split
    specs = make_splits(seed)
    if split not in specs:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return specs[split]


def make_clip(split: str | SplitSpec, index: int, seconds: float = 10.0, seed: int = 0) -> dict[str, Any]:
    """One clip: audio float32 [S], frames uint8 [T, 128, 128, 3], articulation, identity, reference.

    ``S = T * 640`` with ``T = round(seconds * 25)``. Keys: ``audio``, ``frames``,
    ``articulation`` (dict of float32 [T]: ``jaw``, ``spread``, ``round``), ``identity`` (dict of
    the face parameters), ``reference`` uint8 [128, 128, 3], ``mouth_box`` (y0, y1, x0, x1),
    ``voice`` (dict), ``texts``, ``split``, ``index``, ``fps``, ``sample_rate``.
    """
    spec = _spec(split, seed)
    n_frames = int(round(seconds * FPS))
    if n_frames < 1:
        raise ValueError("seconds must give at least one frame")
    split_id = SPLITS.index(spec.name) if spec.name in SPLITS else 99
    rng = np.random.default_rng([0xC11B, spec.seed, split_id, int(index)])
    identity = sample_identity(spec.identity_seed(index))
    voice = sample_voice(rng, spec.base_voices, spec.variants)
    audio, texts = make_speech(rng, n_frames * SAMPLES_PER_FRAME, voice, spec.sentences)
    art = articulation_from_audio(audio, SAMPLE_RATE, FPS)
    frames = render(identity, art, motion_seed=int(rng.integers(2**31)))
    return {
        "audio": audio, "frames": frames, "articulation": art.to_dict(), "identity": identity.to_dict(),
        "reference": render_reference(identity), "mouth_box": mouth_box(identity),
        "voice": {"name": voice.name, "base": voice.base, "variant": voice.variant, "speed": voice.speed,
                  "pitch": voice.pitch},
        "texts": texts, "split": spec.name, "index": int(index), "fps": FPS, "sample_rate": SAMPLE_RATE,
    }


def make_longform_clip(index: int, seed: int = 0, config: LongFormConfig = LONG_FORM) -> dict[str, Any]:
    """Clip ``index`` of the long-form test set (``config.frames`` >= 1,500 frames)."""
    return make_clip(config.split, index, config.seconds, seed)


def save_clip(path: str | Path, clip: dict[str, Any]) -> None:
    meta = {k: clip[k] for k in ("identity", "voice", "texts", "split", "index", "fps", "sample_rate")}
    art = clip["articulation"]
    np.savez_compressed(
        path, audio=clip["audio"], frames=clip["frames"], jaw=art["jaw"], spread=art["spread"],
        round=art["round"], reference=clip["reference"], mouth_box=np.asarray(clip["mouth_box"], np.int64),
        meta=np.asarray(json.dumps(meta)),
    )


def load_clip(path: str | Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        clip: dict[str, Any] = {
            "audio": z["audio"], "frames": z["frames"], "reference": z["reference"],
            "articulation": {k: z[k] for k in ("jaw", "spread", "round")},
            "mouth_box": tuple(int(v) for v in z["mouth_box"]),
        }
    clip.update(meta)
    clip["identity"] = Identity.from_dict(meta["identity"]).to_dict()
    return clip


def write_dataset(out_dir: str | Path, split: str, n: int, seconds: float = 10.0, seed: int = 0,
                  progress: bool = True) -> list[Path]:
    """Write clips 0..n-1 of ``split`` as ``out_dir/clip_XXXXX.npz`` plus ``manifest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = _spec(split, seed)
    paths = []
    for i in tqdm(range(n), desc=f"{spec.name} clips", disable=not progress):
        p = out / f"clip_{i:05d}.npz"
        save_clip(p, make_clip(spec, i, seconds, seed))
        paths.append(p)
    manifest = {"split": spec.name, "seed": seed, "n": n, "seconds": seconds, "fps": FPS, "sample_rate": SAMPLE_RATE,
                "files": [p.name for p in paths], "voices": list(spec.voices), "sentences": list(spec.sentences),
                "identity_seeds": [spec.identity_start, spec.identity_start + n]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return paths


__all__ = ["LONG_FORM", "SPLITS", "Identity", "LongFormConfig", "SplitSpec", "Voice", "load_clip",
           "make_clip", "make_longform_clip", "make_splits", "save_clip", "write_dataset"]
