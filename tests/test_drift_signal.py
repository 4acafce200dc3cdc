"""The online drift signal: the floor calibrated on the checkpoint, and sessions crossing it."""

from __future__ import annotations

import dataclasses

import pytest

from avatarforcing.checkpoint import drift_floor, random_init
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App

from .conftest import png_bytes, speechlike_pcm
from .test_server import EOA, audio_reqs, cfg, collect, gen


def test_drift_floor_from_checkpoint_metadata():
    assert drift_floor({}) is None
    assert drift_floor({"drift_calibration": {"anchor_similarity": {"mean": 0.9, "std": 0.02}}}) == pytest.approx(0.82)


@pytest.mark.parametrize("mean,alerts", [(2.0, 1), (-2.0, 0)], ids=["above-every-similarity", "below-every"])
async def test_sessions_below_the_calibrated_floor_raise_one_alert(mean: float, alerts: int) -> None:
    lm = random_init("tiny")
    lm = dataclasses.replace(lm, meta={"drift_calibration": {"anchor_similarity": {"mean": mean, "std": 0.0}}})
    app = App(ServerConfig(port=0, metrics_port=-1, max_sessions=2, grace_s=0.5), loaded=lm)
    await app.start()
    try:
        assert app.metrics.anchor_similarity_floor._value.get() == pytest.approx(mean)
        # 40 blocks: the 25-block average exists from block 25 on; a session alerts once, not per block
        await collect(app, gen([cfg(png_bytes()), *audio_reqs(speechlike_pcm(40 * 0.16), 16000), EOA]))
        assert app.metrics.drift_alerts._value.get() == alerts
    finally:
        await app.stop(grace=0.2)
