"""`avatarforcing bench --chaos`: random faults under live sessions for a long time, and a ledger of
every session (issue 13: "never lose or double a session").

What it runs. A real ``redis-server`` (the Debian package) on a free loopback port, no persistence,
and ``--replicas`` ``avatarforcing serve`` processes routed through it (the tiny model on the CPU,
one torch thread each, JSON logs on stderr to one file per replica process). Routing TTLs are short
for the run (``resume_ttl_s`` and ``reservation_ttl_s`` = ``--resume-ttl``, 10 s) so that the final
leak check does not wait long. Auth is on with two tenants: ``alpha`` holds one session slot more
than its limit (its per-token limit), so its tenant limit is hit all the time, and ``beta`` is held
to ``AVATARFORCING_TENANT_MAX_SESSIONS``; an ``admin`` token reads each replica's totals.

``--sessions`` client slots each run one REALTIME JPEG session after another with the Python SDK
(``async with client.session(...)``, the bundled speech streamed in real time in a loop): a session
runs for a random ``--session-s`` (10-60 s), then sends EndOfAudio, reads on until that audio has
been rendered and leaves the ``async with`` block; a new one starts in its place. A session refused
at start (the tenant limit, every replica busy, Redis down with no local slot) is counted as refused,
not lost, and the slot tries again a moment later.

Every random ``--fault-every`` seconds (10-30 s) one fault from ``--faults`` is injected (in random
order, or ``--fault-order cycle`` to go through the list in turn so that each kind runs):

- ``replica-kill``: SIGKILL of the replica owning a random live session (only while another replica
  serves), then a replacement replica is started;
- ``replica-stop``: SIGSTOP of such a replica for ``--replica-stop-s`` (5 s), then SIGCONT;
- ``redis-kill``: SIGKILL of redis-server, restarted empty on the same port ``--redis-down-s`` later
  (2-5 s);
- ``redis-pause``: SIGSTOP of redis-server for ``--redis-down-s``, then SIGCONT;
- ``redis-flush``: FLUSHALL;
- ``client-cancel``: a client gives up on a random live session: the task running it is cancelled
  mid-stream, or it sends EndOfAudio and closes at once (chosen at random);
- ``conn-loss``: the connection only: the SDK session's underlying gRPC call is cancelled
  (``session._call.cancel()``), so the SDK resumes, normally on the same owner.

What it measures, printed as tables and written as JSON (with the machine: CPU count, platform,
load average):

- sessions started, completed (closed by the client as planned), cancelled (the client-cancel
  fault), refused at start (by status), and LOST: the SDK raised an error (or the server ended the
  session) other than through a deliberate cancel, or no frame arrived for ``--stall-s`` (10 s) while
  the session was not being closed;
- sessions DOUBLED: live on two replica processes at once. From the replicas' logs: each ``session
  started`` line (``session_id``, ISO ``timestamp``) opens a stream, each ``session closed`` line
  closes it with ``first_frame_ts`` and ``last_frame_ts`` (unix seconds, null without frames); a
  session is doubled when the [first_frame_ts, last_frame_ts] intervals of two different replica
  processes overlap. A replica killed with -9 writes no ``session closed``: its open streams run from
  ``session started`` to the kill. Lines without the two frame fields fall back to the [started,
  closed] timestamps, and the report says how many did;
- routing records LEAKED: once every client has finished, it waits resume_ttl + max(session_ttl,
  reservation_ttl) + 3 s and counts what is still in Redis: ``af:session:*`` keys, and members of
  ``af:tenant:*`` and ``af:pending:*`` whose score (expiry, ms) is still in the future; it also asks
  each replica (admin token) how many sessions it still holds;
- the largest number of one tenant's sessions live at once, against its limit: as the clients saw
  it, as Redis counted it (sampled every 0.5 s) and as the replicas' logs show it;
- faults by kind, and per kind: the sessions affected, the time from the fault to the first frame of
  the resumed stream (p50/p99, sessions whose stream moved), and the longest frame gap around the
  fault (p50/p99, every affected session); and the fault timeline.

The run stops by itself after ``--duration`` seconds (the faults and the sessions stop, then the leak
check), and every process it started is stopped in a ``finally`` (Ctrl-C or SIGTERM included; the
children also die with it if it is killed). Exit status 0 when lost == doubled == leaked == 0, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import assets_dir, free_port, port_up

FAULT_KINDS: tuple[str, ...] = ("replica-kill", "replica-stop", "redis-kill", "redis-pause", "redis-flush",
                                "client-cancel", "conn-loss")
TENANTS: tuple[str, ...] = ("alpha", "beta")
#: Kinds whose affected sessions are expected to move to a new stream (resume latency is measured for them).
_MOVING = ("replica-kill", "conn-loss")
_LEAK_MARGIN_S = 3.0
_SESSION_TTL_S = 10.0  # the server's session_ttl_s (not changed for the run)
_CHUNK_S = 0.02

# Children get SIGKILL when this process dies, even by SIGKILL (Linux: PR_SET_PDEATHSIG survives execve). A
# tiny launcher sets it and execs the real program; argv[1] is our pid (it exits if we are already gone).
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 9)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _popen(argv: Sequence[str], *, env: dict[str, str] | None = None, stderr: Any = subprocess.DEVNULL,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    cmd = list(argv)
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd]
    # Own session: a Ctrl-C in the terminal reaches only this process, which then stops its children in order.
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=stderr, start_new_session=True)


def parse_range(text: str, name: str) -> tuple[float, float]:
    """``"10:30"`` -> (10.0, 30.0); ``"5"`` -> (5.0, 5.0)."""
    try:
        parts = [float(x) for x in str(text).split(":")]
    except ValueError:
        raise ValueError(f"{name} must be SECONDS or MIN:MAX seconds, not {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0 <= parts[0] <= parts[1]:
        raise ValueError(f"{name} must be SECONDS or MIN:MAX seconds with 0 <= MIN <= MAX, not {text!r}")
    return parts[0], parts[1]


def parse_faults(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in str(text).split(",") if k.strip())
    if text.strip() == "all":
        return FAULT_KINDS
    bad = [k for k in kinds if k not in FAULT_KINDS]
    if bad or not kinds:
        raise ValueError(f"--faults: unknown fault kind(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(FAULT_KINDS)} (or all)")
    return kinds


def _parse_ts(v: Any) -> float | None:
    """An ISO timestamp (structlog's, UTC) or unix seconds -> unix seconds; None when absent or malformed."""
    if v is None:
        return None
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, str):
        try:
            return dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return None
    return None


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(v[lo] + (v[hi] - v[lo]) * (k - lo))


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _round(_pct(values, 50)), "p99": _round(_pct(values, 99)),
            "max": _round(max(values) if values else None)}


def _round(v: float | None, nd: int = 3) -> float | None:
    return None if v is None else round(float(v), nd)


