"""The model and the batched streaming engine (no gRPC)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from avatarforcing import NoFreeSlotError, SlotError, StreamConfig, StreamEngine, model_preset
from avatarforcing.checkpoint import load_checkpoint, random_init, save_checkpoint
from avatarforcing.model import AvatarDiT, count_parameters

from .conftest import speechlike_pcm


def make_engine(stream: StreamConfig | None = None, max_sessions: int = 4, seed: int = 0) -> StreamEngine:
    lm = random_init("tiny", seed=seed)
    return StreamEngine(lm.model, lm.vae, stream or StreamConfig(), max_sessions=max_sessions)


def face(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((128, 128, 3)) * 255).astype(np.uint8)


def pcm_blocks(eng: StreamEngine, n: int, seed: int) -> np.ndarray:
    x = speechlike_pcm(n * eng.block_samples / 16000 + 0.01, seed=seed)[: n * eng.block_samples]
    return (x.astype(np.float32) / 32768).reshape(n, eng.block_samples)


def test_noise_levels_match_reference() -> None:
    assert np.allclose(StreamConfig().levels, [0.5556, 0.7692, 0.9524, 1.0], atol=1e-4)


def test_warmup_then_one_block_per_step() -> None:
    eng = make_engine()
    s = eng.allocate(eng.prepare_anchor(face()), seed=1)
    audio = pcm_blocks(eng, 8, seed=0)
    emitted = []
    for k in range(8):
        (r,) = eng.step([s], audio[k : k + 1])
        emitted.append(r.emitted_block)
        if r.frames is not None:
            assert r.frames.shape == (eng.frames_per_block, 128, 128, 3) and r.frames.dtype == np.uint8
    L = eng.stream.window_blocks
    assert emitted == [None] * (L - 1) + list(range(8 - (L - 1)))


def test_ar_baseline_emits_every_step_without_local_future() -> None:
    eng = make_engine(StreamConfig.ar_baseline())
    assert eng.L == 1
    s = eng.allocate(eng.prepare_anchor(face()), seed=1)
    audio = pcm_blocks(eng, 3, seed=0)
    assert [eng.step([s], audio[k : k + 1])[0].emitted_block for k in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("stream", [StreamConfig(), StreamConfig(block_frames=2, window_blocks=3,
                                                                  level_steps=(300, 700, 1000))])
def test_batched_equals_one_at_a_time(stream: StreamConfig) -> None:
    steps, seeds = 6, [11, 22, 33]
    batched = make_engine(stream)
    single = make_engine(stream)
    anchors = [batched.prepare_anchor(face(i)) for i in range(3)]
    audio = [pcm_blocks(batched, steps, seed=i) for i in range(3)]
    bs = [batched.allocate(a, sd) for a, sd in zip(anchors, seeds, strict=True)]
    ss = [single.allocate(a, sd) for a, sd in zip(anchors, seeds, strict=True)]
    outs_b: list[list[np.ndarray]] = [[], [], []]
    outs_s: list[list[np.ndarray]] = [[], [], []]
    for k in range(steps):
        # Batched: all three, but slot 1 sits out step 2 and catches up alone (any subset works).
        if k == 2:
            res = batched.step([bs[0], bs[2]], np.stack([audio[0][k], audio[2][k]]))
            res += batched.step([bs[1]], audio[1][k : k + 1])
            res.sort(key=lambda r: bs.index(r.slot))
        else:
            res = batched.step(bs, np.stack([a[k] for a in audio]))
        for i, r in enumerate(res):
            if r.frames is not None:
                outs_b[i].append(r.frames)
        for i in (2, 0, 1):  # one at a time, in another order
            (r,) = single.step([ss[i]], audio[i][k : k + 1])
            if r.frames is not None:
                outs_s[i].append(r.frames)
    for i in range(3):
        assert len(outs_b[i]) == len(outs_s[i]) == steps - (stream.window_blocks - 1)
        for fb, fs in zip(outs_b[i], outs_s[i], strict=True):
            assert np.abs(fb.astype(int) - fs.astype(int)).max() <= 1
    assert torch.allclose(batched.hist_k[bs[0]], single.hist_k[ss[0]], atol=1e-4)
    # Different seeds give different videos (the comparison above is not vacuous).
    assert not torch.allclose(batched.win_lat[bs[0]], batched.win_lat[bs[1]], atol=1e-2)
    assert not np.array_equal(outs_b[0][-1], outs_b[1][-1])


def test_same_seed_same_video_regardless_of_slot() -> None:
    eng = make_engine(max_sessions=3)
    a = eng.prepare_anchor(face())
    audio = pcm_blocks(eng, 5, seed=3)
    eng.allocate(a, seed=99)  # occupy slot 0 so the second run lands elsewhere
    s1 = eng.allocate(a, seed=5)
    f1 = [eng.step([s1], audio[k : k + 1])[0].frames for k in range(5)]
    eng.free(s1)
    s2 = eng.allocate(a, seed=5)
    f2 = [eng.step([s2], audio[k : k + 1])[0].frames for k in range(5)]
    for x, y in zip(f1, f2, strict=True):
        assert (x is None and y is None) or np.array_equal(x, y)


def test_deferred_results_are_the_waited_ones() -> None:
    """``step(..., deferred=True)`` (what the scheduler calls): the emitted results carry their block on its way,
    ``wait`` (from any thread, any number of times) gives exactly the frames and similarity ``step`` gives, and a
    step's pending rows do not move when the engine steps on before they are collected."""
    import concurrent.futures

    waited, deferred = make_engine(max_sessions=2), make_engine(max_sessions=2)
    anchors = [waited.prepare_anchor(face(i)) for i in range(2)]
    a = [waited.allocate(x, seed=7 + i) for i, x in enumerate(anchors)]
    b = [deferred.allocate(x, seed=7 + i) for i, x in enumerate(anchors)]
    audio = pcm_blocks(waited, 12, seed=3).reshape(6, 2, -1)
    pending = []
    for k in range(6):
        ref = waited.step(a, audio[k])
        res = deferred.step(b, audio[k], deferred=True)
        assert [(r.slot, r.step, r.emitted_block) for r in res] == [(r.slot, r.step, r.emitted_block) for r in ref]
        for r, want in zip(res, ref, strict=True):
            if want.emitted_block is None:
                assert r.decoded is None and r.wait() is r
            else:
                assert r.frames is None and r.anchor_similarity is None and r.decoded is not None
                pending.append((r, want))
    assert len(pending) == 2 * (6 - (waited.L - 1))
    # Collected only now (the engine stepped on meanwhile), two rows of one step from two threads at once.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda rw: rw[0].wait(), pending))
    for g, (r, want) in zip(got, pending, strict=True):
        assert g.decoded is None and g.frames is not None and want.frames is not None
        assert np.array_equal(g.frames, want.frames) and g.anchor_similarity == want.anchor_similarity
        again = r.wait()
        assert again.frames is not None and np.array_equal(again.frames, g.frames)
    assert not np.array_equal(got[0].frames, got[1].frames)  # the two slots' blocks are their own


