"""The shipped default model: it exists, loads in the server as trained, and carries its card."""

from __future__ import annotations

import grpc

from avatarforcing.checkpoint import DEFAULT_CHECKPOINT, drift_floor, load_checkpoint, load_default
from avatarforcing.evaluate import default_models
from avatarforcing_client import pb, pb_grpc
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App


def test_shipped_checkpoints_exist_with_their_metadata():
    lm = load_checkpoint(DEFAULT_CHECKPOINT)
    assert lm.trained and lm.stream_cfg.mode == "avatarforcing" and lm.meta["role"] == "avatarforcing-student"
    assert lm.meta["budget"]["name"] == "default" and "sync" in lm.meta["eval"]
    assert drift_floor(lm.meta) is not None
    for name, path in default_models().items():
        m = load_checkpoint(path)
        assert m.trained and m.model_cfg == lm.model_cfg, name
    assert load_checkpoint(default_models()["ar"]).stream_cfg.mode == "ar"
    assert (DEFAULT_CHECKPOINT.parent / "MODEL_CARD.md").is_file()


async def test_server_loads_the_shipped_model_by_default() -> None:
    app = App(ServerConfig(port=0, metrics_port=-1, max_sessions=1, grace_s=0.5), loaded=load_default())
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            info = await pb_grpc.AvatarForcingStub(ch).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.model.trained and info.model.name == "tiny"
        assert app.scheduler.drift_floor is not None
    finally:
        await app.stop(grace=0.2)
