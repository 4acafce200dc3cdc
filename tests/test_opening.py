"""Opening a session: each step that took something (routing record, engine slot, encoder) gives it back when a later
step fails, and only what it took (service/opening.py). Driven through App.open_session with the real tiny model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

import avatarforcing_service.opening as opening
from avatarforcing import NoFreeSlotError
from avatarforcing_client import pb
from avatarforcing_service.failure import SessionFailure
from avatarforcing_service.server import App

AppFactory = Callable[..., Any]


def config(png: bytes) -> pb.SessionConfig:
    return pb.SessionConfig(reference_image=png, video_encoding=pb.VIDEO_ENCODING_JPEG, pacing=pb.PACING_ASAP)


def spy_releases(app: App) -> list[tuple[str, int, bool]]:
    calls: list[tuple[str, int, bool]] = []
    real = app.router.release

    async def release(session_id: str, epoch: int, resumable: bool) -> bool:
        calls.append((session_id, epoch, resumable))
        return await real(session_id, epoch, resumable)

    app.router.release = release  # type: ignore[method-assign]
    return calls


async def test_no_free_slot_gives_the_route_back_resumable(make_app: AppFactory, png: bytes) -> None:
    app: App = await make_app(max_sessions=2)
    releases = spy_releases(app)

    async def full(*args: Any) -> int:  # the routing store admitted it, but the engine's slots ran out meanwhile
        raise NoFreeSlotError("no free slot")

    app.scheduler.allocate = full  # type: ignore[method-assign]
    with pytest.raises(SessionFailure) as ei:
        await app.open_session(config(png))
    assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.message.startswith("all 2 session slots of this replica are in use")
    assert len(releases) == 1 and releases[0][2] is True  # the client may resume it on another replica
    assert not app.owned and not app.scheduler.sessions and app.router.local == {}


async def test_an_encoder_that_cannot_be_made_frees_the_slot_and_ends_the_route(
        make_app: AppFactory, png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    app: App = await make_app(max_sessions=2)
    releases = spy_releases(app)

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("no such codec")

    monkeypatch.setattr(opening, "make_encoder", broken)
    with pytest.raises(SessionFailure) as ei:
        await app.open_session(config(png))
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.message == "cannot create the video encoder: no such codec"
    assert app.engine.free_slots == app.engine.capacity  # the slot went back
    assert len(releases) == 1 and releases[0][2] is False  # not resumable: it would fail the same way again
    assert not app.router.local and not app.owned and not app.scheduler.sessions


async def test_a_session_taken_over_while_opening_yields_and_leaves_the_record_alone(
        make_app: AppFactory, png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    app: App = await make_app(max_sessions=2)
    releases = spy_releases(app)
    made: list[Any] = []
    real = opening.make_encoder

    def and_a_newer_stream_attaches(*args: Any, **kw: Any) -> Any:
        enc = real(*args, **kw)
        made.append(enc)
        for rec in app.router.local.values():  # what a newer stream's attach does: the epoch moves on
            rec.epoch += 1
        return enc

    monkeypatch.setattr(opening, "make_encoder", and_a_newer_stream_attaches)
    with pytest.raises(SessionFailure) as ei:
        await app.open_session(config(png))
    assert ei.value.code == grpc.StatusCode.ABORTED and "another stream attached" in ei.value.message
    assert releases == []  # the record is the newer stream's
    assert len(made) == 1 and made[0].closed and app.engine.free_slots == app.engine.capacity
    assert len(app.router.local) == 1 and not app.owned
