"""`avatarforcing bench --sections onset`: speech onset after a burst, measured from outside the server.

A TTS engine hands over a whole sentence at once. This section measures, through the real gRPC server and the
Python SDK, the time from the first chunk of such a burst being written to the first ``VideoFrame`` whose audio
is the burst's (and to the first ``AudioOut`` carrying it):

* ``idle``: a ``PACING_REALTIME`` session idles, then an utterance is sent in one burst (repeated);
* ``interrupt``: while the avatar speaks, ``Interrupt`` and at once a new burst (repeated);
* ``sessions``: N sessions each idle a random time, then burst (several times each), all at once.

Each run goes against a server that re-plans its window on early audio and, where this build has the setting,
against one started with ``--no-onset-replan`` (today's constant timeline). Which frame is the burst's comes from
the wire alone: ``AudioOut.source_end_sample`` counts the client's samples consumed through a block (dropped by an
Interrupt included), so a block whose count passes the samples sent before the burst and that has
``real_samples > 0`` holds the burst's audio; its first frame whose ``[audio_start_sample, audio_end_sample)``
overlaps ``[start_sample + real_offset, ...)`` is the first frame showing it.

The published model's onset (blocks of 640 ms) is COMPUTED, not measured, from the GPU bench's step times
(``bench/results/gpu-*.json``): L - 1 warm-up steps plus one emitting step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarforcing.report import print_table

from .common import assets_dir, free_port, histogram_quantile, wait_port

CHUNK_MS = 20  # the burst goes out as a TTS client sends it: many small chunks, written as fast as they go


@dataclass
class AudioSeen:
    """An ``AudioOut`` as received: arrival time (event-loop clock) and the fields that place it."""

    t: float
    block: int
    start_sample: int
    real_samples: int
    real_offset: int
    source_end: int


@dataclass
class FrameSeen:
    t: float
    block: int
    index: int
    audio_start: int
    audio_end: int


@dataclass
class Burst:
    t_send: float  # when its first chunk was handed to the SDK
    sent_before: int  # client samples sent on this stream before it
    samples: int


@dataclass
class Onset:
    audio_s: float  # burst sent -> the first AudioOut carrying it received
    frame_s: float  # burst sent -> the first frame showing it received
    block: int
    frame_index: int


def find_onset(audio: Sequence[AudioSeen], frames: Sequence[FrameSeen], burst: Burst) -> Onset | None:
    """The first block and frame carrying ``burst``'s audio, from what a session received (in order).

    A block carries it when it holds client audio (``real_samples > 0``) consumed past what was sent before the
    burst (``source_end > sent_before``): audio of an earlier utterance, still queued or silenced by an Interrupt,
    never does. The first frame is the first of that block whose audio span overlaps the block's real audio.
    """
    first = next((a for a in audio if a.t >= burst.t_send and a.real_samples > 0
                  and a.source_end > burst.sent_before), None)
    if first is None:
        return None
    real_start = first.start_sample + first.real_offset
    frame = next((f for f in frames if f.block == first.block and f.audio_end > real_start and f.t >= first.t), None)
    if frame is None:
        return None
    return Onset(first.t - burst.t_send, frame.t - burst.t_send, first.block, frame.index)


@dataclass
class Tracked:
    """One session's received events, logged by a reader task, and the bursts sent on it."""

    audio: list[AudioSeen] = field(default_factory=list)
    frames: list[FrameSeen] = field(default_factory=list)
    bursts: list[Burst] = field(default_factory=list)
    sent: int = 0
    stats_onset_ms: list[float] = field(default_factory=list)  # Stats.onset_latency_ms, where the wire has it
    announced_onset_ms: float | None = None  # SessionStarted.onset_latency_ms, where the wire has it
    announced_latency_ms: float = 0.0
    errors: list[str] = field(default_factory=list)  # bursts not rendered in time (the session stopped there)
    resumes: int = 0  # the SDK resumed the session (its stream stalled or broke): positions stay session-wide
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def onsets(self) -> list[Onset | None]:
        return [find_onset(self.audio, self.frames, b) for b in self.bursts]


def _has_field(msg: Any, name: str) -> bool:
    return name in msg.DESCRIPTOR.fields_by_name


