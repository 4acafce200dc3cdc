"""`avatarforcing bench`: engine step time by batch size, batched vs one at a time, a long stream,
real-time sessions through the real gRPC server, and speech onset after a burst (tools/onset_bench.py).
Prints tables; writes JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from avatarforcing.report import print_table as _table

from .common import assets_dir, free_port, histogram_quantile, wait_port


def _pct(xs: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def _engine(max_sessions: int = 16):  # type: ignore[no-untyped-def]
    from avatarforcing import StreamEngine
    from avatarforcing.checkpoint import load_default

    lm = load_default()
    return StreamEngine(lm.model, lm.vae, lm.stream_cfg, max_sessions=max_sessions), lm


def _face() -> np.ndarray:
    return (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)


def bench_engine(quick: bool) -> dict[str, Any]:
    eng, lm = _engine(16)
    cfg = eng.cfg
    anchor = eng.prepare_anchor(_face()) if cfg.height == 128 else None
    assert anchor is not None
    rng = np.random.default_rng(0)
    n_steps = 6 if quick else 20
    rows, out = [], []

    def session_batch(bs: int) -> tuple[list[int], np.ndarray]:
        slots = [eng.allocate(anchor, seed=i + 1) for i in range(bs)]
        pcm = (rng.standard_normal((bs, eng.block_samples)) * 0.1).astype(np.float32)
        for _ in range(4):  # warm-up (and past the window's warm-up steps)
            eng.step(slots, pcm)
        return slots, pcm

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        for _ in range(n_steps):
            fn()
        return (time.perf_counter() - t) / n_steps

    for bs in (1, 2, 4, 8, 16):
        slots, pcm = session_batch(bs)
        step = timed(lambda: eng.step(slots, pcm))  # noqa: B023 (used inside the iteration)
        frames = bs * eng.frames_per_block
        rt = (eng.frames_per_block / cfg.fps) / step * bs  # sessions this batch size could keep in real time
        rows.append([bs, step * 1000, step * 1000 / frames, frames / step, rt])
        out.append({"batch": bs, "step_ms": step * 1000, "ms_per_frame": step * 1000 / frames,
                    "frames_per_s": frames / step, "realtime_capacity": rt})
        for s in slots:
            eng.free(s)
    _table("Engine step (one batched pass + temporal anchor + decode), tiny config",
           ["batch", "step ms", "ms/frame", "frames/s", "real-time capacity"], rows)
    # Batched vs the same sessions stepped one at a time.
    bs = 8
    slots, pcm = session_batch(bs)
    batched = timed(lambda: eng.step(slots, pcm))
    single = timed(lambda: [eng.step([s], pcm[i : i + 1]) for i, s in enumerate(slots)])
    for s in slots:
        eng.free(s)
    ratio = single / batched
    _table("Batched vs one at a time, 8 sessions", ["mode", "ms per round", "frames/s"],
           [["batched", batched * 1000, bs * eng.frames_per_block / batched],
            ["one at a time", single * 1000, bs * eng.frames_per_block / single]])
    print(f"  batched throughput = {ratio:.2f}x one-at-a-time (target >= 3x)")
    return {"model": cfg.name, "trained": lm.trained, "frames_per_block": eng.frames_per_block,
            "slot_bytes": eng.slot_bytes(), "by_batch": out,
            "batched_vs_single_8": {"batched_ms": batched * 1000, "single_ms": single * 1000, "speedup": ratio}}


def bench_long(latent_frames: int) -> dict[str, Any]:
    import psutil

    eng, _ = _engine(1)
    s = eng.allocate(eng.prepare_anchor(_face()), seed=1)
    pcm = (np.random.default_rng(1).standard_normal((1, eng.block_samples)) * 0.1).astype(np.float32)
    proc = psutil.Process()
    steps = latent_frames // eng.B
    times = np.zeros(steps)
    rss: dict[int, int] = {}
    t_all = time.perf_counter()
    for k in range(steps):
        t = time.perf_counter()
        eng.step([s], pcm)
        times[k] = time.perf_counter() - t
        if k in (30 // eng.B, steps - 1):
            rss[k] = proc.memory_info().rss
        if k % 500 == 0:
            print(f"\r  long stream: {k * eng.B}/{latent_frames} latent frames", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    # Medians over 100 steps: around latent frame 30 (after the window's warm-up) and at the end.
    w = min(100, steps // 3)
    a = max(eng.L, 30 // eng.B - w // 2)
    early = float(np.median(times[a : a + w]))
    late = float(np.median(times[-w:]))
    segments = [float(np.median(seg)) * 1000 for seg in np.array_split(times[eng.L :], 10)]
    r0, r1 = rss[30 // eng.B], rss[steps - 1]
    _table(f"Long stream, one session, {latent_frames} latent frames ({latent_frames * 4 / 25 / 60:.1f} min of video)",
           ["at latent frame", "median step ms", "RSS MiB"],
           [[30, early * 1000, r0 / 2**20], [latent_frames, late * 1000, r1 / 2**20]])
    change = (late - early) / early * 100
    print(f"  step time change {change:+.1f}% (target within 5%), RSS change {(r1 - r0) / 2**20:+.1f} MiB, "
          f"total {time.perf_counter() - t_all:.0f} s")
    print("  median step ms per tenth of the stream: " + " ".join(f"{x:.2f}" for x in segments))
    return {"latent_frames": latent_frames, "step_ms_at_30": early * 1000, "step_ms_at_end": late * 1000,
            "step_change_pct": change, "step_ms_by_tenth": segments, "rss_bytes_at_30": r0, "rss_bytes_at_end": r1}



async def _run_sessions(target: str, n: int, seconds: float, warmup: float) -> dict[str, Any]:
    from avatarforcing_client import AvatarForcingClient, pb, read_wav


    wav, rate = read_wav(assets_dir() / "speech_16k.wav")
    image = (assets_dir() / "reference_face.png").read_bytes()
    gaps: list[float] = []
    counts: list[int] = []
    dropped: list[int] = []
    ttff: list[float] = []

    async def one(i: int) -> None:
        async with AvatarForcingClient(target) as c:
            loop = asyncio.get_running_loop()
            t_open = loop.time()
            async with c.session(image=image, sample_rate=rate, video_encoding=pb.VIDEO_ENCODING_H264,
                                 pacing=pb.PACING_REALTIME, seed=i + 1) as s:
                offset = (i * 3200) % len(wav)
                pcm = np.roll(wav, -offset)
                pcm = np.tile(pcm, int(seconds * rate / len(pcm)) + 2)[: int((seconds + warmup + 2) * rate)]
                sender = asyncio.create_task(s.stream_pcm([pcm[j : j + 320].tobytes()
                                                           for j in range(0, len(pcm), 320)], end=False))
                t0 = loop.time()
                last = None
                n_frames = 0
                max_idx = -1
                async for ev in s.events():
                    if isinstance(ev, pb.VideoFrame):
                        now = loop.time()
                        if max_idx < 0:
                            ttff.append(now - t_open)
                        if now - t0 > warmup:
                            if last is not None:
                                gaps.append(now - last)
                            n_frames += 1
                        last = now
                        max_idx = ev.index
                    if loop.time() - t0 > warmup + seconds:
                        break
                sender.cancel()
                counts.append(n_frames)
                dropped.append(0)

    await asyncio.gather(*(one(i) for i in range(n)))
    return {"gaps": gaps, "frames": counts, "ttff": ttff}


def bench_server(max_sessions: int, quick: bool, threads: int | None) -> dict[str, Any]:
    seconds, warmup = (5.0, 2.5) if quick else (12.0, 3.0)
    levels = [1, 2, 4] if quick else [n for n in (1, 2, 4, 6, 8, 10, 12, 16) if n <= max_sessions]
    results = []
    best = 0
    for n in levels:
        port, mport = free_port(), free_port()
        cmd = [sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--port", str(port), "--metrics-port",
               str(mport), "--max-sessions", str(n), "--log-level", "warning"]
        if threads:
            cmd += ["--threads", str(threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port, proc)
            r = asyncio.run(_run_sessions(f"127.0.0.1:{port}", n, seconds, warmup))
            body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        expected = seconds * 25
        lat50 = histogram_quantile(body, "avatarforcing_frame_latency_seconds", 0.5)
        lat99 = histogram_quantile(body, "avatarforcing_frame_latency_seconds", 0.99)
        step99 = histogram_quantile(body, "avatarforcing_step_duration_seconds", 0.99)
        dropped = sum(float(line.split()[-1]) for line in body.splitlines()
                      if line.startswith("avatarforcing_frames_dropped_total"))
        g50, g99 = _pct(r["gaps"], 50) * 1000, _pct(r["gaps"], 99) * 1000
        frac = min(r["frames"]) / expected if r["frames"] else 0.0
        ok = g99 <= 80.0 and frac >= 0.95 and dropped == 0
        best = n if ok and n > best else best
        row = {"sessions": n, "gap_p50_ms": g50, "gap_p99_ms": g99, "latency_p50_ms": lat50 * 1000,
               "latency_p99_ms": lat99 * 1000, "step_p99_ms": step99 * 1000, "min_frame_fraction": frac,
               "frames_dropped": dropped, "ttff_p50_ms": _pct(r["ttff"], 50) * 1000, "realtime": ok}
        results.append(row)
        print(f"  {n} sessions: gap p50 {g50:.1f} ms p99 {g99:.1f} ms, latency p50 {lat50 * 1000:.0f} ms "
              f"p99 {lat99 * 1000:.0f} ms, frames {frac * 100:.0f}%, dropped {dropped:.0f} -> "
              f"{'real time' if ok else 'NOT real time'}", file=sys.stderr)
    _table("Real-time sessions through the gRPC server (REALTIME pacing, H.264, speech streamed in real time)",
           ["sessions", "gap p50 ms", "gap p99 ms", "latency p50 ms", "latency p99 ms", "step p99 ms", "frames %",
            "dropped", "real time"],
           [[r["sessions"], r["gap_p50_ms"], r["gap_p99_ms"], r["latency_p50_ms"], r["latency_p99_ms"],
             r["step_p99_ms"], r["min_frame_fraction"] * 100, int(r["frames_dropped"]), r["realtime"]]
            for r in results])
    print(f"  largest number of real-time sessions (p99 gap <= 80 ms, >= 95% of frames, none dropped): {best}")
    return {"levels": results, "max_realtime_sessions": best, "seconds_per_level": seconds}



def run_bench(a: argparse.Namespace) -> int:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    unknown = sections - {"engine", "server", "long", "onset"}
    if unknown:
        print(f"unknown bench sections: {sorted(unknown)}", file=sys.stderr)
        return 2
    res: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": "cpu"},
    }
    if "engine" in sections:
        res["engine"] = bench_engine(a.quick)
    if "long" in sections:
        res["long_stream"] = bench_long(300 if a.quick else a.long_frames)
    if "server" in sections:
        res["server"] = bench_server(a.max_sessions, a.quick, a.threads)
    if "onset" in sections:
        from .onset_bench import bench_onset

        res["onset"] = bench_onset(a.quick, getattr(a, "onset_sessions", 8), a.threads)
    # The onset section alone has a file of its own (the model named as the other CPU files' content is).
    stem = "onset-cpu-tiny" if sections == {"onset"} else "cpu"
    out = a.out or Path("bench/results") / f"{stem}-{dt.date.today().isoformat()}{'-quick' if a.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float))
    print(f"\nwrote {out}")
    return 0
