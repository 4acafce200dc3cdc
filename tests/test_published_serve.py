"""The published model's files, tiny, through `avatarforcing convert`, the engine and the gRPC server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from avatarforcing.checkpoint import load_checkpoint
from avatarforcing.engine import StreamEngine
from avatarforcing.published import convert_dit, read_student
from avatarforcing.vae import to_pixels
from avatarforcing_client import pb
from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App
from avatarforcing_tools.cli import main as cli
from tests.published_replica import TINY_ALPHA, write_published
from tests.test_server import EOA, audio_reqs, cfg, collect, gen, kinds

from .conftest import png_bytes, speechlike_pcm

RES = "64x96"


def _convert(files: dict[str, Path], out: Path, *extra: str) -> int:
    return cli(["convert", "--student", str(files["student"]), "--vae", str(files["vae"]), "--wav2vec",
                str(files["wav2vec"]), "--context", str(files["context"]), "--out", str(out), "--resolution", RES,
                "--heads", "2", "--lora-alpha", str(TINY_ALPHA), *extra])


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    d = tmp_path_factory.mktemp("published")
    files = write_published(d / "src")
    out = d / "avatarforcing-tiny.safetensors"
    assert _convert(files, out, "--dtype", "float32") == 0
    return files, out


def test_convert_writes_one_checkpoint_that_loads(published: tuple[dict[str, Path], Path]) -> None:
    files, out = published
    lm = load_checkpoint(out)
    c = lm.model_cfg
    assert (c.name, c.height, c.width, c.heads, c.layers) == ("avatarforcing-1.3b", 64, 96, 2, 6)
    assert c.audio_layers == (1, 3)  # audio before blocks 2 and 3
    assert lm.audio is not None and lm.audio.feature_dim == c.audio_feature_dim
    assert lm.context is not None and lm.context.shape == (512, c.text_dim)
    assert (lm.stream_cfg.block_frames, lm.stream_cfg.window_blocks, lm.stream_cfg.history_frames) == (4, 4, 2)
    sd, key = read_student(files["student"])
    assert key == "generator_ema"
    want = convert_dit(sd, c, lora_alpha=TINY_ALPHA)
    got = lm.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert lm.meta["source"]["generator_key"] == "generator_ema"


def test_convert_refuses_bad_inputs_in_one_line(published: tuple[dict[str, Path], Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    files, _ = published
    trunc = tmp_path / "model.pt"
    trunc.write_bytes(files["student"].read_bytes()[:5000])
    assert _convert({**files, "student": trunc}, tmp_path / "x.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"avatarforcing convert: error: {trunc}: cannot be read") and "\n" not in err
    sd = torch.load(files["student"], weights_only=True)
    sd["generator_ema"]["model.blocks.1.cross_attn.o.lora_B.default.weight"] = torch.zeros(256, 8)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    assert _convert({**files, "student": bad}, tmp_path / "x.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert "bad.pt: model.blocks.1.cross_attn.o.lora_B.default.weight has shape [256, 8], expected [256, 16]" in err
    assert _convert({**files, "vae": tmp_path / "nope.pth"}, tmp_path / "x.safetensors") == 2
    assert "nope.pth" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_checkpoint_of_other_shapes_is_refused_before_serving(published: tuple[dict[str, Path], Path],
                                                              tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, out = published
    with safe_open(str(out), framework="pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["dit.blocks.2.audio_proj.weight"] = torch.zeros(256, 16)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=md)
    with pytest.raises(ValueError, match=r"bad.safetensors: dit.blocks.2.audio_proj.weight has shape \[256, 16\], "
                                         r"expected \[256, 32\]"):
        App(ServerConfig(checkpoint=str(bad), port=0, metrics_port=-1))
    del tensors["dit.blocks.2.audio_proj.weight"]
    save_file(tensors, str(bad), metadata=md)
    with pytest.raises(ValueError, match="missing key dit.blocks.2.audio_proj.weight"):
        load_checkpoint(bad)


@torch.inference_mode()
def test_streamed_decode_equals_a_whole_decode_of_the_stream(published: tuple[dict[str, Path], Path]) -> None:
    """Each emitted block decodes to the frames a whole-video decode of (reference, emitted latents) gives."""
    _, out = published
    lm = load_checkpoint(out)
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    eng = StreamEngine(lm.model, lm.vae, lm.stream_cfg, max_sessions=2, audio=lm.audio, context=lm.context)
    twin = StreamEngine(lm.model, lm.vae, lm.stream_cfg, max_sessions=2, audio=lm.audio, context=lm.context)
    anchor = eng.prepare_anchor(face)
    s, t = eng.allocate(anchor, seed=5), twin.allocate(anchor, seed=5)
    other = eng.allocate(anchor, seed=9)  # a second stream in the batch: its cache must not leak into s's
    frames, latents = [], []
    for _ in range(6):
        pcm = rng.standard_normal((1, eng.block_samples)).astype(np.float32) * 0.1
        res = eng.step([s, other], np.concatenate([pcm, pcm]))
        clean = twin.denoise_step([t], pcm)
        if res[0].frames is not None:
            frames.append(res[0].frames)
            latents.append(clean)
    assert len(frames) == 3 and frames[0].shape == (16, 64, 96, 3)
    z = torch.cat([anchor.ref_latent[None, None], *latents], dim=1)  # [1, 1 + 12, C, h, w]
    whole = to_pixels(lm.vae.decode(z.transpose(1, 2)).transpose(1, 2))[0].numpy()  # 1 + 48 frames
    streamed = np.concatenate(frames)
    diff = np.abs(streamed.astype(int) - whole[1:].astype(int))
    assert diff.max() <= 1, diff.max()
    assert eng.decoder_cache_bytes() > 0


async def test_converted_checkpoint_serves_a_session_over_grpc(published: tuple[dict[str, Path], Path]) -> None:
    _, out = published
    app = App(ServerConfig(checkpoint=str(out), port=0, metrics_port=-1, max_sessions=2, grace_s=0.5))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            from avatarforcing_proto.v1 import avatarforcing_pb2_grpc as pb_grpc

            info = await pb_grpc.AvatarForcingStub(ch).GetServerInfo(pb.GetServerInfoRequest())
        assert info.model.name == "avatarforcing-1.3b" and info.model.checkpoint == out.name  # no paths to tenants
        assert (info.stream.width, info.stream.height) == (96, 64)
        pcm = speechlike_pcm(1.5)
        resps = await collect(app, gen([cfg(png_bytes(300, 160)), *audio_reqs(pcm, 16000), EOA]))
        k = kinds(resps)
        assert k[0] == "started" and k[-1] == "end", k[-3:]
        started = resps[0].started
        assert (started.width, started.height, started.frames_per_block) == (96, 64, 16)
        frames = [r.frame for r in resps if r.HasField("frame")]
        assert len(frames) == 48  # 1.5 s = 37.5 frames, rounded up to whole 16-frame blocks
        assert [f.index for f in frames] == list(range(48))
        assert len(frames[0].data) == 64 * 96 * 3
        assert resps[-1].end.reason == pb.END_REASON_END_OF_AUDIO
    finally:
        await app.stop(grace=0.2)
    await asyncio.sleep(0)


async def test_register_avatar_with_its_own_text_context(published: tuple[dict[str, Path], Path],
                                                         tmp_path: Path) -> None:
    from avatarforcing_client import AvatarForcingClient
    from tests.published_replica import write_context

    _, out = published
    app = App(ServerConfig(checkpoint=str(out), port=0, metrics_port=-1, max_sessions=2, grace_s=0.5))
    await app.start()
    try:
        face = png_bytes(300, 160)
        own = write_context(tmp_path / "own.safetensors", seed=7).read_bytes()
        async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client:
            plain = await client.register_avatar(face, "default prompt")
            prompted = await client.register_avatar(face, "own prompt", text_context=own)
            assert prompted != plain  # the same face with another prompt is another avatar
            a, b = app.avatars.get(plain), app.avatars.get(prompted)
            assert a is not None and b is not None
            assert a.anchor.cross_k is None and b.anchor.cross_k is not None
            assert not torch.allclose(a.anchor.k, b.anchor.k)  # the prompt reaches the anchor
            resps = await collect(app, gen([pb.StreamRequest(config=pb.SessionConfig(
                avatar_id=prompted, pacing=pb.PACING_ASAP, video_encoding=pb.VIDEO_ENCODING_RAW_RGB24,
                audio_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=16000, channels=1))),
                *audio_reqs(speechlike_pcm(0.5), 16000), EOA]))
            assert kinds(resps)[-1] == "end" and sum(r.HasField("frame") for r in resps) == 16, resps[-1]
            wrong = write_context(tmp_path / "wrong.safetensors", text_dim=32).read_bytes()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.register_avatar(face, text_context=wrong)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the uploaded context" in (e.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.register_avatar(face, text_context=b"not a context file")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await app.stop(grace=0.2)


async def test_text_context_refused_by_a_model_without_text(make_app: Callable[..., Any], tmp_path: Path) -> None:
    from avatarforcing_client import AvatarForcingClient
    from tests.published_replica import write_context

    app = await make_app()
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.register_avatar(png_bytes(), text_context=write_context(tmp_path / "c.st").read_bytes())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no text prompt" in (e.value.details() or "")


def test_serve_refuses_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    """Before it opens a port: exit 2, one line naming the file (a process of its own: serve sets up logging)."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "avatarforcing")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    for path, say in ((bad, "not a readable safetensors file"), (tmp_path / "missing.safetensors", "does not exist")):
        r = subprocess.run([exe, "serve", "--checkpoint", str(path), "--port", "0", "--metrics-port", "-1"],
                           capture_output=True, text=True, timeout=120)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith("avatarforcing serve: error: "), (r.returncode, err[-500:])
        assert str(path) in err and say in err and "\n" not in err


async def test_small_decoder_and_reference_positions_serve(published: tuple[dict[str, Path], Path]) -> None:
    """`serve --decoder tiny --positions reference`: the small decoder (random here: timing only) instead of
    Wan's, and the reference's RoPE positions; the session streams whole blocks at the model's size."""
    _, out = published
    app = App(ServerConfig(checkpoint=str(out), port=0, metrics_port=-1, max_sessions=2, grace_s=0.5,
                           decoder="tiny", positions="reference", audio_context_s=0.64))
    assert not app.engine.streamed_decode and app.engine.decoder_cache_bytes() == 0
    assert app.engine.stream.positions == "reference" and app.engine.context_samples == 0.64 * 16000
    await app.start()
    try:
        resps = await collect(app, gen([cfg(png_bytes(96, 64)), *audio_reqs(speechlike_pcm(0.7), 16000), EOA]))
        frames = [r.frame for r in resps if r.HasField("frame")]
        assert kinds(resps)[-1] == "end" and len(frames) == 32 and len(frames[0].data) == 64 * 96 * 3
    finally:
        await app.stop(grace=0.2)
