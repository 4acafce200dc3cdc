"""The Grafana dashboard is current and only queries metrics the service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from avatarforcing_service.telemetry import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_dashboard_is_generated_and_uses_real_metric_names() -> None:
    import runpy

    mod = runpy.run_path(str(ROOT / "scripts" / "make_dashboard.py"))
    committed = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    assert committed == mod["dashboard"](), "docs/grafana-dashboard.json is stale: run scripts/make_dashboard.py"
    exported = set()
    for fam in Metrics().registry.collect():
        for s in fam.samples:
            exported.add(s.name)
        exported.add(fam.name)
        if fam.type == "counter":
            exported.add(fam.name + "_total")
    used = {m for p in committed["panels"] for t in p["targets"]
            for m in re.findall(r"avatarforcing_[a-z_]+", t["expr"])}
    assert used and used <= exported, used - exported
