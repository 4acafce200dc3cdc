"""The `avatarforcing` command: the demo writes a playable MP4; bench runs and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarforcing_tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_writes_mp4_with_video_and_audio(tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    r = run("demo", "--out", str(out), "--encoding", "fmp4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and "END_REASON_END_OF_AUDIO" in r.stdout
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video=0))
        assert (v.codec_context.width, v.codec_context.height) == (128, 128)
        assert a.codec_context.sample_rate == 16000
    assert frames >= 9.7 * 25  # the bundled sample is 9.7 s


def test_bench_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    r = run("bench", "--quick", "--sections", "engine,long", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [b["batch"] for b in res["engine"]["by_batch"]] == [1, 2, 4, 8, 16]
    assert res["engine"]["batched_vs_single_8"]["speedup"] > 0
    assert res["long_stream"]["latent_frames"] == 300
    assert "Engine step" in r.stdout and "Long stream" in r.stdout


def test_serve_rejects_bad_config() -> None:
    r = run("serve", "--max-sessions", "0", "--metrics-port", "-1", timeout=60)
    assert r.returncode != 0 and "max_sessions must be >= 1" in r.stderr
