"""The onset measurements: the bench's onset section (which frame is a burst's first) and the eval at the seam.

Smoke-level where they run the model or the server (tiny sizes, no timed assertions: the numbers are the bench's
to print); exact where they only read what was received (``find_onset``) or computed (the published onset).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from avatarforcing.checkpoint import load_default
from avatarforcing.onset_eval import speech_after_onset, stream_onset
from avatarforcing_service.server import App
from avatarforcing_tools.onset_bench import (
    AudioSeen,
    Burst,
    FrameSeen,
    OnsetRun,
    bench_onset,
    find_onset,
    measure,
    published_onset,
)

ROOT = Path(__file__).resolve().parent.parent
IN_BLOCK = 2560  # samples of a tiny block at 16 kHz (4 frames of 640)


def _frames_of(block: int, t: float, start: int) -> list[FrameSeen]:
    return [FrameSeen(t + i * 0.04, block, block * 4 + i, start + i * 640, start + (i + 1) * 640) for i in range(4)]


def test_find_onset_skips_the_old_utterance_and_silence_and_finds_the_first_frame_with_the_burst() -> None:
    # Sent before the burst: 10,000 samples of an earlier utterance, partly rendered, then interrupted.
    burst = Burst(t_send=10.0, sent_before=10_000, samples=56_000)
    audio = [
        AudioSeen(9.0, 3, 3 * IN_BLOCK, IN_BLOCK, 0, 7_680),  # the old utterance, before the burst
        AudioSeen(10.1, 4, 4 * IN_BLOCK, IN_BLOCK, 0, 10_000),  # old audio still queued: sent after the burst
        AudioSeen(10.3, 5, 5 * IN_BLOCK, 0, 0, 10_000),  # a window block the Interrupt silenced
        AudioSeen(10.5, 6, 6 * IN_BLOCK, 1_000, 1_560, 11_000),  # the burst starts inside this block
        AudioSeen(10.7, 7, 7 * IN_BLOCK, IN_BLOCK, 0, 13_560),
    ]
    frames = [f for a in audio for f in _frames_of(a.block, a.t, a.start_sample)]
    o = find_onset(audio, frames, burst)
    assert o is not None
    assert o.block == 6
    # Real audio starts 1,560 samples into block 6: frames 24 and 25 (its samples 0-1,280) show only the
    # inserted silence, frame 26 (samples 1,280-1,920) the burst's first samples.
    assert o.frame_index == 26
    assert math.isclose(o.audio_s, 0.5) and math.isclose(o.frame_s, 0.58)


def test_find_onset_is_none_until_a_block_carries_the_burst() -> None:
    burst = Burst(t_send=5.0, sent_before=0, samples=IN_BLOCK)
    idle = [AudioSeen(5.0 + 0.16 * k, k, k * IN_BLOCK, 0, 0, 0) for k in range(3)]
    assert find_onset(idle, [f for a in idle for f in _frames_of(a.block, a.t, a.start_sample)], burst) is None
    # The AudioOut came, its frames not yet.
    carried = idle + [AudioSeen(5.5, 3, 3 * IN_BLOCK, IN_BLOCK, 0, IN_BLOCK)]
    assert find_onset(carried, [f for a in idle for f in _frames_of(a.block, a.t, a.start_sample)], burst) is None


def test_published_onset_is_computed_from_the_gpu_bench_step_times() -> None:
    pub = published_onset(ROOT / "bench" / "results")
    assert [(p["gpu"], p["resolution"]) for p in pub] == [
        ("NVIDIA H100 80GB HBM3", "480x832"), ("NVIDIA H100 80GB HBM3", "512x512"),
        ("NVIDIA H200", "480x832"), ("NVIDIA H200", "512x512")]
    for p in pub:
        d = json.loads((ROOT / p["source"]).read_text())
        one = d["sections"]["e2e-full" if p["resolution"] == "480x832" else "e2e-512"]["by_batch"][0]
        assert p["computed"] is True and p["block_ms"] == 640.0 and p["window_blocks"] == 4
        assert math.isclose(p["onset_compute_ms"], 3 * one["denoise_step_ms"] + one["step_ms"])
        assert math.isclose(p["target_ms"], 640.0 + p["onset_compute_ms"])
        assert p["today_latency_ms"] == 4 * 640.0 + 240.0  # L blocks + the default processing budget
        assert p["replan_cost_steps"] == 3
        # A step takes less than a block on both cards, so even a step in flight keeps the target.
        assert p["meets_target"] and p["onset_worst_ms"] < p["target_ms"]


def _check_summary(r: dict[str, Any], bursts: int) -> None:
    assert r["bursts"] == bursts and r["missed"] == 0
    for kind in ("frame", "audio"):
        s = r[kind]
        assert s["n"] == bursts
        assert 0 < s["min_ms"] <= s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] < math.inf
    # A block's AudioOut goes out before its frames: the burst's audio never arrives after its first frame.
    assert r["audio"]["p50_ms"] <= r["frame"]["p50_ms"]


TINY = OnsetRun(reps=1, idle_s=0.5, utterance_s=1.0, speak_s=0.3, sessions=2, session_bursts=1,
                session_idle_s=(0.2, 0.6))


async def test_measure_finds_every_burst_in_process(make_app: Callable[..., Any]) -> None:
    app: App = await make_app(max_sessions=3)
    res = await measure(f"127.0.0.1:{app.port}", TINY)
    _check_summary(res["idle"], 1)
    _check_summary(res["interrupt"], 1)
    _check_summary(res["sessions"], 2)
    assert res["announced"]["latency_ms"] > 0
    json.dumps(res)


def test_bench_onset_section_runs_a_server_and_writes_well_formed_numbers(tmp_path: Path) -> None:
    res = bench_onset(False, 2, None, run=TINY, variants=[("default server", [])],
                      results_dir=ROOT / "bench" / "results")
    v = res["variants"]["default server"]
    _check_summary(v["idle"], 1)
    _check_summary(v["sessions"], 2)
    assert v["server_frame_latency"]["p50_ms"] > 0
    assert len(res["published_computed"]) == 4
    (tmp_path / "onset.json").write_text(json.dumps(res))


def test_stream_onset_gives_every_speech_block_with_and_without_replan() -> None:
    lm = load_default()
    clip = speech_after_onset("test", 0, 1.0)
    assert clip["onset_frame"] > 0  # the clip's leading silence was cut
    assert len(clip["frames"]) == 25 and len(clip["audio"]) == 25 * 640
    got = {}
    for replan in (False, True):
        frames, counts = stream_onset(lm, [clip], idle_blocks=5, replan=replan)
        assert frames[0].shape == (24, 128, 128, 3)  # 6 whole blocks of 4 frames
        assert counts["warmup_emissions"] == 0  # a re-planned window emits nothing while it fills
        got[replan] = frames[0]
    # The re-planned speech blocks come from another window (warmed up on the speech alone), not a copy.
    assert not np.array_equal(got[False], got[True])


def test_eval_onset_cli_reports_sync_for_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "onset.json"
    r = subprocess.run([sys.executable, "-m", "avatarforcing_tools.cli", "eval", "--onset", "--test-clips", "1",
                        "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Lip sync after an onset" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["config"]["clips"] == 1 and rep["model"] == "tiny" and rep["trained"] is True
    assert rep["replan_available"] is True
    assert set(rep["results"]) == {"without", "with"}
    for res in rep["results"].values():
        for k in ("first_s", "first_s_best", "whole"):
            assert -1.0 <= res[k] <= 1.0
        assert res["steady_windows"] >= 1 and -1.0 <= res["steady"] <= 1.0
        assert res["within_5pct"] == (res["first_s"] >= 0.95 * res["steady"])
        assert res["warmup_emissions"] == 0