def test_overlap_decode_needs_cuda() -> None:
    lm = random_init("tiny", seed=0)
    with pytest.raises(ValueError, match="overlap_decode needs a CUDA device"):
        StreamEngine(lm.model, lm.vae, StreamConfig(), max_sessions=1, overlap_decode=True)


def test_slots_allocated_and_freed_exactly_once() -> None:
    eng = make_engine(max_sessions=2)
    a = eng.prepare_anchor(face())
    s0, s1 = eng.allocate(a, 1), eng.allocate(a, 2)
    assert eng.free_slots == 0
    with pytest.raises(NoFreeSlotError):
        eng.allocate(a, 3)
    eng.free(s0)
    with pytest.raises(SlotError):
        eng.free(s0)
    with pytest.raises(SlotError):
        eng.step([s0], np.zeros((1, eng.block_samples), np.float32))
    assert eng.free_slots == 1
    eng.free(s1)
    assert eng.free_slots == 2


def test_step_rejects_bad_audio_shape() -> None:
    eng = make_engine()
    s = eng.allocate(eng.prepare_anchor(face()), 1)
    with pytest.raises(ValueError, match="pcm must be"):
        eng.step([s], np.zeros((1, eng.block_samples + 1), np.float32))
    with pytest.raises(ValueError, match="twice"):
        eng.step([s, s], np.zeros((2, eng.block_samples), np.float32))


