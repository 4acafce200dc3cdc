"""`avatarforcing bench --failover`: kill -9 the replica that owns live sessions, over and over,
and measure how fast the Python SDK resumes them elsewhere.

It starts a real redis-server (the Debian package) on a free loopback port and ``--replicas``
`avatarforcing serve` processes routed through it, opens ``--sessions`` REALTIME sessions with the
SDK (speech streamed in real time, in a loop), then ``--kills`` times: kills (SIGKILL) the replica
owning a session, times each of its sessions from the kill to the first frame of the resumed
stream, and starts a replacement replica. A session that neither resumes nor ends with a status
within ``--resume-timeout`` counts as lost. Before the kills it measures Redis operations per
session per second at steady state (INFO commandstats). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import assets_dir, free_port, port_up


@dataclass
class _Replica:
    node_id: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class _Tracked:
    session: Any
    frames: int = 0
    last_gen: int = 0
    resumed_at: list[float] = field(default_factory=list)
    error: str = ""
    done: bool = False


class _Cluster:
    def __init__(self, redis_bin: str, workdir: Path, max_sessions: int, threads: int) -> None:
        self.redis_bin = redis_bin
        self.workdir = workdir
        self.max_sessions = max_sessions
        self.threads = threads
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.replicas: list[_Replica] = []
        self.n = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            [self.redis_bin, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await port_up(self.redis_port, 20)

    def spawn(self) -> _Replica:
        self.n += 1
        node_id, port = f"bench-{self.n}", free_port()
        env = dict(os.environ, AVATARFORCING_REDIS_URL=self.redis_url, AVATARFORCING_NODE_ID=node_id,
                   AVATARFORCING_LOG_LEVEL="warning", OMP_NUM_THREADS=str(self.threads))
        proc = subprocess.Popen(
            [sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "-1", "--max-sessions", str(self.max_sessions), "--threads", str(self.threads),
             "--grace", "1"], env=env, stdout=subprocess.DEVNULL, stderr=(self.workdir / f"{node_id}.log").open("wb"))
        r = _Replica(node_id, port, proc)
        self.replicas.append(r)
        return r

    async def serving(self, r: _Replica, timeout: float = 180) -> None:
        from avatarforcing_client import AvatarForcingClient

        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if r.proc.poll() is not None:
                log = (self.workdir / f"{r.node_id}.log").read_text()[-2000:]
                raise RuntimeError(f"replica {r.node_id} exited:\n{log}")
            try:
                async with AvatarForcingClient(r.address) as c:
                    info = await c.server_info(timeout=1)
                    if info.node_id == r.node_id:
                        return
            except Exception:
                await asyncio.sleep(0.3)
        raise RuntimeError(f"replica {r.node_id} not serving after {timeout} s")

    def stop(self) -> None:
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            try:
                r.proc.wait(20)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)


def _commandstats(port: int) -> dict[str, int]:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    try:
        info = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def run_failover(a: argparse.Namespace) -> dict[str, Any]:
    from avatarforcing_client import AvatarForcingClient, pb, read_wav


    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(redis_bin).exists():
        raise SystemExit("redis-server is not installed (scripts/bootstrap.sh installs the Debian package)")
    samples, rate = read_wav(assets_dir() / "speech_16k.wav")
    image = (assets_dir() / "reference_face.png").read_bytes()
    pcm = samples.astype("<i2").tobytes()
    chunk = rate // 50 * 2  # 20 ms
    work = Path(tempfile.mkdtemp(prefix="af-failover-"))
    per_replica, threads = 4, a.threads or 1
    cluster = _Cluster(redis_bin, work, per_replica, threads)
    tracked: list[_Tracked] = []
    tasks: list[asyncio.Task[None]] = []
    latencies: list[float] = []
    outcomes: list[dict[str, Any]] = []
    try:
        await cluster.start_redis()
        for _ in range(a.replicas):
            cluster.spawn()
        await asyncio.gather(*(cluster.serving(r) for r in cluster.replicas))
        client = AvatarForcingClient([r.address for r in cluster.replicas], resume_timeout=a.resume_timeout)

        async def speak(t: _Tracked) -> None:
            s = t.session
            try:
                while not t.done:
                    for i in range(0, len(pcm), chunk):
                        if t.done:
                            return
                        await s.send_audio(pcm[i:i + chunk])
                        await asyncio.sleep(0.02)
            except Exception as e:
                t.error = t.error or f"send: {type(e).__name__}: {e}"

        async def listen(t: _Tracked) -> None:
            s = t.session
            try:
                async for ev in s.events():
                    if isinstance(ev, pb.VideoFrame):
                        t.frames += 1
                        if s.generation != t.last_gen:
                            t.last_gen = s.generation
                            t.resumed_at.append(time.monotonic())
                    elif isinstance(ev, pb.End):
                        t.error = t.error or f"ended: {pb.EndReason.Name(ev.reason)} {ev.message}"
            except Exception as e:
                code = getattr(e, "code", lambda: None)()
                t.error = t.error or f"{getattr(code, 'name', type(e).__name__)}: {e}"

        for _ in range(a.sessions):
            s = client.session(image=image, pacing=pb.PACING_REALTIME, video_encoding=pb.VIDEO_ENCODING_JPEG)
            await s.start()
            t = _Tracked(s)
            tracked.append(t)
            tasks += [asyncio.create_task(speak(t)), asyncio.create_task(listen(t))]
        await asyncio.sleep(3.0)  # steady state
        c0, t0 = _commandstats(cluster.redis_port), time.monotonic()
        await asyncio.sleep(a.steady_s)
        c1, t1 = _commandstats(cluster.redis_port), time.monotonic()
        span, n_s = t1 - t0, len(tracked)
        evals = c1.get("evalsha", 0) - c0.get("evalsha", 0)
        total = sum(c1.values()) - sum(c0.values()) - (c1.get("info", 0) - c0.get("info", 0))
        redis_ops = {"sessions": n_s, "replicas": a.replicas, "seconds": round(span, 2),
                     "round_trips_per_session_per_s": round(evals / span / n_s, 3),
                     "commands_per_session_per_s": round(total / span / n_s, 3),
                     "note": "round trips: EVALSHA calls (heartbeats, one per replica per heartbeat_s); commands: "
                             "every command Redis ran, those inside the scripts included"}
        print(f"steady state: {redis_ops['round_trips_per_session_per_s']} Redis round trips and "
              f"{redis_ops['commands_per_session_per_s']} commands per session per second")
        for k in range(a.kills):
            live = [t for t in tracked if not t.error]
            if not live:
                break
            victim_addr = live[k % len(live)].session.address
            victim = next(r for r in cluster.replicas if r.address == victim_addr and r.proc.poll() is None)
            affected = [t for t in live if t.session.address == victim_addr]
            gens = {id(t): t.session.generation for t in affected}
            n_resumed = {id(t): len(t.resumed_at) for t in affected}
            t_kill = time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            replacement = cluster.spawn()  # starts while the sessions resume
            # The client's placement targets stand in for a load balancer's address: the live replicas.
            client.targets = tuple(r.address for r in cluster.replicas if r.proc.poll() is None
                                   and r is not replacement)
            deadline = t_kill + a.resume_timeout + 2
            while time.monotonic() < deadline and any(
                    len(t.resumed_at) == n_resumed[id(t)] and not t.error for t in affected):
                await asyncio.sleep(0.01)
            for t in affected:
                if len(t.resumed_at) > n_resumed[id(t)]:
                    took = t.resumed_at[n_resumed[id(t)]] - t_kill
                    latencies.append(took)
                    outcomes.append({"kill": k, "outcome": "resumed", "seconds": round(took, 3),
                                     "generation": t.session.generation, "gen_before": gens[id(t)]})
                elif t.error:
                    outcomes.append({"kill": k, "outcome": "ended_with_status", "status": t.error})
                else:
                    outcomes.append({"kill": k, "outcome": "lost"})
            print(f"kill {k + 1}/{a.kills}: {victim.node_id} with {len(affected)} session(s): "
                  + ", ".join(f"{o['outcome']} {o.get('seconds', o.get('status', ''))}"
                              for o in outcomes[-len(affected):]))
            await cluster.serving(replacement)
        for t in tracked:
            t.done = True
        for t in tracked:
            await t.session.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    lat = np.asarray(latencies, dtype=float)
    res = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {"replicas": a.replicas, "sessions": a.sessions, "kills": a.kills, "max_sessions": per_replica,
                   "threads": threads, "pacing": "REALTIME", "encoding": "JPEG", "model": "tiny (CPU)",
                   "heartbeat_s": 0.5, "node_ttl_s": 2.0},
        "kill_to_first_resumed_frame_s": {
            "n": int(lat.size), "p50": float(np.percentile(lat, 50)) if lat.size else None,
            "p99": float(np.percentile(lat, 99)) if lat.size else None,
            "max": float(lat.max()) if lat.size else None, "target_p99": 2.0},
        "sessions_affected": len(outcomes),
        "sessions_resumed": sum(o["outcome"] == "resumed" for o in outcomes),
        "sessions_ended_with_status": sum(o["outcome"] == "ended_with_status" for o in outcomes),
        "sessions_lost": sum(o["outcome"] == "lost" for o in outcomes),
        "redis_ops_steady_state": redis_ops,
        "outcomes": outcomes,
    }
    return res


def _print(res: dict[str, Any]) -> None:
    from avatarforcing.report import print_table as _table

    k = res["kill_to_first_resumed_frame_s"]

    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    _table("Failover (kill -9 of the owning replica)", ["kills", "affected", "resumed", "ended w/ status", "lost",
                                                       "p50 s", "p99 s", "max s"],
           [[res["config"]["kills"], res["sessions_affected"], res["sessions_resumed"],
             res["sessions_ended_with_status"], res["sessions_lost"], f(k["p50"]), f(k["p99"]), f(k["max"])]])
    r = res["redis_ops_steady_state"]
    _table("Redis at steady state", ["replicas", "sessions", "round trips/session/s", "commands/session/s"],
           [[r["replicas"], r["sessions"], r["round_trips_per_session_per_s"], r["commands_per_session_per_s"]]])


def run_failover_bench(a: argparse.Namespace) -> int:
    res = asyncio.run(run_failover(a))
    _print(res)
    out = a.out or Path("bench/results") / f"failover-cpu-tiny-{res['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")
    ok = res["sessions_lost"] == 0
    return 0 if ok else 1