async def _read(s: Any, tr: Tracked) -> None:
    from avatarforcing_client import pb

    loop = asyncio.get_running_loop()
    async for ev in s.events():
        now = loop.time()
        if isinstance(ev, pb.VideoFrame):
            tr.frames.append(FrameSeen(now, ev.block_index, ev.index, ev.audio_start_sample, ev.audio_end_sample))
        elif isinstance(ev, pb.AudioOut):
            # source_end_sample counts from the current stream's start: made session-wide, so a burst's position
            # (samples sent before it, over the session) still finds it after a resume.
            tr.audio.append(AudioSeen(now, ev.block_index, ev.start_sample, ev.real_samples, ev.real_offset,
                                      getattr(s, "stream_start_sample", 0) + ev.source_end_sample))
            tr.resumes = int(getattr(s, "resumes", 0))
        elif isinstance(ev, pb.Stats) and _has_field(ev, "onset_latency_ms"):
            v = float(ev.onset_latency_ms)
            if v > 0 and (not tr.stats_onset_ms or tr.stats_onset_ms[-1] != v):
                tr.stats_onset_ms.append(v)
        tr.changed.set()


async def _until(tr: Tracked, cond: Any, timeout: float) -> bool:
    """Waits until ``cond()`` holds (checked on every event received); False on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        left = end - loop.time()
        if left <= 0:
            return False
        tr.changed.clear()
        try:
            await asyncio.wait_for(tr.changed.wait(), left)
        except TimeoutError:
            return cond()
    return True


async def _burst(s: Any, tr: Tracked, pcm: np.ndarray, rate: int) -> Burst:
    """Sends ``pcm`` in CHUNK_MS chunks as fast as the SDK takes them (no pacing)."""
    n = rate * CHUNK_MS // 1000
    b = Burst(asyncio.get_running_loop().time(), tr.sent, int(pcm.shape[0]))
    tr.bursts.append(b)
    for j in range(0, pcm.shape[0], n):
        await s.send_audio(pcm[j:j + n].tobytes())
    tr.sent += int(pcm.shape[0])
    return b


def _started_info(s: Any, tr: Tracked) -> None:
    st = s.started
    tr.announced_latency_ms = float(st.latency_ms)
    if _has_field(st, "onset_latency_ms"):
        tr.announced_onset_ms = float(st.onset_latency_ms)


@contextlib.asynccontextmanager
async def _opened(s: Any) -> AsyncIterator[Any]:
    """A started session, closed afterwards. An error from closing it is ignored: grpc's aio client may fail the
    half-close (ExecuteBatchError) of a stream whose reader was just cancelled, after every burst was measured."""
    await s.start()
    try:
        yield s
    finally:
        with contextlib.suppress(Exception):
            await s.close()


def _stop_reader(reader: asyncio.Task[None], tr: Tracked) -> None:
    """Stops a session's reader; an error it ended with (the stream failed) is recorded."""
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        e = reader.exception()
        tr.errors.append(f"the stream failed: {type(e).__name__}: {e}"[:500])
    reader.cancel()


def _where(tr: Tracked) -> str:
    """Where a session stands, for an error message."""
    last = tr.audio[-1] if tr.audio else None
    now = asyncio.get_running_loop().time()
    seen = "none" if last is None else f"block {last.block}, source_end {last.source_end}, {now - last.t:.1f} s ago"
    return f"sent {tr.sent} samples; {len(tr.frames)} frames, {len(tr.audio)} AudioOut received, the last {seen}"


def _done(tr: Tracked) -> bool:
    """Every sample sent so far has been rendered (or dropped): the last AudioOut's count reached it."""
    return bool(tr.audio) and tr.audio[-1].source_end >= tr.sent


@dataclass
class OnsetRun:
    """What one variant's runs measure."""

    reps: int = 5  # bursts after idle, and interrupts
    idle_s: float = 3.0
    utterance_s: float = 3.5
    speak_s: float = 1.0  # how long the avatar speaks before the Interrupt
    # Added to each idle and speaking time, uniform: a burst lands anywhere in the output's block (its first frame
    # can only start a block), not always at the same point of it.
    jitter_s: float = 0.5
    sessions: int = 8
    session_bursts: int = 3
    session_idle_s: tuple[float, float] = (1.0, 4.0)  # each session's idle before a burst, uniform
    timeout_s: float = 30.0
    seed: int = 0