def test_audio_features_do_not_depend_on_block_cuts() -> None:
    lm = random_init("tiny")
    fe = lm.model.audio_frontend.eval()
    x = torch.from_numpy(speechlike_pcm(1.0).astype(np.float32) / 32768)
    ctx, spf = fe.context, fe.spf
    padded = torch.cat([torch.zeros(ctx), x])[: ctx + 24 * spf]
    with torch.no_grad():
        whole = fe(padded[None])
        parts = [fe(padded[i * 4 * spf : ctx + (i + 1) * 4 * spf][None]) for i in range(6)]
    assert torch.allclose(whole, torch.cat(parts, dim=1), atol=1e-5)


def test_interrupt_replaces_window_audio_with_silence() -> None:
    eng = make_engine()
    s = eng.allocate(eng.prepare_anchor(face()), 1)
    for k, blk in enumerate(pcm_blocks(eng, 3, seed=1)):
        eng.step([s], blk[None])
        assert k < 3
    assert not torch.allclose(eng.win_audio[s, : eng.B], eng.silence_tokens)
    eng.clear_audio(s)
    assert torch.allclose(eng.win_audio[s], eng.silence_tokens.repeat(eng.L, 1))


def test_replan_warms_the_window_up_again_and_keeps_numbering() -> None:
    eng = make_engine()
    L = eng.stream.window_blocks
    s = eng.allocate(eng.prepare_anchor(face()), seed=1)
    audio = pcm_blocks(eng, 6 + L + 2, seed=0)
    results = [eng.step([s], audio[k : k + 1])[0] for k in range(6)]
    assert [r.emitted_block for r in results] == [None] * (L - 1) + list(range(6 - (L - 1)))
    hist = eng.hist_k[s].clone()
    eng.replan(s)
    assert torch.equal(eng.hist_k[s], hist)  # the clean history (temporal anchor) stays
    after = [eng.step([s], audio[k : k + 1])[0] for k in range(6, 6 + L + 2)]
    # L - 1 steps fill the window without emitting; the L-th emits the next block of the stream.
    assert [r.emitted_block for r in after] == [None] * (L - 1) + [6 - (L - 1) + i for i in range(3)]
    assert [r.step for r in after] == list(range(6, 6 + L + 2))  # the step count (noise seed) keeps counting
    assert eng.steps_done(s) == 6 + L + 2
    for r in after[L - 1:]:
        assert r.frames is not None and r.frames.shape == (eng.frames_per_block, 128, 128, 3)
    with pytest.raises(SlotError):
        eng.replan(3)


def test_replan_in_a_batch_equals_alone_and_leaves_other_slots_alone() -> None:
    """A replanned slot stepped in a batch gives what it gives alone; its batch mates give what they give
    in an engine where nothing was replanned (the masks are per slot)."""
    L, steps, at = 4, 11, 5
    batched, single, plain = make_engine(), make_engine(), make_engine()
    anchors = [batched.prepare_anchor(face(i)) for i in range(2)]
    audio = [pcm_blocks(batched, steps, seed=i) for i in range(2)]
    bs = [batched.allocate(a, sd) for a, sd in zip(anchors, (5, 6), strict=True)]
    ss = [single.allocate(a, sd) for a, sd in zip(anchors, (5, 6), strict=True)]
    ps = [plain.allocate(a, sd) for a, sd in zip(anchors, (5, 6), strict=True)]
    out_b: list[list[tuple[int | None, np.ndarray | None]]] = [[], []]
    out_s: list[list[tuple[int | None, np.ndarray | None]]] = [[], []]
    out_p: list[list[tuple[int | None, np.ndarray | None]]] = [[], []]
    for k in range(steps):
        if k == at:  # slot 0 re-plans in the batched and single engines, never in the plain one
            batched.replan(bs[0])
            single.replan(ss[0])
        for i, r in enumerate(batched.step(bs, np.stack([a[k] for a in audio]))):
            out_b[i].append((r.emitted_block, r.frames))
        for i in (1, 0):
            (r,) = single.step([ss[i]], audio[i][k : k + 1])
            out_s[i].append((r.emitted_block, r.frames))
            (r,) = plain.step([ps[i]], audio[i][k : k + 1])
            out_p[i].append((r.emitted_block, r.frames))
    assert [e for e, _ in out_b[0]] == [e for e, _ in out_s[0]] == \
        [None] * (L - 1) + [0, 1] + [None] * (L - 1) + [2, 3, 4]
    assert [e for e, _ in out_b[1]] == [e for e, _ in out_p[1]] == [None] * (L - 1) + list(range(steps - L + 1))
    for a, b in [(out_b[0], out_s[0]), (out_b[1], out_s[1]), (out_b[1], out_p[1])]:
        for (_, fa), (_, fb) in zip(a, b, strict=True):
            assert (fa is None) == (fb is None)
            if fa is not None and fb is not None:
                assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1
    # The replan changed slot 0's video after the seam (the comparison above is not vacuous).
    assert not np.array_equal(out_b[0][-1][1], out_p[0][-1][1])


