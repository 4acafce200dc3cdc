from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import pytest_asyncio
import torch
from PIL import Image

from avatarforcing.checkpoint import random_init
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App

from .cluster import redis_server  # noqa: F401 (a fixture: a real redis-server on a free loopback port)

torch.set_num_threads(2)


def png_bytes(w: int = 160, h: int = 128, color: tuple[int, int, int] = (200, 150, 120)) -> bytes:
    img = Image.new("RGB", (w, h), color)
    for x in range(w // 4, 3 * w // 4):  # something face-like enough to not be flat
        img.putpixel((x, h // 2), (40, 20, 20))
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def speechlike_pcm(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """int16 PCM: a voiced buzz with a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    x = env * (np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 280 * t) + 0.1 * rng.standard_normal(t.shape))
    return (x / np.abs(x).max() * 12000).astype(np.int16)


@pytest.fixture
def png() -> bytes:
    return png_bytes()


@pytest_asyncio.fixture
async def make_app() -> AsyncIterator[Callable[..., App]]:
    """Starts Apps on free loopback ports (random-init tiny model); stops them after the test."""
    apps: list[App] = []
    loaded = random_init("tiny")

    async def factory(**kw: object) -> App:
        base = {"port": 0, "metrics_port": 0, "max_sessions": 4, "grace_s": 0.5, "log_format": "json"}
        base.update(kw)
        app = App(ServerConfig(**base), loaded=loaded)  # type: ignore[arg-type]
        await app.start()
        apps.append(app)
        return app

    yield factory  # type: ignore[misc]
    for app in apps:
        await app.stop(grace=0.2)  # idempotent; also finishes a stop that a failed test interrupted