@contextlib.asynccontextmanager
async def _tracked(target: str, image: bytes, rate: int, seed: int, run: OnsetRun, tr: Tracked) -> AsyncIterator[Any]:
    """A started REALTIME H.264 session whose events ``tr`` logs, once its first frame came; closed afterwards."""
    from avatarforcing_client import AvatarForcingClient, pb

    async with AvatarForcingClient(target) as c, _opened(c.session(image=image, sample_rate=rate, seed=seed,
                                                                   video_encoding=pb.VIDEO_ENCODING_H264,
                                                                   pacing=pb.PACING_REALTIME)) as s:
        _started_info(s, tr)
        reader = asyncio.create_task(_read(s, tr))
        try:
            if not await _until(tr, lambda: bool(tr.frames), run.timeout_s):
                raise TimeoutError("no frame from the server")
            yield s
        finally:
            _stop_reader(reader, tr)


async def _session_idle(target: str, image: bytes, pcm: np.ndarray, rate: int, run: OnsetRun,
                        idle: Sequence[float], seed: int, tr: Tracked) -> None:
    """One session: for each entry of ``idle``, idle that long after the previous utterance, then burst."""
    async with _tracked(target, image, rate, seed, run, tr) as s:
        for wait in idle:
            await asyncio.sleep(wait)
            await _burst(s, tr, pcm, rate)
            if not await _until(tr, lambda: _done(tr), run.timeout_s + run.utterance_s):
                # A measurement reports what it saw: this burst counts as missed (if it never showed), and the
                # session stops here.
                tr.errors.append(f"session {seed}: burst {len(tr.bursts)} was not rendered within "
                                 f"{run.timeout_s + run.utterance_s:g} s ({_where(tr)})")
                print(f"  onset: {tr.errors[-1]}", file=sys.stderr, flush=True)
                break


async def _session_interrupt(target: str, image: bytes, pcm: np.ndarray, rate: int, run: OnsetRun,
                             tr: Tracked) -> None:
    """One session: a burst; then ``reps`` times: speak a while, Interrupt, a new burst at once.

    The first burst (after idle) is not counted: ``tr.bursts[1:]`` are the bursts after an interrupt."""
    rng = np.random.default_rng(run.seed + 1)
    async with _tracked(target, image, rate, 7, run, tr) as s:
        await asyncio.sleep(min(run.idle_s, 1.0))
        b = await _burst(s, tr, pcm, rate)
        for _ in range(run.reps):
            cur = b
            if not await _until(tr, lambda: find_onset(tr.audio, tr.frames, cur) is not None,  # noqa: B023
                                run.timeout_s):
                tr.errors.append(f"burst {len(tr.bursts)} did not start within {run.timeout_s:g} s "
                                 f"({_where(tr)})")
                print(f"  onset: {tr.errors[-1]}", file=sys.stderr, flush=True)
                break
            await asyncio.sleep(run.speak_s + float(rng.uniform(0, run.jitter_s)))
            await s.interrupt()
            b = await _burst(s, tr, pcm, rate)
        else:  # the last burst: wait for its onset too
            await _until(tr, lambda: find_onset(tr.audio, tr.frames, b) is not None,  # noqa: B023
                         run.timeout_s)
        await s.interrupt()  # no need to watch the rest of the last utterance


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    a = np.asarray(xs, np.float64) * 1000
    if not a.size:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "min_ms": float("nan"),
                "max_ms": float("nan"), "mean_ms": float("nan")}
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "min_ms": float(a.min()), "max_ms": float(a.max()), "mean_ms": float(a.mean())}


def _summarize(onsets: Sequence[Onset | None], errors: Sequence[str] = (), resumes: int = 0) -> dict[str, Any]:
    found = [o for o in onsets if o is not None]
    return {"bursts": len(onsets), "missed": len(onsets) - len(found), "resumes": resumes,
            "frame": _stats([o.frame_s for o in found]), "audio": _stats([o.audio_s for o in found]),
            "frame_s": [o.frame_s for o in found], "errors": list(errors)}


async def _guarded(tr: Tracked, coro: Any) -> None:
    """Runs one session's script; an error (the stream failed, the server went away) is recorded on ``tr``, so
    that the other sessions' measurements still count and the failure shows in the results."""
    try:
        await coro
    except Exception as e:  # noqa: BLE001 (a measurement records what went wrong and carries on)
        tr.errors.append(f"{type(e).__name__}: {e} ({_where(tr)})"[:500])
        print(f"  onset: session failed: {tr.errors[-1]}", file=sys.stderr, flush=True)


