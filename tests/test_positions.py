"""RoPE positions: the project's relative layout and the reference's (``StreamConfig.positions``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avatarforcing import StreamConfig
from avatarforcing.checkpoint import random_init
from avatarforcing.model import Prefix
from avatarforcing.rope import RopeTable

from .test_engine import face, make_engine, pcm_blocks


@torch.inference_mode()
def test_a_pass_depends_only_on_relative_positions() -> None:
    """Shifting every position of a pass (prefix and queries) by the same amount changes nothing: so the
    engine's layout with the anchor at a negative offset is the reference's absolute layout."""
    lm = random_init("tiny", seed=1)
    m, c = lm.model.eval(), lm.model_cfg
    torch.manual_seed(0)
    p = c.tokens_per_frame
    lat, ref = torch.randn(1, 4, c.latent_channels, *c.latent_hw), torch.randn(1, c.latent_channels, *c.latent_hw)
    prefix = [Prefix(torch.randn(1, 3 * p, c.heads, c.head_dim), torch.randn(1, 3 * p, c.heads, c.head_dim))
              for _ in range(c.layers)]
    sigma, aud = torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.randn(1, 4, c.audio_token_dim)

    def run(anchor: int, hist: int, window: int) -> torch.Tensor:
        pre = RopeTable(c, [anchor, hist, hist + 1], "cpu", torch.float32)
        win = RopeTable(c, list(range(window, window + 4)), "cpu", torch.float32)
        return m(lat, sigma, ref, aud, win, prefix=prefix, prefix_rope=pre)[0]

    absolute = run(0, 37, 39)  # a clean block at stream position 39 with the anchor at 0 (reference)
    shifted = run(-36, 1, 3)  # the engine's layout: history at 1..2, the block at 3
    assert torch.allclose(absolute, shifted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(absolute, run(0, 1, 3), atol=1e-3)  # where the anchor sits matters


def test_reference_positions_tables() -> None:
    eng = make_engine(StreamConfig(positions="reference"), max_sessions=4)
    B, H = eng.B, eng.H

    def anchor_pos(t: RopeTable, row: int) -> int:
        cos, sin = t.cos[row, : eng.P], t.sin[row, : eng.P]
        for pos in range(-100, 10):
            want = RopeTable(eng.cfg, [pos], "cpu", torch.float32)
            if torch.allclose(cos, want.cos) and torch.allclose(sin, want.sin):
                return pos
        raise AssertionError("no position matches")

    # Blocks emitted before this step by slots 0..3: in the warm-up, at the first emission, the next, steady. The
    # tables follow what each slot emitted, not its step count (a re-plan takes steps that emit nothing).
    eng._emitted[:4] = [0, 0, 1, 6]
    window, clean = eng._reference_ropes([0, 1, 2, 3], rows=[1, 2, 3])
    assert [anchor_pos(window, i) for i in range(4)] == [H, H, H - min(H, B), 0]
    assert [anchor_pos(clean, i) for i in range(3)] == [H, H - B, H - 6 * B]
    assert torch.equal(window.cos[3], eng.rope_prefix.cos)  # steady window pass: the same as relative
    with pytest.raises(ValueError, match="relative | reference"):
        StreamConfig(positions="absolute")  # type: ignore[arg-type]


def test_reference_positions_stream_runs_and_differs_from_relative() -> None:
    out = {}
    for pos in ("relative", "reference"):
        eng = make_engine(StreamConfig(positions=pos), max_sessions=1)  # type: ignore[arg-type]
        s = eng.allocate(eng.prepare_anchor(face()), seed=3)
        blocks = pcm_blocks(eng, 12, seed=4)
        frames = [r.frames for k in range(12) for r in eng.step([s], blocks[k : k + 1]) if r.frames is not None]
        out[pos] = np.stack(frames)
        if pos == "reference":  # cached anchor tables stay bounded however long the stream runs
            assert set(eng._anchor_ropes) <= set(range(eng.H + 1))
    assert out["relative"].shape == out["reference"].shape
    assert np.abs(out["relative"].astype(int) - out["reference"].astype(int)).max() > 0
