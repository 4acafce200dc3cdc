"""Test helpers for many replicas: a real redis-server on a free loopback port, replicas as
subprocesses (so that they can be killed with -9), TLS material made with openssl."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avatarforcing_tools.common import free_port

ROOT = Path(__file__).resolve().parents[1]


def _wait_port(port: int, up: bool, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not go {'up' if up else 'down'} within {timeout} s")


@dataclass
class RedisServer:
    """A real redis-server (the Debian package) on a free loopback port, no persistence."""

    binary: str
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, True, 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        _wait_port(self.port, False, 10)

    def info(self, section: str) -> dict[str, Any]:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        try:
            return dict(r.info(section))
        finally:
            r.close()

    def cli(self, *args: str) -> str:
        import redis

        r = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        try:
            return str(r.execute_command(*args))
        finally:
            r.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                              else None)
    if binary is None:
        pytest.skip("redis-server is not installed: scripts/bootstrap.sh installs the Debian package redis-server")
    srv = RedisServer(binary, tmp_path)
    srv.start()
    yield srv
    srv.stop()


@dataclass
class Replica:
    """`avatarforcing serve` in its own process."""

    port: int
    node_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_replica(redis_url: str, node_id: str, logdir: Path, *, max_sessions: int = 2,
                  extra_env: dict[str, str] | None = None) -> Replica:
    port = free_port()
    env = dict(os.environ, AVATARFORCING_REDIS_URL=redis_url, AVATARFORCING_NODE_ID=node_id, OMP_NUM_THREADS="1",
               AVATARFORCING_LOG_LEVEL="info", **(extra_env or {}))
    log = logdir / f"{node_id}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "avatarforcing_tools.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "-1", "--max-sessions", str(max_sessions), "--threads", "1", "--preset", "tiny",
         "--device", "cpu", "--grace", "1"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    return Replica(port, node_id, proc, log)


def wait_serving(rep: Replica, timeout: float = 120) -> None:
    """Until the replica answers SERVING (loading torch and the model takes a while on a busy CPU)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if rep.proc.poll() is not None:
            raise RuntimeError(f"replica {rep.node_id} exited ({rep.proc.returncode}):\n{rep.log.read_text()[-3000:]}")
        try:
            with grpc.insecure_channel(rep.address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"replica {rep.node_id} not serving after {timeout} s:\n{rep.log.read_text()[-3000:]}")


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(d: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=avatarforcing-test-ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")
