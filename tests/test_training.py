"""Training: the differentiable rollout is the engine's step; every stage's step lowers its loss;
stage checkpoints resume; the train/eval commands run end to end (smoke budget)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarforcing.checkpoint import load_checkpoint, random_init, save_checkpoint
from avatarforcing.config import StreamConfig
from avatarforcing.engine import StreamEngine, _mix_seed
from avatarforcing.train.ae import AEConfig, ae_loss
from avatarforcing.train.common import StageCheckpoint
from avatarforcing.train.data import ClipBank, LatentBank
from avatarforcing.train.distill import (
    DMDConfig,
    ODEConfig,
    StreamRollout,
    critic_loss,
    dmd_batch,
    dmd_target,
    level_steps,
    make_trajectories,
    rollout,
    stage1_loss,
)
from avatarforcing.train.teacher import Geometry, TeacherConfig, anchor_prefix, clip_audio_tokens, teacher_loss
from avatarforcing.vae import to_pixels, to_unit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def banks():
    torch.manual_seed(0)
    lm = random_init("tiny")
    bank = ClipBank.generate("train", 2, 2.0, progress=False)
    lb = LatentBank.encode(bank, lm.vae, lm.model_cfg, CPU, progress=False)
    return lm, bank, lb


def _lowers(loss_fn, params, lr: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Loss on a fixed batch before and after one Adam step on it."""
    opt = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(seed)
    before = loss_fn(np.random.default_rng(seed))
    opt.zero_grad()
    before.backward()
    opt.step()
    torch.manual_seed(seed)
    with torch.no_grad():
        after = loss_fn(np.random.default_rng(seed))
    return float(before.detach()), float(after)


