"""The Helm chart (helm/avatarforcing), validated offline.

scripts/install_helm_tools.sh builds the pinned helm, the helm-unittest plugin and kubeconform into
.tools/ and unpacks Kubernetes JSON schemas there (the first run compiles helm: minutes on 2 cores;
later runs are quick), then scripts/helm_check.sh lints, renders and schema-validates the chart with
every values file in helm/avatarforcing/ci/ and runs the chart's unit tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "avatarforcing"
TOOLS = Path(os.environ.get("HELM_TOOLS_DIR", ROOT / ".tools"))
INSTALL = ROOT / "scripts" / "install_helm_tools.sh"
CHECK = ROOT / "scripts" / "helm_check.sh"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    go_bin = "/usr/local/go/bin"  # where the Go tarball installs; not always on PATH
    if shutil.which("go", path=env.get("PATH")) is None and Path(go_bin, "go").exists():
        env["PATH"] = f"{env.get('PATH', '')}{os.pathsep}{go_bin}"
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def helm_tools() -> Path:
    """Installs (or finds) the pinned tools; returns the helm binary."""
    installed = (TOOLS / "bin" / "helm").exists()
    if shutil.which("go", path=_env()["PATH"]) is None and not installed and not os.environ.get("CI"):
        pytest.skip("the Go toolchain is needed to build helm (scripts/install_helm_tools.sh)")
    # A first install compiles for minutes: stream its progress to the terminal past pytest's capture.
    proc = subprocess.Popen(["bash", str(INSTALL)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    terminal = sys.__stderr__ or sys.stderr
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not installed:
            terminal.write(line)
            terminal.flush()
    rc = proc.wait(timeout=3000)
    assert rc == 0, f"install_helm_tools.sh failed ({rc}):\n{''.join(lines)}"
    return TOOLS / "bin" / "helm"


def test_helm_chart_lint_template_schemas_and_unittests(helm_tools: Path) -> None:
    r = _run(["bash", str(CHECK)], timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"helm_check.sh failed ({r.returncode}):\n{out}"
    values_files = sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
    assert len(values_files) >= 5, values_files
    for name in values_files:
        assert f"== {name}" in out, f"{name} was not checked:\n{out}"
    # every rendered manifest set was validated (against each Kubernetes version); only ServiceMonitor skipped
    validations = [line for line in out.splitlines() if line.strip().startswith("kubeconform ")]
    assert len(validations) >= len(values_files), out
    assert all("Invalid: 0, Errors: 0" in line for line in validations), out
    assert "Skipped: 1" in out and "ServiceMonitor x1" in out, out
    assert "helm_check: OK" in out, out
    assert "Tests:" in out and "failed" not in out.split("== helm unittest", 1)[1], out


def test_values_schema_rejects_a_negative_max_sessions(helm_tools: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("server:\n  maxSessions: -1\n")
    r = _run([str(helm_tools), "template", "avatarforcing", str(CHART), "-f", str(bad)], timeout=120)
    assert r.returncode != 0, f"helm template accepted maxSessions: -1:\n{r.stdout}"
    assert "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert "/server/maxSessions" in r.stderr and "minimum" in r.stderr, r.stderr


def test_values_schema_accepts_the_documented_defaults(helm_tools: Path) -> None:
    r = _run([str(helm_tools), "template", "avatarforcing", str(CHART)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "kind: Deployment" in r.stdout and "nvidia.com/gpu: 1" in r.stdout
