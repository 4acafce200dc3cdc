"""Deterministic synthetic talking-head data: espeak-ng speech, articulation, a 2D face renderer."""

from .articulation import Articulation, articulation_from_audio
from .dataset import (
    LONG_FORM,
    SPLITS,
    LongFormConfig,
    SplitSpec,
    load_clip,
    make_clip,
    make_longform_clip,
    make_splits,
    write_dataset,
)
from .face import Identity, mouth_box, render, render_reference, sample_identity
from .speech import SENTENCES, make_speech, synthesize

__all__ = [
    "LONG_FORM", "SENTENCES", "SPLITS", "Articulation", "Identity", "LongFormConfig", "SplitSpec",
    "articulation_from_audio", "load_clip", "make_clip", "make_longform_clip", "make_splits", "make_speech",
    "mouth_box", "render", "render_reference", "sample_identity", "synthesize", "write_dataset",
]