def test_rollout_is_the_engines_step(banks):
    """The differentiable rollout used for training gives the server's frames, step for step."""
    lm, bank, _ = banks
    stream = StreamConfig()
    model, vae = copy.deepcopy(lm.model).eval(), copy.deepcopy(lm.vae).eval()
    eng = StreamEngine(model, vae, stream, max_sessions=1)
    ref_img = bank.refs[0]
    slot = eng.allocate(eng.prepare_anchor(ref_img), seed=7)
    n_steps = 7
    pcm = bank.audio[0, : n_steps * eng.block_samples].reshape(n_steps, eng.block_samples)
    engine_frames = [r.frames for i in range(n_steps) for r in eng.step([slot], pcm[i:i + 1])
                     if r.frames is not None]
    with torch.no_grad():
        ref = vae.encode_image(to_unit(torch.from_numpy(ref_img))[None])
        ctx = model.context()
        ro = StreamRollout(model, stream, ref, anchor_prefix(model, ref, eng.rope_anchor, ctx), ctx)
        full = torch.cat([torch.zeros(1, eng.context_samples), torch.from_numpy(pcm.reshape(1, -1))], dim=1)
        tok = model.audio_tokens(full)
        gen = torch.Generator()
        out = []
        for i in range(n_steps):
            gen.manual_seed(_mix_seed(7, i))
            noise = torch.randn(eng.win_lat.shape[1:], generator=gen)[None]
            e = ro.step(tok[:, i * stream.block_frames:(i + 1) * stream.block_frames], noise)
            if e is not None:
                out.append(to_pixels(vae.decode(e))[0].numpy())
    assert len(out) == len(engine_frames) == n_steps - (stream.window_blocks - 1)
    for a, b in zip(out, engine_frames, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_autoencoder_step_lowers_loss(banks):
    lm, bank, _ = banks
    vae = copy.deepcopy(lm.vae).train()
    tc = AEConfig(batch=2)
    before, after = _lowers(lambda rng: ae_loss(vae, bank, rng, tc, CPU), vae.parameters())
    assert after < before


def test_teacher_step_lowers_loss(banks):
    lm, _, lb = banks
    model = copy.deepcopy(lm.model).train()
    tc = TeacherConfig(batch=2, clip_frames=8)
    geo = Geometry(model.cfg, 8, CPU)
    before, after = _lowers(lambda rng: teacher_loss(model, lb, rng, tc, geo, CPU), model.parameters())
    assert after < before


@pytest.fixture(scope="module")
def trajectories(banks):
    lm, _, lb = banks
    keep = sorted(set(level_steps(StreamConfig(), 20)) | set(level_steps(StreamConfig.ar_baseline(), 20)))
    tr = make_trajectories(copy.deepcopy(lm.model).eval(), lb, 8, ODEConfig(trajectories=2, batch=2), keep, CPU,
                           progress=False)
    assert tr["states"].shape[:3] == (2, len(keep), 8) and tr["x0"].shape[:2] == (2, 8)
    return tr


@pytest.mark.parametrize("stream", [StreamConfig(), StreamConfig.ar_baseline()], ids=["avatarforcing", "ar"])
def test_stage1_step_lowers_loss(banks, trajectories, stream):
    lm, _, lb = banks
    model = copy.deepcopy(lm.model).train()
    before, after = _lowers(lambda rng: stage1_loss(model, stream, trajectories, lb, rng, 3, CPU),
                            model.parameters())
    assert after < before


def test_level_steps_refuses_levels_off_the_sampler_grid():
    with pytest.raises(ValueError, match="multiples of 50"):
        level_steps(StreamConfig(level_steps=(230, 400, 800, 1000)), 20)


def test_dmd_generator_and_critic_steps_lower_their_losses(banks):
    lm, _, lb = banks
    student = copy.deepcopy(lm.model).train()
    teacher = copy.deepcopy(lm.model).eval().requires_grad_(False)
    critic = copy.deepcopy(lm.model).train()
    stream = StreamConfig()
    dc = DMDConfig(batch=1, emit_frames=8)
    geo = Geometry(student.cfg, 8, CPU)
    n_tok = 8 + 3
    b = dmd_batch(lb, np.random.default_rng(0), 1, n_tok, CPU)
    torch.manual_seed(1)
    x = rollout(student, stream, b.ref, clip_audio_tokens(student, lb.audio, b.idx, b.starts, n_tok), 8)
    target = dmd_target(teacher, critic, geo, lb, b, x, dc)
    assert target.shape == x.shape and not target.requires_grad

    def g_loss(_rng):
        torch.manual_seed(1)
        xs = rollout(student, stream, b.ref, clip_audio_tokens(student, lb.audio, b.idx, b.starts, n_tok), 8)
        return 0.5 * (xs - target).square().mean()

    before, after = _lowers(g_loss, student.parameters(), lr=1e-5)
    assert after < before
    xd = x.detach()
    before, after = _lowers(lambda rng: critic_loss(critic, geo, lb, b, xd, dc), critic.parameters(), lr=1e-4)
    assert after < before


def test_stage_checkpoint_resumes(tmp_path: Path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.1)
    ck = StageCheckpoint(tmp_path, "s", {"m": lin}, {"o": opt}, every=2)
    assert ck.start() == 0 and not ck.done()
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    ck.maybe_save(2)
    lin2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(lin2.parameters(), lr=0.1)
    ck2 = StageCheckpoint(tmp_path, "s", {"m": lin2}, {"o": opt2}, every=2)
    assert ck2.start() == 2
    assert torch.equal(lin2.weight, lin.weight)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    ck2.finish()
    assert ck2.done() and not ck2.resume_w.exists() and not ck2.resume_s.exists()


def test_checkpoint_round_trip_keeps_latent_stats(tmp_path: Path):
    lm = random_init("tiny", seed=3)
    lm.vae.set_latent_stats(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    save_checkpoint(tmp_path / "c.safetensors", lm.model, lm.vae, StreamConfig.ar_baseline(), {"role": "x"})
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert back.stream_cfg == StreamConfig.ar_baseline() and back.meta == {"role": "x"}
    for a, b in zip(lm.vae.state_dict().values(), back.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(lm.model.state_dict().values(), back.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.timeout(600)
def test_train_and_eval_commands_smoke(tmp_path: Path):
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "avatarforcing_tools.cli"]
    r = subprocess.run(cli + ["train", "--run", str(run), "--budget", "smoke", "--no-progress", "--threads", "2"],
                       capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("student", "ar", "teacher"):
        lm = load_checkpoint(run / f"{name}.safetensors")
        assert lm.trained
    assert load_checkpoint(run / "ar.safetensors").stream_cfg.mode == "ar"
    # a second run finds every stage done and changes nothing
    before = (run / "student.safetensors").stat().st_mtime_ns
    r = subprocess.run(cli + ["train", "--run", str(run), "--budget", "smoke", "--stages", "ae,teacher,dmd",
                              "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "student.safetensors").stat().st_mtime_ns == before
    out = tmp_path / "eval.json"
    r = subprocess.run(cli + ["eval", "--run", str(run), "--test-clips", "1", "--long-clips", "1", "--long-seconds",
                              "21", "--teacher-steps", "2", "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"teacher", "student", "ar"}
    for res in rep["results"].values():
        assert len(res["seg_psnr_gt"]) == 2 and "drift" in res and "sync" in res
    assert "student" in r.stdout and "drift" in r.stdout


def test_train_refuses_a_run_folder_of_another_budget(tmp_path: Path):
    from avatarforcing.train.pipeline import train_main

    train_main(tmp_path, "ae", "smoke", "cpu", progress=False)
    (tmp_path / "budget.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(ValueError, match="another budget"):
        train_main(tmp_path, "ae", "smoke", "cpu", progress=False)