async def measure(target: str, run: OnsetRun) -> dict[str, Any]:
    """The three runs against the server at ``target``; onsets in seconds, summaries in ms."""
    from avatarforcing_client import read_wav

    wav, rate = read_wav(assets_dir() / "speech_16k.wav")
    pcm = wav[: int(run.utterance_s * rate)]
    image = (assets_dir() / "reference_face.png").read_bytes()
    out: dict[str, Any] = {}

    tr = Tracked()
    rng = np.random.default_rng(run.seed)
    idle = (run.idle_s + rng.uniform(0, run.jitter_s, run.reps)).tolist()
    await _guarded(tr, _session_idle(target, image, pcm, rate, run, idle, 1, tr))
    out["idle"] = _summarize(tr.onsets(), tr.errors, tr.resumes)
    announced = {"latency_ms": tr.announced_latency_ms, "onset_latency_ms": tr.announced_onset_ms}
    stats_onset = list(tr.stats_onset_ms)

    tr = Tracked()
    await _guarded(tr, _session_interrupt(target, image, pcm, rate, run, tr))
    out["interrupt"] = _summarize(tr.onsets()[1:], tr.errors, tr.resumes)
    stats_onset += tr.stats_onset_ms

    rng = np.random.default_rng(run.seed + 2)
    lo, hi = run.session_idle_s
    trs = [Tracked() for _ in range(run.sessions)]
    await asyncio.gather(*(_guarded(t, _session_idle(target, image, pcm, rate, run,
                                                     rng.uniform(lo, hi, run.session_bursts).tolist(), 100 + i, t))
                           for i, t in enumerate(trs)))
    out["sessions"] = _summarize([o for t in trs for o in t.onsets()], [e for t in trs for e in t.errors],
                                 sum(t.resumes for t in trs))
    out["sessions"]["n_sessions"] = run.sessions
    for t in trs:
        stats_onset += t.stats_onset_ms
    out["announced"] = announced
    out["stats_onset_ms"] = _stats([v / 1000 for v in stats_onset]) if stats_onset else None
    return out


def replan_setting_exists() -> bool:
    """Whether this build's server has the re-plan setting (``ServerConfig.onset_replan``)."""
    from avatarforcing_service.config import ServerConfig

    return "onset_replan" in {f.name for f in dataclasses.fields(ServerConfig)}


def _histogram(body: str, name: str) -> dict[str, float] | None:
    if name not in body:
        return None
    return {"p50_ms": histogram_quantile(body, name, 0.5) * 1000,
            "p99_ms": histogram_quantile(body, name, 0.99) * 1000}


def run_variant(run: OnsetRun, extra_args: Sequence[str], threads: int | None) -> dict[str, Any]:
    """Starts a server (``extra_args`` added to ``serve``), runs ``measure`` against it, scrapes its metrics."""
    # One slot to spare: a session of the previous run may still be releasing its slot when the next opens.
    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--port", str(port), "--metrics-port", str(mport),
           "--max-sessions", str(run.sessions + 1), "--log-level", "warning", *extra_args]
    if threads:
        cmd += ["--threads", str(threads)]
    # The server's log goes to a file: a pipe nobody reads could fill up and stall the server under test.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_port(port, proc)
            res = asyncio.run(measure(f"127.0.0.1:{port}", run))
            body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
    res["server_log_lines"] = len(lines)
    res["server_log_tail"] = lines[-20:]
    res["server_onset_histogram"] = _histogram(body, "avatarforcing_onset_latency_seconds")
    res["server_frame_latency"] = _histogram(body, "avatarforcing_frame_latency_seconds")
    res["server_args"] = list(extra_args)
    return res


# ---- the published model's onset, computed ----------------------------------------------------------------
GPU_RESULTS = ("gpu-h100-2026-11-26.json", "gpu-h200-2026-11-26.json")


