import shutil

import numpy as np
import pytest

from avatarforcing.data import (
    LONG_FORM,
    articulation_from_audio,
    load_clip,
    make_clip,
    make_splits,
    mouth_box,
    render,
    render_reference,
    sample_identity,
    write_dataset,
)
from avatarforcing.data.speech import Voice, make_speech
from avatarforcing.metrics import mouth_opening, sync_correlation

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def _speech(seed: int) -> np.ndarray:
    audio, _ = make_speech(np.random.default_rng(seed), 64000, Voice("en-us", "m3", 170, 50))
    return audio


def test_speech_deterministic_and_valid():
    a, b, c = _speech(1), _speech(1), _speech(2)
    assert a.dtype == np.float32 and a.shape == (64000,)
    assert np.abs(a).max() <= 1.0 and np.abs(a).max() > 0.3
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_articulation_deterministic_and_ranges():
    audio = _speech(3)
    art, art2 = articulation_from_audio(audio), articulation_from_audio(audio.copy())
    assert len(art) == 100
    for k in ("jaw", "spread", "round"):
        x = getattr(art, k)
        assert x.dtype == np.float32 and x.shape == (100,)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert np.array_equal(x, getattr(art2, k))
    assert art.jaw.max() > 0.5 and (art.jaw == 0).any()  # speech and silence
    assert articulation_from_audio(np.zeros(6400, np.float32)).jaw.max() == 0.0


def test_clip_deterministic_by_seed():
    a = make_clip("train", 3, seconds=2.0)
    b = make_clip("train", 3, seconds=2.0)
    c = make_clip("train", 4, seconds=2.0)
    assert a["frames"].shape == (50, 128, 128, 3) and a["frames"].dtype == np.uint8
    assert a["audio"].shape == (50 * 640,) and a["audio"].dtype == np.float32
    assert a["reference"].shape == (128, 128, 3) and a["reference"].dtype == np.uint8
    for k in ("audio", "frames", "reference"):
        assert np.array_equal(a[k], b[k])
    for k in ("jaw", "spread", "round"):
        assert np.array_equal(a["articulation"][k], b["articulation"][k])
    assert a["identity"] == b["identity"] and a["identity"] != c["identity"]
    assert not np.array_equal(a["audio"], c["audio"])


def test_splits_disjoint():
    specs = make_splits(0)
    assert make_splits(0) == specs
    names = list(specs)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            sx, sy = specs[x], specs[y]
            assert sx.identity_stop <= sy.identity_start or sy.identity_stop <= sx.identity_start
            assert not set(sx.voices) & set(sy.voices)
            assert not set(sx.base_voices) & set(sy.base_voices)
            assert not set(sx.sentences) & set(sy.sentences)
    # Clips draw only from their split's pools.
    for name in names:
        clip = make_clip(name, 0, seconds=4.0)
        assert clip["voice"]["name"] in specs[name].voices
        assert set(clip["texts"]) <= set(specs[name].sentences)
        assert specs[name].identity_start <= clip["identity"]["seed"] < specs[name].identity_stop
    assert LONG_FORM.frames >= 1500 and LONG_FORM.split == "test"


def test_mouth_opening_tracks_jaw():
    clip = make_clip("val", 1, seconds=8.0)
    measured = mouth_opening(clip["frames"], clip["mouth_box"])
    assert sync_correlation(measured, clip["articulation"]["jaw"]) > 0.9
    assert mouth_opening(clip["reference"], clip["mouth_box"]) < 0.5


def test_renderer_idle_motion_and_reference():
    idt = sample_identity(7)
    art = articulation_from_audio(np.zeros(25 * 640 * 8, np.float32))  # 8 s of silence
    frames = render(idt, art)
    assert frames.shape == (200, 128, 128, 3)
    assert len({f.tobytes() for f in frames}) > 1  # blinks / sway move the face
    ref = render_reference(idt)
    assert np.array_equal(ref, render_reference(idt))
    y0, y1, x0, x1 = mouth_box(idt)
    assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 128


def test_write_and_load(tmp_path):
    paths = write_dataset(tmp_path, "test", 1, seconds=1.0, progress=False)
    clip = load_clip(paths[0])
    ref = make_clip("test", 0, seconds=1.0)
    assert np.array_equal(clip["frames"], ref["frames"]) and np.array_equal(clip["audio"], ref["audio"])
    assert clip["mouth_box"] == ref["mouth_box"] and clip["identity"] == ref["identity"]
    assert (tmp_path / "manifest.json").exists()