def test_replan_drops_the_discarded_blocks_from_the_audio_context() -> None:
    eng = make_engine()
    s = eng.allocate(eng.prepare_anchor(face()), seed=1)
    C, n = eng.context_samples, eng.block_samples
    for blk in pcm_blocks(eng, 2, seed=3):
        eng.step([s], blk[None])
    before = eng.audio_tail[s].clone()
    eng.replan(s)  # two blocks in the window: 2 * n samples leave the context
    keep = max(C - 2 * n, 0)
    assert torch.equal(eng.audio_tail[s, C - keep:], before[:keep])
    assert not eng.audio_tail[s, : C - keep].any()


def test_long_stream_state_and_memory_stay_flat() -> None:
    """3,000 latent frames through one slot: no state grows, outputs stay finite, RSS stays flat.

    (Step time over the same run is measured by `avatarforcing bench`, not asserted here.)"""
    import psutil

    eng = make_engine(max_sessions=1)
    s = eng.allocate(eng.prepare_anchor(face()), 7)
    state = [eng.win_lat, eng.win_audio, eng.hist_k, eng.hist_v, eng.anchor_k, eng.audio_tail]
    sizes = [t.shape for t in state]
    blk = pcm_blocks(eng, 1, seed=2)
    proc = psutil.Process()
    rss = {}
    total = 3000 // eng.B
    for k in range(total):
        (r,) = eng.step([s], blk)
        if k in (300, total - 1):
            rss[k] = proc.memory_info().rss
            assert r.frames is not None and r.anchor_similarity is not None
            assert np.isfinite(r.anchor_similarity)
    assert [t.shape for t in state] == sizes
    assert eng.steps_done(s) == total
    assert torch.isfinite(eng.win_lat[s]).all() and torch.isfinite(eng.hist_k[s]).all()
    growth = rss[total - 1] - rss[300]
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over the stream"


def test_checkpoint_round_trip(tmp_path) -> None:
    lm = random_init("tiny", seed=3)
    p = tmp_path / "m.safetensors"
    save_checkpoint(p, lm.model, lm.vae, lm.stream_cfg, {"note": "test"})
    back = load_checkpoint(p)
    assert back.trained and back.meta == {"note": "test"} and back.model_cfg == lm.model_cfg
    for (k, v), (k2, v2) in zip(lm.model.state_dict().items(), back.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_wan_13b_config_has_reference_dimensions() -> None:
    cfg = model_preset("wan-1.3b")
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.head_dim, cfg.ffn_dim) == (1536, 30, 12, 128, 8960)
    assert cfg.rope_split == (44, 42, 42) and cfg.in_channels == 33 and cfg.tokens_per_frame == 1560
    with torch.device("meta"):
        n = count_parameters(AvatarDiT(cfg))
    assert 1.2e9 < n < 1.8e9, n


def test_wan_13b_config_runs_a_forward_pass() -> None:
    """The reference transformer dimensions, one engine step at a reduced frame size (CPU memory)."""
    cfg = dataclasses.replace(model_preset("wan-1.3b"), height=64, width=64, vae_channels=(16, 16, 16))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        from avatarforcing.vae import TinyAutoencoder

        model, vae = AvatarDiT(cfg), TinyAutoencoder(cfg)
    stream = StreamConfig(block_frames=1, window_blocks=2, level_steps=(500, 1000))
    eng = StreamEngine(model, vae, stream, max_sessions=1, dtype="bfloat16")
    s = eng.allocate(eng.prepare_anchor(face()[:64, :64]), 1)
    res = [eng.step([s], np.zeros((1, eng.block_samples), np.float32))[0] for _ in range(2)]
    assert res[0].frames is None and res[1].frames is not None and res[1].frames.shape == (4, 64, 64, 3)