def _describe(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if callable(code):
        try:
            c = code()
            details = e.details() if hasattr(e, "details") else str(e)  # type: ignore[attr-defined]
            return f"{getattr(c, 'name', c)}: {details}"
        except Exception:
            pass
    # Not a status: a bug somewhere. Say where (the innermost frames), so that the report can be acted on.
    import traceback

    frames = traceback.extract_tb(e.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(e).__name__}: {e}" + (f" (at {where})" if where else "")


# --------------------------------------------------------------------------------------------------------------
# Replica logs: streams, doubled sessions, tenant concurrency (a pure function of the files: tested on its own)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ReplicaLog:
    """One replica process: its log file, and when it was killed with -9 (unix seconds) if it was."""

    process: str
    path: Path
    killed_at: float | None = None


@dataclass
class _Stream:
    process: str
    session_id: str
    utterance_id: str
    started: float | None
    closed: float | None = None
    first_frame: float | None = None
    last_frame: float | None = None
    last_seen: float | None = None  # the last line of this process naming the session while the stream was open
    how: str = "open"  # frames | fallback | killed | unclosed | open

    def interval(self) -> tuple[float, float] | None:
        """When this stream was sending frames (see the module docstring for the fallbacks)."""
        if self.how == "frames":
            if self.first_frame is None or self.last_frame is None:
                return None
            return self.first_frame, self.last_frame
        if self.started is None or self.closed is None:
            return None
        return self.started, self.closed

    def lifetime(self) -> tuple[float, float] | None:
        s = self.started if self.started is not None else self.first_frame
        e = self.closed if self.closed is not None else self.last_frame
        return (s, e) if s is not None and e is not None and e >= s else None


def _tenant_of(utterance_id: str) -> str | None:
    parts = (utterance_id or "").split("-")
    return parts[1] if len(parts) >= 3 and parts[0] == "chaos" else None


def analyze_replica_logs(logs: Iterable[ReplicaLog]) -> dict[str, Any]:
    """Streams per replica process from the JSON log lines, then the sessions live on two processes at once.

    Tolerant: lines that are not JSON are skipped (and counted); a ``session closed`` without
    ``first_frame_ts``/``last_frame_ts`` falls back to the stream's started/closed timestamps.
    """
    streams: list[_Stream] = []
    notes: list[str] = []
    skipped = 0
    server_errors: collections.Counter[str] = collections.Counter()
    error_samples: list[dict[str, Any]] = []
    for lg in logs:
        open_: dict[str, collections.deque[_Stream]] = collections.defaultdict(collections.deque)
        last_ts: float | None = None
        try:
            lines = lg.path.read_text(errors="replace").splitlines()
        except OSError as e:
            notes.append(f"{lg.process}: cannot read {lg.path}: {e}")
            continue
        for line in lines:
            line = line.strip()
            if not line.startswith("{"):
                skipped += bool(line)
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(rec, dict):
                skipped += 1
                continue
            ts = _parse_ts(rec.get("timestamp"))
            last_ts = ts if ts is not None else last_ts
            event = str(rec.get("event", ""))
            level = str(rec.get("level", ""))
            if level in ("error", "critical") or "exception" in rec:
                server_errors[f"{level or 'exception'}: {event}"] += 1
                if len(error_samples) < 20:
                    error_samples.append({"process": lg.process, **{k: rec[k] for k in rec if k != "exception"},
                                          "exception": str(rec.get("exception", ""))[-600:] or None})
            sid = rec.get("session_id")
            if not isinstance(sid, str) or not sid:
                continue
            if open_[sid] and ts is not None:
                open_[sid][-1].last_seen = ts
            if event == "session started":
                s = _Stream(lg.process, sid, str(rec.get("utterance_id") or ""), ts)
                streams.append(s)
                open_[sid].append(s)
            elif event == "session closed":
                if open_[sid]:
                    s = open_[sid].popleft()
                else:  # a close without its start (the start line was lost): the close alone
                    s = _Stream(lg.process, sid, str(rec.get("utterance_id") or ""), None)
                    streams.append(s)
                s.closed = ts
                if "first_frame_ts" in rec and "last_frame_ts" in rec:
                    s.first_frame, s.last_frame = _parse_ts(rec["first_frame_ts"]), _parse_ts(rec["last_frame_ts"])
                    s.how = "frames"
                else:
                    s.how = "fallback"
        for q in open_.values():
            for s in q:
                if lg.killed_at is not None:
                    s.closed, s.how = lg.killed_at, "killed"
                else:  # up to the last line about it (a replica stopping may not log the close)
                    s.closed, s.how = s.last_seen or s.started or last_ts, "unclosed"
    by_sid: dict[str, list[_Stream]] = collections.defaultdict(list)
    for s in streams:
        by_sid[s.session_id].append(s)
    doubled: list[dict[str, Any]] = []
    same_process: list[dict[str, Any]] = []
    for sid, ss in by_sid.items():
        worst: dict[str, Any] | None = None
        for i in range(len(ss)):
            for j in range(i + 1, len(ss)):
                a, b = ss[i].interval(), ss[j].interval()
                if a is None or b is None:
                    continue
                ov = min(a[1], b[1]) - max(a[0], b[0])
                if ov <= 0:
                    continue
                pair = {"session_id": sid, "overlap_s": round(ov, 3),
                        "streams": [{"process": x.process, "from": _iso(x.interval()[0]),  # type: ignore[index]
                                     "to": _iso(x.interval()[1]), "interval_from": x.how}  # type: ignore[index]
                                    for x in (ss[i], ss[j])]}
                if ss[i].process == ss[j].process:
                    same_process.append(pair)
                elif worst is None or ov > worst["overlap_s"]:
                    worst = pair
        if worst is not None:
            worst["suspected_only"] = any(x["interval_from"] in ("fallback", "unclosed") for x in worst["streams"])
            doubled.append(worst)
    how = collections.Counter(s.how for s in streams)
    if how["fallback"]:
        notes.append(f"{how['fallback']} 'session closed' line(s) without first_frame_ts/last_frame_ts: their "
                     "streams count from 'session started' to 'session closed' (an overlap found with them is "
                     "marked suspected_only)")
    if how["unclosed"]:
        notes.append(f"{how['unclosed']} stream(s) never logged 'session closed' though their replica was not "
                     "killed by this run: they count up to the last line about the session on that replica (an "
                     "overlap found with them is marked suspected_only)")
    if skipped:
        notes.append(f"{skipped} log line(s) that are not JSON were skipped")
    # Largest number of one tenant's sessions streaming at once on the replicas (the same intervals as for doubled
    # sessions, merged per session: a stream left open on a frozen replica after its client moved on sends nothing).
    per_tenant: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    for ss in by_sid.values():
        tenant = next((t for t in (_tenant_of(x.utterance_id) for x in ss) if t), None)
        spans = sorted(x for x in (s.interval() for s in ss) if x is not None)
        merged: list[list[float]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            per_tenant[tenant or "?"] += [(lo, 1), (hi, -1)]
    tenant_max: dict[str, int] = {}
    for tenant, evs in per_tenant.items():
        cur = best = 0
        for _, d in sorted(evs, key=lambda e: (e[0], e[1])):  # ends before starts at the same instant
            cur += d
            best = max(best, cur)
        tenant_max[tenant] = best
    return {
        "streams": len(streams),
        "sessions_seen": len(by_sid),
        "intervals_from": dict(how),
        "doubled": doubled,
        "same_process_overlaps": same_process,
        "tenant_max_live": tenant_max,
        "server_errors": dict(server_errors),
        "server_error_samples": error_samples,
        "notes": notes,
    }


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------------------------
# The cluster: redis-server and replicas as subprocesses
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _Replica:
    node_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    serving: bool = False
    stopped: bool = False  # SIGSTOPped by a fault right now
    killed_at: float | None = None  # unix seconds of our SIGKILL

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.killed_at is None and self.proc.poll() is None


class _Cluster:
    def __init__(self, redis_bin: str, workdir: Path, logdir: Path, env: dict[str, str], max_sessions: int,
                 threads: int) -> None:
        self.redis_bin = redis_bin
        self.workdir = workdir
        self.logdir = logdir
        self.env = env
        self.max_sessions = max_sessions
        self.threads = threads
        self.redis_port = free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_stopped = False
        self.replicas: list[_Replica] = []
        self.n = 0

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    async def start_redis(self) -> None:
        self.redis = _popen([self.redis_bin, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
                             "--loglevel", "warning"])
        self.redis_stopped = False
        await port_up(self.redis_port, 20)

    def kill_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(signal.SIGKILL)
            self.redis.wait(10)

    def signal_redis(self, sig: signal.Signals) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(sig)
            self.redis_stopped = sig == signal.SIGSTOP

    def spawn(self) -> _Replica:
        self.n += 1
        node_id, port = f"chaos-{self.n}", free_port()
        env = dict(self.env, AVATARFORCING_REDIS_URL=self.redis_url, AVATARFORCING_NODE_ID=node_id)
        log = self.logdir / f"{node_id}.log"
        with log.open("wb") as f:
            proc = _popen(
                [sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--host", "127.0.0.1", "--port",
                 str(port), "--metrics-port", "-1", "--max-sessions", str(self.max_sessions), "--threads",
                 str(self.threads), "--preset", "tiny", "--device", "cpu", "--grace", "1"],
                env=env, stderr=f)
        r = _Replica(node_id, port, proc, log)
        self.replicas.append(r)
        return r

    async def wait_serving(self, r: _Replica, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if r.proc.poll() is not None:
                tail = r.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"replica {r.node_id} exited ({r.proc.returncode}):\n{tail}")
            try:
                async with grpc.aio.insecure_channel(r.address) as ch:
                    resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    r.serving = True
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
        raise RuntimeError(f"replica {r.node_id} not serving after {timeout:g} s:\n"
                           f"{r.log.read_text(errors='replace')[-3000:]}")

    def serving_replicas(self) -> list[_Replica]:
        return [r for r in self.replicas if r.alive and r.serving and not r.stopped]

    def stop(self) -> None:
        """Every child stopped: SIGCONT what a fault paused, SIGTERM (replicas log their open sessions'
        'session closed'), SIGKILL what is still there after 20 s. Safe to call twice; a second Ctrl-C here
        only makes it kill at once."""
        procs = [r for r in self.replicas if r.proc.poll() is None]
        try:
            for r in procs:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(signal.SIGCONT)
                    r.proc.send_signal(signal.SIGTERM)
                r.stopped = False
            t_end = time.monotonic() + 20
            for r in procs:
                try:
                    r.proc.wait(max(t_end - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.killed_at = time.time()
                    r.proc.wait(5)
        except BaseException:
            for r in procs:
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.killed_at = r.killed_at or time.time()
            raise
        finally:
            if self.redis is not None and self.redis.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.redis.send_signal(signal.SIGCONT)
                self.redis.terminate()
                try:
                    self.redis.wait(10)
                except subprocess.TimeoutExpired:
                    self.redis.kill()
                    self.redis.wait(5)


# --------------------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ChaosConfig:
    duration_s: float = 1800.0
    replicas: int = 3
    sessions: int = 6
    fault_every_s: tuple[float, float] = (10.0, 30.0)
    faults: tuple[str, ...] = FAULT_KINDS
    fault_order: str = "random"  # random | cycle
    seed: int = 0
    session_s: tuple[float, float] = (10.0, 60.0)
    replica_stop_s: float = 5.0
    redis_down_s: tuple[float, float] = (2.0, 5.0)
    stall_s: float = 10.0
    resume_timeout_s: float = 15.0
    resume_ttl_s: float = 10.0
    replica_slots: int = 0  # 0: --sessions (one replica can hold every session)
    threads: int = 1
    logs: Path | None = None
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.sessions < 1 or self.duration_s <= 0:
            raise ValueError("--replicas and --sessions must be >= 1 and --duration > 0")
        if self.fault_order not in ("random", "cycle"):
            raise ValueError("--fault-order must be random or cycle")
        if self.fault_every_s[1] <= 0:
            raise ValueError("--fault-every must be > 0")
        if self.session_s[1] <= 0 or self.stall_s <= 0 or self.resume_ttl_s <= 0:
            raise ValueError("--session-s, --stall-s and --resume-ttl must be > 0")

    @property
    def slots(self) -> int:
        return self.replica_slots or self.sessions

    def tenant_plan(self) -> tuple[list[str], dict[str, int]]:
        """Which tenant each client slot belongs to, and each tenant's limit: alpha holds one slot more
        than its limit (when it has two or more), beta exactly its limit."""
        n_alpha = (self.sessions + 1) // 2
        slots = ["alpha"] * n_alpha + ["beta"] * (self.sessions - n_alpha)
        return slots, {"alpha": max(1, n_alpha - 1), "beta": max(1, self.sessions - n_alpha)}


@dataclass
class _Run:
    """One client session, from start() to the end of its async-with block."""

    slot: int
    tenant: str
    n: int
    planned_s: float
    session: Any = None
    session_id: str = ""
    t_start: float = 0.0  # monotonic
    wall_start: float = 0.0
    t_end: float | None = None
    frame_t: list[float] = field(default_factory=list)  # monotonic arrival of each frame
    frame_gen: list[int] = field(default_factory=list)  # the SDK's generation when it arrived
    last_frame: float = 0.0
    outcome: str = ""  # completed | cancelled | lost
    error: str = ""
    closing: bool = False  # the client is ending it on purpose: errors and End no longer count
    abrupt: bool = False
    stop_now: asyncio.Event = field(default_factory=asyncio.Event)
    quiet: bool = False  # the sender stops (never by cancelling it: see _stop_speaking)
    addresses: list[str] = field(default_factory=list)
    send_cancelled: int = 0  # send_audio raised CancelledError into a task nobody cancelled
    send_closed: int = 0  # send_audio raised SessionClosedError on a session nobody closed
    task: asyncio.Task[None] | None = None
    speak: asyncio.Task[None] | None = None
    reported: bool = False  # its loss was printed

    @property
    def live(self) -> bool:
        return self.t_end is None and not self.outcome and not self.closing

    def fail(self, why: str) -> None:
        if self.outcome or self.closing:
            return
        self.outcome, self.error = "lost", why
        self.stop_now.set()


@dataclass
class _Fault:
    kind: str
    t: float  # monotonic at injection
    wall: float
    target: str = ""
    detail: str = ""
    t_end: float | None = None  # monotonic when the fault was over (SIGCONT, Redis back, ...)
    affected: list[tuple[_Run, int]] = field(default_factory=list)  # (run, its SDK generation at the fault)
    skipped: str = ""


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.frng = random.Random(cfg.seed)  # the fault schedule and targets
        self.srng = random.Random(cfg.seed + 1)  # session lengths
        self.runs: list[_Run] = []
        self.faults: list[_Fault] = []
        self.refused: collections.Counter[str] = collections.Counter()
        self.stopping = asyncio.Event()
        self.clients: dict[str, Any] = {}
        self.tokens = {t: secrets.token_urlsafe(24) for t in (*TENANTS, "admin")}
        self.slot_tenants, self.limits = cfg.tenant_plan()
        self.client_max: dict[str, int] = dict.fromkeys(TENANTS, 0)
        self.redis_max: dict[str, int] = dict.fromkeys(TENANTS, 0)
        self.redis_samples = 0
        self.redis_misses = 0
        self.t0 = 0.0
        self.wall0 = 0.0
        self._bg: set[asyncio.Task[Any]] = set()
        self.cluster: _Cluster | None = None
        self.notes: list[str] = []
        self.attempts = 0
        self.refusals: list[dict[str, Any]] = []  # sessions refused at start: when, whose, why
        self.loop_lag_max = 0.0
        self.loop_lags: list[tuple[float, float]] = []  # (s since the start, seconds late) over 0.25 s
        self.load_start = os.getloadavg()
        self.chunks: list[bytes] = []
        self.image = b""

    # -- output ------------------------------------------------------------------------------------------------

    def say(self, msg: str, at: float | None = None) -> None:
        """A progress line, stamped with the seconds since the chaos began (or ``at``, a monotonic time)."""
        t = (time.monotonic() if at is None else at) - self.t0
        print(f"[{t:7.1f} s] {msg}" if self.t0 else msg, flush=True)

    # -- clients -----------------------------------------------------------------------------------------------

    def _update_targets(self) -> None:
        assert self.cluster is not None
        addrs = tuple(r.address for r in self.cluster.replicas if r.alive and r.serving)
        if addrs:
            for c in self.clients.values():
                c.targets = addrs

    async def _slot(self, slot: int) -> None:
        tenant = self.slot_tenants[slot]
        while not self.stopping.is_set():
            run = _Run(slot, tenant, 0, self.srng.uniform(*self.cfg.session_s))
            run.task = asyncio.create_task(self._session(run), name=f"chaos-session-{slot}")
            await asyncio.wait([run.task])
            if run.task.cancelled():
                run.outcome = run.outcome or "cancelled"
            elif run.task.exception() is not None:
                exc = run.task.exception()
                assert exc is not None
                if run.session_id:
                    run.outcome = run.outcome or "lost"
                    run.error = run.error or f"harness: {_describe(exc)}"
                else:
                    self.refused[f"harness error: {type(exc).__name__}"] += 1
            if run.t_start and run.t_end is None:
                run.t_end = time.monotonic()
            if not run.session_id:  # refused at start: try again a moment later
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), self.srng.uniform(0.5, 2.0))

    async def _session(self, run: _Run) -> None:
        import grpc

        from avatarforcing_client import ProtocolError, pb

        client = self.clients[run.tenant]
        self.attempts += 1
        run.n = self.attempts
        s = client.session(image=self.image, pacing=pb.PACING_REALTIME, video_encoding=pb.VIDEO_ENCODING_JPEG,
                           utterance_id=f"chaos-{run.tenant}-{run.n}")
        started = False
        speak: asyncio.Task[None] | None = None
        listen: asyncio.Task[None] | None = None
        try:
            async with s:  # the README's flow: start() on enter, close() on exit
                started = True
                run.session, run.session_id = s, s.session_id
                run.t_start = run.last_frame = time.monotonic()
                run.wall_start = time.time()
                run.addresses.append(s.address)
                self.runs.append(run)
                live = sum(1 for r in self.runs if r.tenant == run.tenant and r.t_end is None)
                self.client_max[run.tenant] = max(self.client_max[run.tenant], live)
                if live > self.limits[run.tenant]:
                    self.say(f"TENANT LIMIT: {run.tenant} has {live} live sessions, its limit is "
                             f"{self.limits[run.tenant]}")
                run.speak = speak = asyncio.create_task(self._speak(run))
                listen = asyncio.create_task(self._listen(run))
                await self._until_end(run, listen)
                await _stop_speaking(run, speak)  # no audio after EndOfAudio
                if not run.outcome:  # as planned (or the run is over): EndOfAudio, the tail rendered, exit
                    await self._finish(run, listen)
                elif run.abrupt:  # the client-cancel fault: EndOfAudio, then close at once
                    run.closing = True
                    with contextlib.suppress(Exception):
                        await s.end_of_audio()
                run.closing = True
        except (grpc.aio.AioRpcError, ProtocolError) as e:
            if started:
                run.fail(f"close: {_describe(e)}")
            else:
                code = e.code().name if isinstance(e, grpc.aio.AioRpcError) else "PROTOCOL"
                detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
                key = "tenant limit" if code == "RESOURCE_EXHAUSTED" and "tenant" in (detail or "") else code
                self.refused[key] += 1
                if len(self.refusals) < 1000:
                    self.refusals.append({"t_s": round(time.monotonic() - self.t0, 2), "tenant": run.tenant,
                                          "code": code, "detail": (detail or "")[:300]})
        finally:
            run.closing = True
            run.t_end = run.t_end or (time.monotonic() if started else None)
            for t in (speak, listen):
                if t is not None and not t.done():
                    t.cancel()
            for t in (speak, listen):
                if t is not None:
                    with contextlib.suppress(BaseException):
                        await t

    async def _until_end(self, run: _Run, listen: asyncio.Task[None]) -> None:
        waits = [asyncio.create_task(run.stop_now.wait()), asyncio.create_task(self.stopping.wait())]
        try:
            await asyncio.wait([*waits, listen], timeout=run.planned_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _finish(self, run: _Run, listen: asyncio.Task[None]) -> None:
        s = run.session
        try:
            await s.end_of_audio()
        except Exception as e:
            run.fail(f"end_of_audio: {_describe(e)}")
            return
        tail = min(max(s.started.latency_ms / 1000.0, 0.5) + 0.5, 3.0)
        await asyncio.wait([listen], timeout=tail)
        if not run.outcome:
            run.outcome = "completed"
        run.closing = True

    async def _speak(self, run: _Run) -> None:
        from avatarforcing_client import SessionClosedError

        s = run.session
        chunks, rate = self.chunks, 16000
        t0, sent, i = time.monotonic(), 0, self.srng.randrange(len(self.chunks))
        while not run.quiet:
            delay = t0 + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                if run.quiet:
                    return
            elif delay < -2.0:  # blocked for a while (a resume): a microphone would not have recorded meanwhile
                t0 = time.monotonic() - sent / rate
            data = chunks[i]
            i = (i + 1) % len(chunks)
            try:
                await s.send_audio(data)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or run.closing:
                    raise
                # The SDK raises CancelledError from a write on a call cancelled under it (conn-loss) before
                # events() has resumed the session; the chunk is in its resume buffer: carry on.
                run.send_cancelled += 1
                await asyncio.sleep(0.05)
            except SessionClosedError:
                if run.closing or s.closed:
                    return
                # The same race seen as "the session's stream has finished (CANCELLED)": the session is not
                # closed and events() resumes it (or reports why not): carry on.
                run.send_closed += 1
                await asyncio.sleep(0.05)
            except Exception as e:
                if not run.closing:
                    run.fail(f"send_audio: {_describe(e)}")
                return
            sent += len(data) // 2

    async def _listen(self, run: _Run) -> None:
        from avatarforcing_client import pb

        s = run.session
        try:
            async for ev in s.events():
                if isinstance(ev, pb.VideoFrame):
                    t = time.monotonic()
                    run.frame_t.append(t)
                    run.frame_gen.append(s.generation)
                    run.last_frame = t
                    if s.address and s.address != run.addresses[-1]:
                        run.addresses.append(s.address)
                elif isinstance(ev, pb.End):
                    if not run.closing:
                        run.fail(f"ended by the server: {pb.EndReason.Name(ev.reason)} {ev.message}".strip())
                    return
            if not run.closing:
                run.fail("the stream ended without End")
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            if not run.closing:
                run.fail("events() raised CancelledError")
        except Exception as e:
            if not run.closing:
                run.fail(f"events: {_describe(e)}")

    # -- monitoring --------------------------------------------------------------------------------------------

    async def _monitor(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        assert self.cluster is not None
        r = Redis(host="127.0.0.1", port=self.cluster.redis_port, socket_timeout=0.4, socket_connect_timeout=0.4,
                  retry=Retry(NoBackoff(), 0), decode_responses=True)
        next_sample = 0.0
        try:
            while True:
                now = time.monotonic()
                for run in self.runs:
                    if run.live and run.session is not None and now - run.last_frame > self.cfg.stall_s:
                        run.fail(f"no frame for {now - run.last_frame:.1f} s (on {run.session.address})")
                    if run.outcome == "lost" and not run.reported:
                        run.reported = True
                        self.say(f"LOST {run.tenant} session {run.session_id}: {run.error}")
                if now >= next_sample and not (self.cluster.redis_stopped or self.cluster.redis is None):
                    next_sample = now + 0.5
                    try:
                        ms = int(time.time() * 1000)
                        for t in TENANTS:
                            n = int(await r.zcount(f"af:tenant:{t}", ms, "+inf"))
                            self.redis_max[t] = max(self.redis_max[t], n)
                        self.redis_samples += 1
                    except Exception:
                        self.redis_misses += 1
                # This process's own event loop: a late wake-up means the clients were late too (a busy CPU),
                # which tells a client-side stall from a server-side one.
                t_sleep = time.monotonic()
                await asyncio.sleep(0.25)
                lag = time.monotonic() - t_sleep - 0.25
                self.loop_lag_max = max(self.loop_lag_max, lag)
                if lag > 0.25:
                    self.loop_lags.append((round(t_sleep - self.t0, 2), round(lag, 3)))
        finally:
            with contextlib.suppress(Exception):
                await r.aclose()

    # -- faults ------------------------------------------------------------------------------------------------

    async def _faults(self) -> None:
        i = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.frng.uniform(*self.cfg.fault_every_s))
            if self.stopping.is_set():
                return
            kinds = self.cfg.faults
            kind = kinds[i % len(kinds)] if self.cfg.fault_order == "cycle" else self.frng.choice(kinds)
            i += 1
            f = await self._inject(kind)
            self.faults.append(f)
            what = f"{f.kind}{' ' + f.target if f.target else ''}"
            if f.skipped:
                self.say(f"fault {what}: skipped ({f.skipped})", f.t)
            else:
                self.say(f"fault {what}: {len(f.affected)} session(s) affected{'; ' + f.detail if f.detail else ''}",
                         f.t)

    def _live_runs(self) -> list[_Run]:
        return [r for r in self.runs if r.live and r.session is not None]

    def _pick_replica(self, candidates: list[_Replica]) -> _Replica:
        """The owner of a random live session when one is among the candidates, else a random candidate."""
        owners = [r.session.address for r in self._live_runs()]
        mine = [c for c in candidates if c.address in owners]
        return self.frng.choice(mine or candidates)

    def _affect(self, f: _Fault, runs: Iterable[_Run]) -> None:
        f.affected = [(r, int(r.session.generation)) for r in runs]

    async def _inject(self, kind: str) -> _Fault:
        assert self.cluster is not None
        c = self.cluster
        f = _Fault(kind, time.monotonic(), time.time())
        if kind == "replica-kill":
            # Only with another replica serving: otherwise the sessions have nowhere to go (a harness artefact).
            t_wait = time.monotonic() + 120
            while len(c.serving_replicas()) < 2 and time.monotonic() < t_wait and not self.stopping.is_set():
                await asyncio.sleep(0.5)
            cands = c.serving_replicas()
            if len(cands) < 2:
                f.skipped = "fewer than two replicas serving"
                return f
            victim = self._pick_replica(cands)
            f.target = victim.node_id
            self._affect(f, (r for r in self._live_runs() if r.session.address == victim.address))
            f.t, f.wall = time.monotonic(), time.time()
            victim.proc.send_signal(signal.SIGKILL)
            victim.killed_at = time.time()
            await asyncio.to_thread(victim.proc.wait)
            f.t_end = time.monotonic()
            self._update_targets()
            repl = c.spawn()
            f.detail = f"replacement {repl.node_id} starting"
            self._spawn_bg(self._replacement_ready(repl))
        elif kind == "replica-stop":
            cands = c.serving_replicas()
            if not cands:
                f.skipped = "no replica serving"
                return f
            victim = self._pick_replica(cands)
            f.target = victim.node_id
            self._affect(f, (r for r in self._live_runs() if r.session.address == victim.address))
            f.t, f.wall = time.monotonic(), time.time()
            victim.stopped = True
            victim.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(self.cfg.replica_stop_s)
            finally:
                if victim.proc.poll() is None:
                    victim.proc.send_signal(signal.SIGCONT)
                victim.stopped = False
                f.t_end = time.monotonic()
            f.detail = f"stopped {self.cfg.replica_stop_s:g} s"
        elif kind in ("redis-kill", "redis-pause"):
            down = self.frng.uniform(*self.cfg.redis_down_s)
            self._affect(f, self._live_runs())
            f.target = "redis"
            try:
                if kind == "redis-kill":
                    c.kill_redis()
                    await asyncio.sleep(down)
                else:
                    c.signal_redis(signal.SIGSTOP)
                    await asyncio.sleep(down)
            finally:
                if kind == "redis-kill":
                    await c.start_redis()
                else:
                    c.signal_redis(signal.SIGCONT)
                f.t_end = time.monotonic()
            f.detail = f"{'down' if kind == 'redis-kill' else 'paused'} {down:.1f} s"
        elif kind == "redis-flush":
            import redis

            self._affect(f, self._live_runs())
            f.target = "redis"
            cli = redis.Redis(host="127.0.0.1", port=c.redis_port, socket_timeout=5)
            try:
                await asyncio.to_thread(cli.flushall)
            finally:
                cli.close()
            f.t_end = time.monotonic()
        elif kind in ("client-cancel", "conn-loss"):
            t_wait = time.monotonic() + 30
            while time.monotonic() < t_wait and not self.stopping.is_set():
                # A session that has shown frames (not one still opening) and that is not due to end right now.
                picks = [r for r in self._live_runs() if r.frame_t and r.task is not None
                         and time.monotonic() < r.t_start + r.planned_s - 1.0]
                if picks:
                    break
                await asyncio.sleep(0.5)
            else:
                f.skipped = "no live session"
                return f
            run = self.frng.choice(picks)
            f.target = f"{run.tenant}:{run.session_id[:8]}"
            self._affect(f, [run])
            f.t, f.wall = time.monotonic(), time.time()
            if kind == "conn-loss":
                call = run.session._call
                call.cancel()
                f.detail = f"on {run.session.address}"
            else:
                run.outcome, run.closing = "cancelled", True
                if self.frng.random() < 0.5:
                    f.detail = "task cancelled mid-stream"
                    assert run.task is not None
                    run.task.cancel()
                else:
                    f.detail = "EndOfAudio, then closed at once"
                    run.abrupt = True
                    run.stop_now.set()
            f.t_end = time.monotonic()
        else:  # pragma: no cover (parse_faults refuses it)
            raise ValueError(kind)
        return f

    def _spawn_bg(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _replacement_ready(self, r: _Replica) -> None:
        assert self.cluster is not None
        try:
            await self.cluster.wait_serving(r, self.cfg.startup_timeout_s)
            self._update_targets()
            self.say(f"replacement {r.node_id} serving")
        except RuntimeError as e:
            self.notes.append(f"replacement replica {r.node_id} did not come up: {str(e).splitlines()[0]}")
            self.say(self.notes[-1])

    # -- the end: leaks --------------------------------------------------------------------------------------

    async def _leak_check(self) -> dict[str, Any]:
        from redis.asyncio import Redis

        assert self.cluster is not None
        c = self.cluster
        # A live record outlives its stream by up to session_ttl (the owner stops refreshing it), then stays
        # resume_ttl as detached; a reservation lasts reservation_ttl (= resume_ttl here).
        wait = self.cfg.resume_ttl_s + max(_SESSION_TTL_S, self.cfg.resume_ttl_s) + _LEAK_MARGIN_S
        self.say(f"all clients finished; waiting {wait:g} s (resume TTL + session TTL + margin) for the routing "
                 "records to expire")
        await asyncio.sleep(wait)
        r = Redis(host="127.0.0.1", port=c.redis_port, socket_timeout=5, decode_responses=True)
        out: dict[str, Any] = {"waited_s": wait}
        keys: list[dict[str, Any]] = []
        members: dict[str, list[dict[str, Any]]] = {"tenant_members": [], "pending_members": []}
        try:
            now_ms = int(time.time() * 1000)
            async for key in r.scan_iter(match="af:session:*", count=500):
                h = await r.hgetall(key)
                keys.append({"key": key, "ttl_ms": await r.pttl(key), "state": h.get("state"),
                             "node": h.get("node"), "tenant": h.get("tenant")})
            for pattern, name in (("af:tenant:*", "tenant_members"), ("af:pending:*", "pending_members")):
                async for key in r.scan_iter(match=pattern, count=500):
                    rows: list[Any] = await r.zrangebyscore(key, now_ms, "+inf", withscores=True)
                    for member, score in rows:
                        members[name].append({"key": key, "session_id": member,
                                              "valid_for_s": round((float(score) - now_ms) / 1000.0, 1)})
        finally:
            await r.aclose()
        out.update(session_keys=keys, **members)
        out["count"] = len(keys) + len(members["tenant_members"]) + len(members["pending_members"])
        out["sessions"] = len({str(x["key"]).split(":", 2)[2] for x in keys}
                              | {x["session_id"] for v in members.values() for x in v})
        # And what the replicas themselves still hold (an admin token sees the replica's totals).
        from avatarforcing_client import AvatarForcingClient

        held: dict[str, Any] = {}
        for rep in c.replicas:
            if not rep.alive:
                continue
            try:
                async with AvatarForcingClient(rep.address, token=self.tokens["admin"]) as ac:
                    info = await ac.server_info(timeout=5)
                held[rep.node_id] = int(info.active_sessions)
            except Exception as e:
                held[rep.node_id] = f"unknown ({_describe(e)})"
        out["replica_sessions_after"] = held
        return out

    # -- the whole run -----------------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        from avatarforcing_client import AvatarForcingClient, read_wav


        cfg = self.cfg
        redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(redis_bin).exists():
            raise SystemExit("redis-server is not installed (scripts/bootstrap.sh installs the Debian package)")
        samples, rate = read_wav(assets_dir() / "speech_16k.wav")
        assert rate == 16000
        pcm = samples.astype("<i2").tobytes()
        step = int(rate * _CHUNK_S) * 2
        self.chunks = [pcm[i:i + step] for i in range(0, len(pcm) - step + 1, step)]
        self.image = (assets_dir() / "reference_face.png").read_bytes()
        work = Path(tempfile.mkdtemp(prefix="af-chaos-"))
        logdir = cfg.logs or work / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        tokfile = work / "tokens"
        tokfile.write_text(
            "# tenant:token[:max_sessions]\n"
            f"alpha:{self.tokens['alpha']}:{self.limits['alpha']}\n"
            f"beta:{self.tokens['beta']}\n"
            f"admin:{self.tokens['admin']}\n")
        tokfile.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AVATARFORCING_")}
        env.update(OMP_NUM_THREADS=str(cfg.threads), AVATARFORCING_LOG_LEVEL="info", AVATARFORCING_LOG_FORMAT="json",
                   AVATARFORCING_RESUME_TTL_S=f"{cfg.resume_ttl_s:g}",
                   AVATARFORCING_RESERVATION_TTL_S=f"{cfg.resume_ttl_s:g}",
                   AVATARFORCING_AUTH_TOKENS_FILE=str(tokfile),
                   AVATARFORCING_TENANT_MAX_SESSIONS=str(self.limits["beta"]),
                   AVATARFORCING_ADMIN_TENANTS="admin")
        self.cluster = c = _Cluster(redis_bin, work, logdir, env, cfg.slots, cfg.threads)
        tasks: list[asyncio.Task[Any]] = []
        leaks: dict[str, Any] | None = None
        interrupted = False
        error = ""
        t_chaos_end = None
        try:
            await c.start_redis()
            for _ in range(cfg.replicas):
                c.spawn()
            print(f"starting redis-server :{c.redis_port} and {cfg.replicas} replicas (logs: {logdir}) ...",
                  flush=True)
            await asyncio.gather(*(c.wait_serving(r, cfg.startup_timeout_s) for r in c.replicas))
            addrs = [r.address for r in c.replicas]
            for t in TENANTS:
                self.clients[t] = AvatarForcingClient(addrs, token=self.tokens[t],
                                                      resume_timeout=cfg.resume_timeout_s, placement_timeout=10.0)
            self.t0, self.wall0 = time.monotonic(), time.time()
            self.say(f"chaos for {cfg.duration_s:g} s: {cfg.sessions} sessions (alpha limit {self.limits['alpha']}, "
                     f"beta limit {self.limits['beta']}), faults {','.join(cfg.faults)} every "
                     f"{cfg.fault_every_s[0]:g}-{cfg.fault_every_s[1]:g} s ({cfg.fault_order}), seed {cfg.seed}")
            mon = asyncio.create_task(self._monitor())
            slots = [asyncio.create_task(self._slot(i)) for i in range(cfg.sessions)]
            faults = asyncio.create_task(self._faults())
            tasks = [mon, *slots, faults]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), cfg.duration_s)
            self.stopping.set()
            self.say("duration reached: no new faults or sessions; closing the sessions")
            await faults  # a fault in progress finishes (SIGCONT, Redis back) first
            await asyncio.wait(slots, timeout=60)
            t_chaos_end = time.monotonic()
            for run in self.runs:
                if run.t_end is None:
                    self.notes.append(f"session {run.session_id} did not finish within 60 s of the end")
            mon.cancel()
            for cl in self.clients.values():
                await cl.close()
            leaks = await self._leak_check()
        except asyncio.CancelledError:
            interrupted = True
            self.notes.append("interrupted (Ctrl-C or SIGTERM): no leak check")
        except Exception as e:
            error = _describe(e)
            self.notes.append(f"the run failed: {error}")
            print(f"chaos: error: {error}", file=sys.stderr, flush=True)
        finally:
            self.stopping.set()
            for task in [*tasks, *self._bg]:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.gather(*tasks, *self._bg, return_exceptions=True), 10)
            for cl in self.clients.values():
                with contextlib.suppress(BaseException):
                    await cl.close()
            if interrupted or error:  # let the replicas see the clients go (and log it) before they stop
                with contextlib.suppress(BaseException):
                    await asyncio.sleep(2.0)
            print("stopping the replicas and redis-server ...", flush=True)
            c.stop()
        logs = analyze_replica_logs(ReplicaLog(r.node_id, r.log, r.killed_at) for r in c.replicas)
        res = self._report(logs, leaks, t_chaos_end, interrupted, error, logdir)
        if cfg.logs is not None or res["ok"]:  # the logs are elsewhere, or not worth keeping
            shutil.rmtree(work, ignore_errors=True)
            if cfg.logs is None:
                res["logs"] = None
        else:  # a failed run keeps its logs (and nothing else: the tokens go)
            with contextlib.suppress(OSError):
                tokfile.unlink()
        return res

    # -- the report --------------------------------------------------------------------------------------------

    def _report(self, logs: dict[str, Any], leaks: dict[str, Any] | None, t_chaos_end: float | None,
                interrupted: bool, error: str, logdir: Path) -> dict[str, Any]:
        cfg = self.cfg
        runs = self.runs
        out = collections.Counter(r.outcome or "unfinished" for r in runs)
        lost = [r for r in runs if r.outcome == "lost"]
        by_kind: dict[str, dict[str, Any]] = {}
        timeline: list[dict[str, Any]] = []
        for i, f in enumerate(self.faults):
            # What happens to a session after the next fault is that fault's doing.
            until = self.faults[i + 1].t if i + 1 < len(self.faults) else math.inf
            k = by_kind.setdefault(f.kind, {"injected": 0, "skipped": 0, "affected": 0, "_resume": [], "_stall": [],
                                            "resumed": 0})
            if f.skipped:
                k["skipped"] += 1
            else:
                k["injected"] += 1
                k["affected"] += len(f.affected)
            entry: dict[str, Any] = {"t_s": round(f.t - self.t0, 2), "at": _iso(f.wall), "kind": f.kind,
                                     "target": f.target, "detail": f.detail,
                                     "lasted_s": _round(None if f.t_end is None else f.t_end - f.t, 2)}
            if f.skipped:
                entry["skipped"] = f.skipped
            sess = []
            for run, gen0 in f.affected:
                resume = _first_resumed(run, f.t, gen0, until)
                stall = _stall(run, f.t, min((f.t_end or f.t) + 15.0, until))
                if resume is not None:
                    k["_resume"].append(resume)
                    k["resumed"] += 1
                if stall is not None:
                    k["_stall"].append(stall)
                sess.append({"session_id": run.session_id, "tenant": run.tenant, "resumed_after_s": _round(resume),
                             "longest_frame_gap_s": _round(stall), "outcome": run.outcome or "unfinished"})
            entry["sessions"] = sess
            timeline.append(entry)
        for k in by_kind.values():
            k["fault_to_first_resumed_frame_s"] = _stats(k.pop("_resume"))
            k["longest_frame_gap_s"] = _stats(k.pop("_stall"))
        doubled = logs["doubled"]
        leaked = leaks["count"] if leaks is not None else None
        tenant_log_max = {t: logs["tenant_max_live"].get(t, 0) for t in TENANTS}
        exceeded = {t: max(self.client_max[t], tenant_log_max[t]) > self.limits[t] for t in TENANTS}
        n_cancelled, n_closed = sum(r.send_cancelled for r in runs), sum(r.send_closed for r in runs)
        notes = list(self.notes)
        if n_cancelled or n_closed:
            notes.append(f"SDK: send_audio raised CancelledError {n_cancelled} time(s) into a task nobody cancelled "
                         f"and SessionClosedError {n_closed} time(s) on a session nobody closed (writes racing a "
                         "resume after the call was cancelled under them); the harness carried on sending")
        notes += logs["notes"]
        ok = (not interrupted and not error and not lost and not doubled and leaked == 0)
        res: dict[str, Any] = {
            "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_start": [round(x, 2) for x in self.load_start],
                        "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "harness_loop_lag_s": {"max": round(self.loop_lag_max, 3), "over_0.25_s": self.loop_lags[:200],
                                   "note": "how late this process's event loop woke up (the clients run in it): "
                                           "large values mean the machine was too busy for the clients"},
            "config": {"duration_s": cfg.duration_s, "replicas": cfg.replicas, "sessions": cfg.sessions,
                       "fault_every_s": list(cfg.fault_every_s), "faults": list(cfg.faults),
                       "fault_order": cfg.fault_order, "seed": cfg.seed, "session_s": list(cfg.session_s),
                       "replica_stop_s": cfg.replica_stop_s, "redis_down_s": list(cfg.redis_down_s),
                       "stall_s": cfg.stall_s, "resume_timeout_s": cfg.resume_timeout_s,
                       "resume_ttl_s": cfg.resume_ttl_s, "reservation_ttl_s": cfg.resume_ttl_s,
                       "replica_slots": cfg.slots, "threads": cfg.threads, "model": "tiny (CPU)",
                       "pacing": "REALTIME", "encoding": "JPEG", "tenant_limits": self.limits,
                       "tenant_slots": dict(collections.Counter(self.slot_tenants))},
            "ran_s": round((t_chaos_end or time.monotonic()) - self.t0, 1) if self.t0 else 0.0,
            "sessions_started": len(runs),
            "sessions_completed": out["completed"],
            "sessions_cancelled": out["cancelled"],
            "sessions_lost": len(lost),
            "sessions_doubled": len(doubled),
            "sessions_doubled_suspected_only": sum(1 for d in doubled if d.get("suspected_only")),
            "routing_records_leaked": leaked,
            "sessions_unfinished": out["unfinished"],
            "sessions_refused_at_start": dict(self.refused),
            "refusals": self.refusals,
            "sessions_resumed": sum(1 for r in runs if r.session is not None and r.session.resumes),
            "resumes": sum(int(r.session.resumes) for r in runs if r.session is not None),
            "lost": [{"session_id": r.session_id, "tenant": r.tenant, "why": r.error, "addresses": r.addresses,
                      "started_at": _iso(r.wall_start), "t_s": round(r.t_start - self.t0, 2)} for r in lost],
            "doubled": doubled,
            "sessions": [_session_summary(r, self.t0) for r in runs],
            "same_replica_overlaps": logs["same_process_overlaps"],
            "leaks": leaks,
            "tenant_concurrency": {
                "limit": self.limits, "max_live_seen_by_clients": self.client_max,
                "max_counted_by_redis": self.redis_max, "max_live_on_replicas": tenant_log_max,
                "redis_samples": self.redis_samples, "redis_samples_missed": self.redis_misses,
                "exceeded": exceeded,
                "note": "Redis counts the tenant's pending and live records (detached ones hold no quota), what the "
                        "limit is checked against; a release Redis missed while away counts until it is replayed",
            },
            "faults_by_kind": by_kind,
            "fault_timeline": timeline,
            "replica_logs": {"streams": logs["streams"], "sessions_seen": logs["sessions_seen"],
                             "intervals_from": logs["intervals_from"], "server_errors": logs["server_errors"],
                             "server_error_samples": logs["server_error_samples"]},
            "logs": str(logdir),
            "notes": notes,
            "interrupted": interrupted,
            "error": error or None,
            "ok": ok,
        }
        return res