def published_onset(results_dir: Path, files: Sequence[str] = GPU_RESULTS, budget_ms: float | None = None,
                    ) -> list[dict[str, Any]]:
    """The published configuration's onset after a burst, COMPUTED from a GPU bench's measured step times.

    After a re-plan the engine runs L - 1 warm-up steps (the window pass only: no emission, no temporal-anchor
    pass, no decode) and then one emitting step. Warm-up steps are costed at the measured denoising step of one
    session (which includes the temporal-anchor pass, so this errs high) and the emitting step at the measured
    whole step (denoise, anchor pass, decode). A step already running when the burst arrives adds at most one
    more step. The issue's target: at most one block plus the warm-up compute. Today's constant timeline shows
    a burst's first frame the announced latency after its block starts: L blocks plus the processing budget.
    """
    if budget_ms is None:
        from avatarforcing_service.config import ServerConfig

        budget_ms = ServerConfig().processing_budget_ms
    out = []
    for name, section in ((n, s) for n in files for s in ("e2e-full", "e2e-512")):
        p = results_dir / name
        if not p.is_file():
            continue
        d = json.loads(p.read_text())
        st, sec = d["stream"], d["sections"]
        if section not in sec:
            continue
        e2e = sec[section]
        one = next(r for r in e2e["by_batch"] if r["batch"] == 1)
        L = int(st["window_blocks"])
        block_ms = float(e2e["block_seconds"]) * 1000
        warm, emit = float(one["denoise_step_ms"]), float(one["step_ms"])
        compute = (L - 1) * warm + emit
        worst = compute + emit
        # The slowest measured denoising step (eager: no CUDA graph, no compiled stages), scaled to this
        # resolution: warm-up steps run outside the steady state's CUDA graph, so they may cost about this.
        den = sec["denoise"]
        scale = warm / float(sec["e2e-full"]["by_batch"][0]["denoise_step_ms"])
        eager = max(float(v["step_ms"]) for v in den["variants"]) * scale
        conservative = (L - 1) * eager + emit + emit
        target = block_ms + compute
        out.append({
            "source": f"bench/results/{name}", "gpu": d["env"]["gpu"], "model": e2e["model"],
            "resolution": f"{e2e['height']}x{e2e['width']}", "computed": True,
            "window_blocks": L, "block_ms": block_ms, "lookahead_ms": (L - 1) * block_ms,
            "warmup_step_ms": warm, "emit_step_ms": emit, "onset_compute_ms": compute,
            "onset_worst_ms": worst, "onset_conservative_ms": conservative, "target_ms": target,
            "meets_target": worst <= target, "today_latency_ms": L * block_ms + budget_ms,
            "replan_cost_steps": L - 1, "replan_cost_ms": (L - 1) * warm,
        })
    return out


def bench_onset(quick: bool, sessions: int, threads: int | None, run: OnsetRun | None = None,
                variants: Sequence[tuple[str, list[str]]] | None = None,
                results_dir: Path = Path("bench/results")) -> dict[str, Any]:
    """The onset section: each variant's three runs, tables, and the published model's computed onset."""
    if run is None:
        run = OnsetRun(sessions=sessions)
        if quick:
            run = dataclasses.replace(run, reps=2, idle_s=1.5, sessions=min(sessions, 4), session_bursts=1)
    if variants is None:
        if replan_setting_exists():
            variants = [("re-plan", []), ("no re-plan", ["--no-onset-replan"])]
        else:  # a server without the setting runs today's constant timeline: the baseline
            variants = [("no re-plan (this build has no re-plan)", [])]
    res: dict[str, Any] = {"run": dataclasses.asdict(run), "chunk_ms": CHUNK_MS, "variants": {}}
    for name, args in variants:
        print(f"  onset: {name} ...", file=sys.stderr, flush=True)
        res["variants"][name] = run_variant(run, args, threads)
    rows = []
    for name, v in res["variants"].items():
        for kind, label in (("idle", "burst after idle"), ("interrupt", "burst after interrupt"),
                            ("sessions", f"{run.sessions} sessions, random bursts")):
            r = v[kind]
            rows.append([name, label, r["bursts"], r["missed"], r.get("resumes", 0), r["frame"]["p50_ms"],
                         r["frame"]["p99_ms"], r["audio"]["p50_ms"], r["frame"]["max_ms"]])
    print_table("Speech onset: burst sent -> first frame carrying it (REALTIME, H.264, measured from outside)",
                ["server", "run", "bursts", "missed", "resumes", "frame p50 ms", "frame p99 ms", "AudioOut p50 ms",
                 "frame max ms"], rows)
    pub = published_onset(results_dir)
    res["published_computed"] = pub
    if pub:
        print_table("Published model (wan-1.3b, blocks of 640 ms, one session): onset after a burst, COMPUTED from "
                    "the GPU bench's step times (not measured)",
                    ["GPU", "resolution", "warm-up step ms", "emit step ms", "L-1 + 1 steps ms",
                     "+ step in flight ms", "target (block + warm-up) ms", "today's latency ms"],
                    [[p["gpu"], p["resolution"], p["warmup_step_ms"], p["emit_step_ms"], p["onset_compute_ms"],
                      p["onset_worst_ms"], p["target_ms"], p["today_latency_ms"]] for p in pub])
    return res
