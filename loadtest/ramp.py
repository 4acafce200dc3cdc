"""Ramp: add locust users step by step until the p99 inter-frame gap passes a threshold; report the
largest number of real-time sessions one replica held, beside the server's own Prometheus metrics.

    .venv/bin/python loadtest/ramp.py                      # starts its own server (embedded defaults)
    .venv/bin/python loadtest/ramp.py --host 10.0.0.5:50051 --metrics http://10.0.0.5:9464/metrics

Writes out/ramp/<level>_stats.csv (+ .html) per level and out/ramp/ramp.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from avatarforcing_tools.common import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def _stats(prefix: Path) -> dict[str, dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if not s.labels or set(s.labels) == {"le"} and s.labels["le"] == "+Inf":
                out[s.name] = s.value
    return out


def _hist_mean(m0: dict[str, float], m1: dict[str, float], name: str) -> float:
    n = m1.get(f"{name}_count", 0) - m0.get(f"{name}_count", 0)
    return (m1.get(f"{name}_sum", 0) - m0.get(f"{name}_sum", 0)) / n if n else float("nan")


def run_level(n: int, host: str, metrics_url: str, seconds: int, out: Path) -> dict[str, Any]:
    prefix = out / f"{n:02d}"
    m0 = _metrics(metrics_url)
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(n), "-r", str(max(1, n)), "-t", f"{seconds}s", "--host", host, "--csv", str(prefix),
           "--html", f"{prefix}.html", "--only-summary", "--loglevel", "WARNING"]
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m1 = _metrics(metrics_url)
    st = _stats(prefix)
    gap = st.get("inter_frame_gap", {})
    lat = st.get("frame_latency", {})
    ttff = st.get("time_to_first_frame", {})
    failures = sum(int(r["Failure Count"]) for name, r in st.items() if name != "Aggregated")
    frames = int(lat.get("Request Count", 0) or 0)
    ttff_s = float(ttff.get("50%", "nan") or "nan") / 1000
    streaming_s = seconds - (ttff_s if ttff_s == ttff_s else 0.0)  # frames flow after the first one
    return {
        "users": n, "frames": frames, "frames_per_session_per_s": frames / max(n, 1) / max(streaming_s, 1e-3),
        "gap_p50_ms": float(gap.get("50%", "nan") or "nan"), "gap_p99_ms": float(gap.get("99%", "nan") or "nan"),
        "latency_p50_ms": float(lat.get("50%", "nan") or "nan"),
        "latency_p99_ms": float(lat.get("99%", "nan") or "nan"),
        "ttff_p50_ms": float(ttff.get("50%", "nan") or "nan"), "failures": failures,
        "server": {
            "step_mean_ms": _hist_mean(m0, m1, "avatarforcing_step_duration_seconds") * 1000,
            "batch_mean": _hist_mean(m0, m1, "avatarforcing_batch_size"),
            "encode_mean_ms": _hist_mean(m0, m1, "avatarforcing_encode_duration_seconds") * 1000,
            "frames_emitted": m1.get("avatarforcing_frames_emitted_total", 0)
            - m0.get("avatarforcing_frames_emitted_total", 0),
            "frames_dropped": m1.get("avatarforcing_frames_dropped_total", 0)
            - m0.get("avatarforcing_frames_dropped_total", 0),
            "anchor_similarity_mean": _hist_mean(m0, m1, "avatarforcing_anchor_similarity"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=None, help="server address (default: start one here)")
    ap.add_argument("--metrics", default=None, help="the server's /metrics URL (with --host)")
    ap.add_argument("--levels", default="1,2,4,6,8,10,12,14,16", help="users per step")
    ap.add_argument("--seconds", type=int, default=20, help="duration of each step")
    ap.add_argument("--threshold-ms", type=float, default=80.0, help="p99 inter-frame gap that ends the ramp")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "ramp")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    proc = None
    if a.host is None:
        port, mport = free_port(), free_port()
        proc = subprocess.Popen([sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--port", str(port),
                                 "--metrics-port", str(mport), "--max-sessions", str(max(levels)),
                                 "--log-level", "warning"], stderr=subprocess.DEVNULL)
        host, metrics_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"
        wait_port(port, proc)
    else:
        host, metrics_url = a.host, a.metrics or f"http://{a.host.rsplit(':', 1)[0]}:9464/metrics"
    results: list[dict[str, Any]] = []
    best = 0
    try:
        for n in levels:
            r = run_level(n, host, metrics_url, a.seconds, a.out)
            r["realtime"] = (r["gap_p99_ms"] <= a.threshold_ms and r["failures"] == 0
                             and r["server"]["frames_dropped"] == 0)
            results.append(r)
            s = r["server"]
            print(f"{n:3d} users: gap p50 {r['gap_p50_ms']:.0f} ms p99 {r['gap_p99_ms']:.0f} ms, latency p50 "
                  f"{r['latency_p50_ms']:.0f} ms, {r['frames_per_session_per_s']:.1f} frames/s/session, "
                  f"failures {r['failures']} | server: step {s['step_mean_ms']:.1f} ms, batch "
                  f"{s['batch_mean']:.1f}, dropped {s['frames_dropped']:.0f} -> "
                  f"{'real time' if r['realtime'] else 'NOT real time'}", flush=True)
            if not r["realtime"]:
                break
            best = n
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    (a.out / "ramp.json").write_text(json.dumps({"host": host, "threshold_ms": a.threshold_ms,
                                                 "seconds_per_level": a.seconds, "levels": results,
                                                 "max_realtime_sessions": best}, indent=2))
    print(f"largest number of real-time sessions held: {best} (p99 inter-frame gap <= {a.threshold_ms:g} ms, "
          f"no failures, no frames dropped); wrote {a.out / 'ramp.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