def _session_summary(r: _Run, t0: float) -> dict[str, Any]:
    ft = r.frame_t
    gaps = [b - a for a, b in zip(ft, ft[1:], strict=False)]
    return {"session_id": r.session_id, "tenant": r.tenant, "outcome": r.outcome or "unfinished",
            "why": r.error or None, "t_s": round(r.t_start - t0, 2),
            "ran_s": _round(None if r.t_end is None else r.t_end - r.t_start, 2), "planned_s": round(r.planned_s, 1),
            "frames": len(ft), "first_frame_s": _round(ft[0] - r.t_start if ft else None),
            "longest_frame_gap_s": _round(max(gaps) if gaps else None),
            "resumes": int(r.session.resumes) if r.session is not None else 0, "addresses": r.addresses}


async def _stop_speaking(run: _Run, speak: asyncio.Task[None]) -> None:
    """Stops the sender between two chunks. Cancelling a task blocked in ``send_audio`` would cancel the whole
    gRPC call (grpc.aio cancels an RPC whose write is cancelled), which is not what a client ending its session
    normally does; only a sender stuck for 2 s (in a resume) is cancelled."""
    run.quiet = True
    await asyncio.wait([speak], timeout=2.0)
    if not speak.done():
        speak.cancel()
    with contextlib.suppress(BaseException):
        await speak


