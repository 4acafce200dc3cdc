"""The avatar registry's device-memory budget (``avatar_memory_mb``): registered anchors never hold more than it, the
tenant holding the most gives way first, the avatar just added stays, and an evicted avatar comes back (the SDK
registers it again) when a session names it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from avatarforcing import AnchorState
from avatarforcing_client import AvatarForcingClient, pb
from avatarforcing_service.avatars import AvatarRegistry
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App

from .conftest import png_bytes

AppFactory = Callable[..., Any]
KIB = 1024


def anchor(kib: int) -> AnchorState:
    """An anchor of ``kib`` KiB (float32 keys and values of that size together, a one-element reference latent)."""
    n = kib * KIB // 8
    return AnchorState(ref_latent=torch.zeros(0), k=torch.zeros(n), v=torch.zeros(n))


def add(reg: AvatarRegistry, tenant: str, name: str, kib: int) -> str:
    return reg.add(name, anchor(kib), digest=name, tenant=tenant).id


def ids(reg: AvatarRegistry) -> list[str]:
    return [a.name for a in reg.values()]


def test_anchors_stay_within_the_budget_and_the_largest_tenant_gives_way() -> None:
    reg = AvatarRegistry(capacity=100, per_tenant=0, max_bytes=40 * KIB)
    for i in range(4):
        add(reg, "big", f"big{i}", 10)
    assert reg.nbytes == 40 * KIB and len(reg) == 4
    add(reg, "small", "small0", 10)  # over: big, the tenant holding the most, loses its least recently used
    assert ids(reg) == ["big1", "big2", "big3", "small0"] and reg.nbytes == 40 * KIB
    reg.get(reg.values()[0].id, "big")  # big1 used again: big2 is now big's least recently used
    add(reg, "small", "small1", 10)
    assert ids(reg) == ["big3", "small0", "big1", "small1"]
    # A larger avatar makes room for itself. Its tenant, counted with it, now holds the most (45 KiB): its own older
    # avatars go first, then, with only the new one left, the other tenant's least recently used.
    add(reg, "small", "small2", 25)
    assert ids(reg) == ["big1", "small2"] and reg.nbytes == 35 * KIB


def test_the_avatar_just_added_stays_even_alone_over_the_budget() -> None:
    reg = AvatarRegistry(capacity=100, max_bytes=16 * KIB)
    add(reg, "a", "a0", 10)
    add(reg, "a", "a1", 10)  # its own tenant is the largest: the older one goes, never the new one
    assert ids(reg) == ["a1"]
    add(reg, "b", "huge", 64)  # alone over the budget: kept (a session is about to use it), every other goes
    assert ids(reg) == ["huge"] and reg.nbytes == 64 * KIB
    add(reg, "a", "a2", 4)
    assert ids(reg) == ["a2"] and reg.nbytes == 4 * KIB


def test_no_budget_keeps_the_count_bounds() -> None:
    reg = AvatarRegistry(capacity=3, per_tenant=2, max_bytes=0)
    for i in range(3):
        add(reg, "a", f"a{i}", 1000)
    assert ids(reg) == ["a1", "a2"]  # per tenant: 2
    add(reg, "b", "b0", 1)
    add(reg, "c", "c0", 1)  # capacity 3: the tenant with the most avatars (a) gives way
    assert ids(reg) == ["a2", "b0", "c0"] and reg.nbytes == 1002 * KIB


def test_the_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="avatar_memory_mb must be >= 0"):
        ServerConfig(avatar_memory_mb=-1)


async def test_a_replica_over_its_budget_evicts_and_the_sdk_brings_the_avatar_back(make_app: AppFactory) -> None:
    probe: App = await make_app()
    await probe.avatar_from_image(png_bytes(color=(1, 2, 3)))
    per_avatar = probe.avatars.nbytes
    app: App = await make_app(avatar_memory_mb=1.5 * per_avatar / 2**20)  # room for one avatar
    metric = "avatarforcing_avatar_memory_bytes"
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as c:
        first = await c.register_avatar(png_bytes(color=(10, 20, 30)))
        second = await c.register_avatar(png_bytes(color=(30, 20, 10)))
        assert [a.id for a in app.avatars.values()] == [second]
        assert app.metrics.registry.get_sample_value(metric) == per_avatar
        async with c.session(avatar_id=first, video_encoding=pb.VIDEO_ENCODING_JPEG,
                             pacing=pb.PACING_ASAP) as s:
            assert s.session_id  # the SDK registered the evicted avatar again, under the same id
        assert [a.id for a in app.avatars.values()] == [first]
        assert app.metrics.registry.get_sample_value(metric) == per_avatar
