"""Helpers the tools share: the CLI's server settings, the bundled assets, free ports and waiting for one."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import socket
import subprocess
import time
from pathlib import Path

from avatarforcing_service.config import ServerConfig


def server_config(a: argparse.Namespace, **extra: object) -> ServerConfig:
    """The server settings from parsed CLI flags (those left unset fall back to the environment, then defaults)."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names and v is not None}
    kw.update({k: v for k, v in extra.items() if v is not None})
    return ServerConfig.from_env(**kw)


def assets_dir() -> Path:
    """The engine package's assets, found without importing it (that would import torch)."""
    spec = importlib.util.find_spec("avatarforcing")
    assert spec is not None and spec.origin is not None, "the avatarforcing package is not installed"
    return Path(spec.origin).resolve().parent / "assets"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 120.0) -> None:
    """Waits until something listens on 127.0.0.1:port; fails early if ``proc`` exits."""
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"server did not listen on {port} within {timeout} s")


async def port_up(port: int, timeout: float) -> None:
    """Waits (without blocking the event loop) until something listens on 127.0.0.1:port."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def histogram_quantile(body: str, name: str, q: float) -> float:
    """The q-quantile of a Prometheus histogram in a /metrics body, interpolated in its bucket (nan: empty)."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(body):
        if fam.name == name:
            buckets = sorted((float(s.labels["le"]), s.value) for s in fam.samples if s.name.endswith("_bucket"))
            total = buckets[-1][1]
            if total == 0:
                return float("nan")
            prev_le, prev_c = 0.0, 0.0
            for le, c in buckets:
                if c >= q * total:
                    if le == float("inf"):
                        return prev_le
                    return prev_le + (le - prev_le) * ((q * total - prev_c) / max(c - prev_c, 1e-9))
                prev_le, prev_c = le, c
    return float("nan")