def _first_resumed(run: _Run, t: float, gen0: int, until: float = math.inf) -> float | None:
    """Seconds from the fault to the first frame the session received from a newer stream than at the fault
    (before ``until``, the next fault)."""
    i = bisect.bisect_right(run.frame_t, t)
    for k in range(i, len(run.frame_t)):
        if run.frame_t[k] - t > 60 or run.frame_t[k] >= until:
            break
        if run.frame_gen[k] > gen0:
            return run.frame_t[k] - t
    return None


def _stall(run: _Run, t: float, t_until: float) -> float | None:
    """The longest gap between frames the session received around the fault (from its last frame before the
    fault to ``t_until``, or to its end)."""
    ft = run.frame_t
    i = bisect.bisect_right(ft, t)
    prev = ft[i - 1] if i > 0 else run.t_start
    end = t_until if run.t_end is None else min(t_until, run.t_end)
    worst = 0.0
    for k in range(i, len(ft)):
        if ft[k] > end:
            break
        worst = max(worst, ft[k] - prev)
        prev = ft[k]
    worst = max(worst, end - prev)  # no frame from the last one to the end of the window (or of the session)
    return worst if worst > 0 else None


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------

def config_from_args(a: argparse.Namespace) -> ChaosConfig:
    return ChaosConfig(
        duration_s=float(a.duration), replicas=int(a.replicas), sessions=int(a.sessions if a.sessions else 6),
        fault_every_s=parse_range(a.fault_every, "--fault-every"), faults=parse_faults(a.faults),
        fault_order=a.fault_order, seed=int(a.seed if a.seed is not None else secrets.randbelow(2**31)),
        session_s=parse_range(a.session_s, "--session-s"), replica_stop_s=float(a.replica_stop_s),
        redis_down_s=parse_range(a.redis_down_s, "--redis-down-s"), stall_s=float(a.stall_s),
        resume_timeout_s=float(a.resume_timeout), resume_ttl_s=float(a.resume_ttl),
        replica_slots=int(a.replica_slots or 0), threads=int(a.threads or 1),
        logs=Path(a.logs) if a.logs else None)


