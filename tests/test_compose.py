"""docker-compose.yml, checked offline (no docker here): the services, their images and builds, that every
AVATARFORCING_* variable is a ServerConfig setting whose value loads, that the ports are the ones the server and
the page listen on, that the entrypoints parse with the real CLI, and that the healthcheck asks a path the metrics
port really serves (asked of a running server)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from avatarforcing_service.config import ServerConfig
from avatarforcing_service.server import App
from avatarforcing_tools import cli
from avatarforcing_tools.common import server_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
AppFactory = Callable[..., Awaitable[App]]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def dockerfile() -> tuple[list[str], set[int]]:
    text = (ROOT / "Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    expose = re.search(r"^EXPOSE (.*)$", text, re.M)
    assert entry and expose
    return yaml.safe_load(entry.group(1)), {int(p) for p in expose.group(1).split()}


def parse_cli(argv: list[str], command: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` (after the program name) through the real parser; the command itself is not run."""
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, f"cmd_{command}", lambda a: seen.append(a) or 0)
    assert cli.main(argv) == 0
    assert len(seen) == 1 and seen[0].cmd == command
    return seen[0]


def container_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port of ``ports: ["HOST:CONTAINER"]``."""
    out = {}
    for p in service.get("ports", []):
        host, container = str(p).split(":")
        out[int(container)] = int(host)
    return out


def test_services_images_and_builds(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "server", "view"}
    assert services["redis"]["image"].startswith("redis:")
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("server", "view"):
        assert services[name]["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert services[name]["image"] == f"avatarforcing-serve:{cli.version_text().split()[1]}"
    assert services["server"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["view"]["depends_on"]["server"]["condition"] == "service_healthy"


def test_server_environment_is_real_settings_that_load(compose: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    server = compose["services"]["server"]
    env = {k: interpolate(str(v)) for k, v in server["environment"].items()}
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    for key in env:
        assert key.startswith("AVATARFORCING_") and key[len("AVATARFORCING_"):].lower() in fields, key
    for key in list(os.environ):
        if key.startswith("AVATARFORCING_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The image's entrypoint and the compose command, through the real parser; then the configuration they load.
    entry, exposed = dockerfile()
    assert entry[:2] == ["avatarforcing", "serve"]
    a = parse_cli([*entry[1:], *server.get("command", [])], "serve", monkeypatch)
    cfg = server_config(a)
    assert cfg.host == "0.0.0.0" and cfg.log_format == "json"
    assert cfg.redis_url == "redis://redis:6379/0" and cfg.redis_url.split("//")[1].split(":")[0] in compose["services"]
    ports = container_ports(server)
    assert {cfg.port, cfg.metrics_port} <= set(ports) and {cfg.port, cfg.metrics_port} <= exposed
    assert cfg.advertise_address == f"localhost:{ports[cfg.port]}"  # the published gRPC port


def test_gpu_stanza_is_a_commented_device_reservation() -> None:
    text = COMPOSE.read_text()
    block = re.search(r"^    # deploy:\n((?:    #   .*\n)+)", text, re.M)
    assert block, "the server's commented `deploy:` block"
    uncommented = "deploy:\n" + "".join(line[6:] + "\n" for line in block.group(1).splitlines())
    devices = yaml.safe_load(uncommented)["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_view_runs_the_real_view_command_in_the_servers_network(compose: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    view = compose["services"]["view"]
    entry = view["entrypoint"]
    assert entry[:2] == ["avatarforcing", "view"]
    a = parse_cli(entry[1:], "view", monkeypatch)
    assert a.host == "0.0.0.0" and a.target == "server:50051"
    assert view["network_mode"] == "service:server" and "ports" not in view  # published by the server service
    assert a.port in container_ports(compose["services"]["server"])


async def test_healthcheck_asks_what_the_metrics_port_serves(compose: dict[str, Any], make_app: AppFactory) -> None:
    test = compose["services"]["server"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test[3])
    assert url and int(url.group(1)) == int(compose["services"]["server"]["environment"]["AVATARFORCING_METRICS_PORT"])
    app = await make_app()
    path = url.group(2)

    def get() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}{path}", timeout=10) as r:
            return int(r.status)

    assert await asyncio.to_thread(get) == 200
    # The same program the container runs (exit 0 means healthy), pointed at this server's port.
    program = test[3].replace(f":{url.group(1)}/", f":{app.metrics_port}/")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", program)
    assert await proc.wait() == 0
    await app.drain(30.0)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", program, stderr=asyncio.subprocess.DEVNULL)
    assert await proc.wait() != 0  # draining: unhealthy
