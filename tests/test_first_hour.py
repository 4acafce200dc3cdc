"""The first hour of a new user, without tracebacks (issue 14): readable logs on a terminal and JSON otherwise,
configuration errors that name the variable, gRPC errors as one line, any sample rate from 8 to 48 kHz with whole
samples per frame (espeak-ng's 22,050 Hz, a 44.1 kHz stereo WAV), writers that create their folders or name the
path, and the metrics port's /healthz and /readyz. Every error here is asserted to be one line, no traceback."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path

import av
import grpc
import numpy as np
import pytest

import avatarforcing_client
import avatarforcing_service
from avatarforcing_client import AvatarForcingClient, pb, read_wav, record_session
from avatarforcing_service.server import App

from .conftest import png_bytes, speechlike_pcm

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "avatarforcing_tools.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
AppFactory = Callable[..., Awaitable[App]]
ALICE = "alice-token-0123456789abcdef"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVATARFORCING_")}
    env.update(extra)
    return env


def one_line(stderr: str) -> str:
    """The only line of ``stderr``, which must hold no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env or clean_env())


async def run_cli_async(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str, str]:
    """The CLI in a subprocess while this test's event loop keeps serving the in-process server."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env or clean_env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def run_on_terminal(args: list[str], env: dict[str, str], until: Callable[[str], bool] | None = None,
                    timeout: float = 180) -> tuple[int, str, str]:
    """Runs the CLI with stderr on a pseudo-terminal (as a person at a shell has it); stdout to a pipe. With
    ``until``, sends SIGTERM once the terminal's text satisfies it. Returns (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=slave, env=env, text=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    signalled = False
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
            if until is not None and not signalled and until(b"".join(chunks).decode(errors="replace")):
                proc.send_signal(signal.SIGTERM)
                signalled = True
        out = proc.stdout.read() if proc.stdout else ""
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, out, ANSI.sub("", b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"))


def espeak_wav(path: Path, text: str = "Hello there. This is the avatar speaking.") -> Path:
    """espeak-ng's default output: a mono 16-bit WAV at 22,050 Hz (scripts/bootstrap.sh installs espeak-ng)."""
    exe = shutil.which("espeak-ng")
    assert exe is not None, "espeak-ng is missing: scripts/bootstrap.sh installs it (apt_pkgs)"
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    return path


def stereo_wav(path: Path, rate: int = 44100, seconds: float = 1.5) -> tuple[Path, np.ndarray]:
    """A 16-bit stereo WAV: speech-like sound on the left, the same at half level on the right."""
    left = speechlike_pcm(seconds, rate)
    frames = np.stack([left, (left // 2).astype(np.int16)], 1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.astype("<i2").tobytes())
    return path, frames


# ---- --version -----------------------------------------------------------------------------------------------------
def test_version_names_the_server_and_the_sdk() -> None:
    want = (f"avatarforcing-serve {avatarforcing_service.__version__} (avatarforcing-client "
            f"{avatarforcing_client.__version__}, API avatarforcing.v1)")
    for args in (["--version"], ["version"]):
        r = run_cli(*args, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == want and r.stderr == "", (r.stdout, r.stderr)
    # The versions the packages are published under are the ones printed.
    for pyproject, version in ((ROOT / "pyproject.toml", avatarforcing_service.__version__),
                               (ROOT / "clients/python/pyproject.toml", avatarforcing_client.__version__)):
        meta = tomllib.loads(pyproject.read_text())["project"]
        assert meta["version"] == version and meta["license"] == "Apache-2.0", pyproject
        license_text = (pyproject.parent / "LICENSE").read_text()
        assert "Apache License\n                           Version 2.0, January 2004" in license_text
        assert "Copyright 2026 The AvatarForcing Serve authors" in license_text


# ---- configuration errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd,var,value,message", [
    ("serve", "AVATARFORCING_MAX_SESSIONS", "abc", "AVATARFORCING_MAX_SESSIONS='abc' is not an integer"),
    ("serve", "AVATARFORCING_MAX_SESSIONS", "0", "max_sessions must be >= 1 (got AVATARFORCING_MAX_SESSIONS='0')"),
    ("demo", "AVATARFORCING_GRACE_S", "soon", "AVATARFORCING_GRACE_S='soon' is not a number"),
    ("serve", "AVATARFORCING_CUDA_GRAPHS", "maybe",
     "AVATARFORCING_CUDA_GRAPHS='maybe' is not a boolean (use 1/0, true/false, yes/no or on/off)"),
    ("serve", "AVATARFORCING_LOG_FORMAT", "xml",
     "log_format must be auto, json or console (got AVATARFORCING_LOG_FORMAT='xml')"),
    ("demo", "AVATARFORCING_REDIS_URL", "localhost:6379",
     "redis_url must start with redis://, rediss:// or unix:// (got AVATARFORCING_REDIS_URL='localhost:6379')"),
])
def test_a_configuration_error_names_the_variable_its_value_and_what_is_allowed(
        cmd: str, var: str, value: str, message: str, tmp_path: Path) -> None:
    args = [cmd, "--metrics-port", "-1"] + (["--out", str(tmp_path / "x.mp4")] if cmd == "demo" else [])
    r = run_cli(*args, env=clean_env(**{var: value}))
    line = one_line(r.stderr)
    assert r.returncode == 2 and line.startswith(f"avatarforcing {cmd}: error: ") and line.endswith(message), line


def test_a_flag_the_checks_refuse_is_one_line_too() -> None:
    r = run_cli("serve", "--max-sessions", "0", "--metrics-port", "-1")
    assert r.returncode == 2
    assert one_line(r.stderr) == ("avatarforcing serve: error: invalid server config: max_sessions must be >= 1 "
                                  "(got max_sessions=0)")


# ---- logs: readable on a terminal, JSON otherwise --------------------------------------------------------------------
def _serving(text: str) -> bool:
    return "serving" in text and "\n" in text.split("serving", 1)[1]


def test_logs_are_readable_on_a_terminal_and_json_in_a_pipe() -> None:
    args = ["serve", "--port", "0", "--metrics-port", "-1", "--max-sessions", "1"]
    # A terminal (auto): console lines; the configuration shows only what differs from the defaults.
    rc, _, term = run_on_terminal(args, clean_env(), until=_serving)
    assert rc == 0, term
    lines = [line for line in term.splitlines() if line.strip()]
    serving = next(line for line in lines if " serving " in line)
    assert "config='port=0 metrics_port=-1 max_sessions=1'" in serving, serving
    assert not any(line.lstrip().startswith("{") for line in lines), term
    assert '"max_batch"' not in term and "\\\"" not in term and "Traceback" not in term, term
    # stderr a pipe (a container, the Helm chart) and auto: one JSON object a line, the config a nested object.
    proc = subprocess.Popen([*CLI, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=clean_env())
    assert proc.stderr is not None
    try:
        for line in proc.stderr:
            rec = json.loads(line)
            if rec.get("event") == "serving":
                break
        else:
            pytest.fail("no serving line")
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0 and "Traceback" not in rest
    assert isinstance(rec["config"], dict) and rec["config"]["max_sessions"] == 1 and rec["config"]["max_batch"] == 16
    assert rec["config"]["log_format"] == "auto"
    assert all(json.loads(line)["event"] for line in rest.splitlines() if line.strip())
    # --log-format console on a pipe, and the older AVATARFORCING_LOG_JSON=0 (console) still understood.
    for extra, env in ((["--log-format", "console"], clean_env()), ([], clean_env(AVATARFORCING_LOG_JSON="0"))):
        proc = subprocess.Popen([*CLI, *args, *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                env=env)
        assert proc.stderr is not None
        first = proc.stderr.readline()
        while " serving " not in first and first:
            first = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert " serving " in first and not first.startswith("{") and "config=" in first, first


def test_demo_on_a_terminal_espeak_22050_hz_into_a_new_folder(tmp_path: Path) -> None:
    """The first screen of `avatarforcing demo` at a terminal: readable lines, no JSON; espeak-ng's default WAV
    (22,050 Hz) goes through; --out in folders that do not exist yet."""
    wav = espeak_wav(tmp_path / "espeak.wav")
    samples, rate = read_wav(wav)
    assert rate == 22050
    out = tmp_path / "not" / "yet" / "there" / "demo.mp4"
    rc, stdout, term = run_on_terminal(["demo", "--wav", str(wav), "--out", str(out), "--encoding", "jpeg"],
                                       clean_env())
    assert rc == 0, term + stdout
    assert "Traceback" not in term and not any(line.lstrip().startswith("{") for line in term.splitlines()), term
    assert max(len(line) for line in term.splitlines()) < 600, term
    assert "config='port=0 metrics_port=-1'" in term and "wrote" in stdout and "END_REASON_END_OF_AUDIO" in stdout
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.sample_rate == 22050
        frames = sum(1 for _ in c.decode(video=0))
    assert frames >= samples.shape[0] / rate * 25


# ---- gRPC errors: one line with the status and the message -----------------------------------------------------------
async def test_cli_commands_turn_server_errors_into_one_line(make_app: AppFactory, tmp_path: Path) -> None:
    authed = await make_app(auth_tokens=f"alice:{ALICE}")
    plain = await make_app()
    face = tmp_path / "face.png"
    face.write_bytes(png_bytes())
    wav = tmp_path / "s.wav"
    avatarforcing_client.write_wav(wav, speechlike_pcm(0.5), 16000)
    demo = ["demo", "--wav", str(wav), "--image", str(face), "--out", str(tmp_path / "o.mp4")]

    rc, _, err = await run_cli_async(*demo, "--connect", f"127.0.0.1:{authed.port}")
    assert rc == 1 and one_line(err).startswith("avatarforcing demo: error: UNAUTHENTICATED: "), err
    rc, _, err = await run_cli_async("drain", "--target", f"127.0.0.1:{authed.port}", "--token", ALICE)
    assert rc == 1 and one_line(err).startswith("avatarforcing drain: error: PERMISSION_DENIED: "), err
    assert not authed.draining
    (tmp_path / "junk.png").write_bytes(b"this is no image")
    junk = [*demo[:3], "--image", str(tmp_path / "junk.png"), *demo[5:]]
    rc, _, err = await run_cli_async(*junk, "--connect", f"127.0.0.1:{plain.port}")
    assert rc == 1 and one_line(err).startswith("avatarforcing demo: error: INVALID_ARGUMENT: "), err
    closed = plain.port
    await plain.stop(grace=0.1)
    rc, _, err = await run_cli_async(*demo, "--connect", f"127.0.0.1:{closed}")
    assert rc == 1 and one_line(err).startswith("avatarforcing demo: error: UNAVAILABLE: "), err
    rc, _, err = await run_cli_async("drain", "--target", f"127.0.0.1:{closed}")
    assert rc == 1 and one_line(err).startswith("avatarforcing drain: error: UNAVAILABLE: "), err


def test_paths_that_cannot_be_used_are_named_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = run_cli("demo", "--out", str(blocker / "sub" / "demo.mp4"))
    line = one_line(r.stderr)
    assert r.returncode == 1 and line.startswith("avatarforcing demo: error: "), line
    assert f"cannot create the folder for {blocker / 'sub' / 'demo.mp4'}: Not a directory" in line, line
    missing = tmp_path / "nowhere.wav"
    r = run_cli("demo", "--wav", str(missing), "--out", str(tmp_path / "o.mp4"))
    assert r.returncode == 1 and str(missing) in one_line(r.stderr), r.stderr


# ---- sample rates and WAVs through the real server -------------------------------------------------------------------
async def _stream(target: str, wav: Path, out: Path) -> tuple[int, int, int]:
    """stream_wav of ``wav`` at its own rate (ASAP) recorded into ``out``: (rate, frames, AudioOut samples)."""
    samples, rate = read_wav(wav)
    async with AvatarForcingClient(target) as client:
        async with client.session(image=png_bytes(), sample_rate=rate, video_encoding=pb.VIDEO_ENCODING_JPEG,
                                  pacing=pb.PACING_ASAP) as s:
            assert s.started.audio_sample_rate_hz == rate
            sender = asyncio.create_task(s.stream_wav(wav, realtime=False))
            stats = await record_session(s, out)
            assert await sender == samples.shape[0]
    assert stats.end_reason == pb.END_REASON_END_OF_AUDIO, stats.end_message
    return rate, stats.frames, stats.audio_samples


async def test_espeak_22050_and_a_44100_stereo_wav_through_the_server(make_app: AppFactory, tmp_path: Path) -> None:
    app = await make_app()
    target = f"127.0.0.1:{app.port}"
    info = await _info(target)
    assert {22050, 44100, 16000, 48000} <= set(info.supported_sample_rates_hz)
    espeak = espeak_wav(tmp_path / "espeak.wav", "Hi.")
    stereo, frames = stereo_wav(tmp_path / "stereo.wav")
    mono, rate = read_wav(stereo)  # mixed down: the mean of the two channels
    assert rate == 44100 and mono.shape == (frames.shape[0],)
    assert np.abs(mono.astype(np.float64) - frames.astype(np.float64).mean(1)).max() <= 0.5
    for wav, want_rate in ((espeak, 22050), (stereo, 44100)):
        out = tmp_path / "sdk" / f"{want_rate}" / "x.mp4"  # record_session creates the folders
        got_rate, n_frames, n_audio = await _stream(target, wav, out)
        seconds = read_wav(wav)[0].shape[0] / want_rate
        blocks = int(np.ceil(seconds * 25 / 4))
        assert got_rate == want_rate and n_frames == blocks * 4 and n_audio == n_frames * want_rate // 25
        with av.open(str(out)) as c:
            assert c.streams.audio[0].codec_context.sample_rate == want_rate
    # The demo takes the same files (the CLI, against this server).
    for wav, want_rate in ((espeak, 22050), (stereo, 44100)):
        out = tmp_path / "demo" / f"{want_rate}.mp4"
        rc, stdout, err = await run_cli_async("demo", "--connect", target, "--wav", str(wav), "--out", str(out),
                                              "--encoding", "jpeg")
        assert rc == 0 and "END_REASON_END_OF_AUDIO" in stdout and "Traceback" not in err, err
        with av.open(str(out)) as c:
            assert c.streams.audio[0].codec_context.sample_rate == want_rate


async def _info(target: str) -> pb.ServerInfo:
    async with AvatarForcingClient(target) as client:
        return await client.server_info()


async def test_rates_refused_where_they_can_be_told(make_app: AppFactory) -> None:
    app = await make_app()
    async with AvatarForcingClient(f"127.0.0.1:{app.port}") as client:
        for bad in (7999, 96000, 0):  # the SDK refuses these before any RPC
            with pytest.raises(ValueError, match="from 8000 to 48000 Hz"):
                client.session(image=png_bytes(), sample_rate=bad)
        # 22,051 Hz is in range but gives no whole number of samples per frame at 25 fps: the server says so.
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async with client.session(image=png_bytes(), sample_rate=22051):
                pass
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "882.04 samples per video frame at 25 fps" in (ei.value.details() or "")


# ---- the metrics port: /metrics, /healthz, /readyz, 404 -------------------------------------------------------------
def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_metrics_port_serves_metrics_healthz_readyz_and_404(make_app: AppFactory) -> None:
    app = await make_app()
    port = app.metrics_port

    async def get(path: str) -> tuple[int, str]:
        return await asyncio.to_thread(_get, port, path)

    status, body = await get("/metrics")
    assert status == 200 and "avatarforcing_sessions_capacity 4.0" in body
    assert "_created" not in body and "avatarforcing_frames_emitted_total" in body
    assert await get("/healthz") == (200, "ok\n")
    assert await get("/readyz") == (200, "SERVING\n")
    for path in ("/", "/metricsx", "/health", "/readyz/x"):
        assert (await get(path))[0] == 404, path
    await app.drain(30.0)  # health NOT_SERVING: ready no more, alive still
    assert await get("/readyz") == (503, "NOT_SERVING\n")
    assert await get("/healthz") == (200, "ok\n")
    assert (await get("/metrics"))[0] == 200