def print_report(res: dict[str, Any]) -> None:
    from avatarforcing.report import print_table

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    c = res["config"]
    print(f"\nmachine: {res['machine']['cpus']} CPUs, {res['machine']['platform']}; ran {res['ran_s']} s with "
          f"{c['replicas']} replicas and {c['sessions']} sessions (seed {c['seed']}); load average "
          f"{res['machine']['load_average_start'][0]} -> {res['machine']['load_average_end'][0]}, this process's "
          f"event loop late by up to {res['harness_loop_lag_s']['max']:.2f} s")
    lk = res["routing_records_leaked"]
    print_table("Sessions (chaos)", ["started", "completed", "cancelled", "refused", "resumed", "LOST", "DOUBLED",
                                     "LEAKED records"],
                [[res["sessions_started"], res["sessions_completed"], res["sessions_cancelled"],
                  sum(res["sessions_refused_at_start"].values()), res["sessions_resumed"], res["sessions_lost"],
                  res["sessions_doubled"], "not checked" if lk is None else lk]])
    tc = res["tenant_concurrency"]
    print_table("Tenant concurrency (max at once)", ["tenant", "limit", "clients saw", "Redis counted", "replicas ran",
                                                     "exceeded"],
                [[t, tc["limit"][t], tc["max_live_seen_by_clients"][t], tc["max_counted_by_redis"][t],
                  tc["max_live_on_replicas"][t], "YES" if tc["exceeded"][t] else "no"] for t in TENANTS])
    rows = []
    for kind in FAULT_KINDS:
        k = res["faults_by_kind"].get(kind)
        if k is None:
            continue
        r, s = k["fault_to_first_resumed_frame_s"], k["longest_frame_gap_s"]
        rows.append([kind, k["injected"], k["skipped"], k["affected"], k["resumed"], f(r["p50"]), f(r["p99"]),
                     f(s["p50"]), f(s["p99"])])
    print_table("Faults", ["kind", "injected", "skipped", "sessions hit", "resumed", "resume p50 s", "p99 s",
                           "frame gap p50 s", "p99 s"], rows)
    if res["fault_timeline"]:
        print("\nFault timeline")
        for e in res["fault_timeline"]:
            hit = ", ".join(f"{x['session_id'][:8]} gap {f(x['longest_frame_gap_s'])} s"
                            + (f" resumed {f(x['resumed_after_s'])} s" if x["resumed_after_s"] is not None else "")
                            + ("" if x["outcome"] in ("completed", "cancelled") else f" [{x['outcome']}]")
                            for x in e["sessions"])
            print(f"  {e['t_s']:8.1f} s  {e['kind']:<13} {e['target']:<16} {e.get('skipped') or e['detail']}"
                  + (f"  | {hit}" if hit else ""))
    if res["sessions_refused_at_start"]:
        print("\nrefused at start: " + ", ".join(f"{k} x{v}" for k, v in res["sessions_refused_at_start"].items()))
    for x in res["lost"]:
        print(f"LOST {x['tenant']} {x['session_id']} at {x['t_s']} s: {x['why']} (on {', '.join(x['addresses'])})")
    for d in res["doubled"]:
        st = "; ".join(f"{s['process']} {s['from']} .. {s['to']} ({s['interval_from']})" for s in d["streams"])
        print(f"DOUBLED {d['session_id']}: {d['overlap_s']} s overlap"
              f"{' (suspected: no frame timestamps)' if d.get('suspected_only') else ''}: {st}")
    if res["leaks"]:
        for kind in ("session_keys", "tenant_members", "pending_members"):
            for x in res["leaks"][kind]:
                print(f"LEAKED {kind[:-1].replace('_', ' ')}: {json.dumps(x)}")
        print(f"replica sessions after the run: {res['leaks']['replica_sessions_after']}")
    if res["replica_logs"]["server_errors"]:
        print("server errors in the logs: " + ", ".join(f"{k} x{v}"
                                                       for k, v in res["replica_logs"]["server_errors"].items()))
    for n in res["notes"]:
        print(f"note: {n}")
    print(f"\n{'OK' if res['ok'] else 'FAILED'}: lost {res['sessions_lost']}, doubled {res['sessions_doubled']}, "
          f"leaked {'not checked' if lk is None else lk}" + (f"; logs kept in {res['logs']}" if res["logs"] else ""))


def run_chaos_bench(a: argparse.Namespace) -> int:
    """`avatarforcing bench --chaos`: runs, prints, writes the JSON; 0 when nothing was lost, doubled or leaked."""
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        print(f"avatarforcing bench --chaos: error: {e}", file=sys.stderr)
        return 2
    box: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        chaos = Chaos(cfg)
        try:
            box["res"] = await chaos.run()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGTERM)

    interrupted = False
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        interrupted = True
    res = box.get("res")
    if res is None:
        return 130 if interrupted else 1
    print_report(res)
    out = a.out or Path("bench/results") / f"chaos-cpu-tiny-{res['date']}.json"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    if interrupted or res["interrupted"]:
        return 130
    return 0 if res["ok"] else 1
