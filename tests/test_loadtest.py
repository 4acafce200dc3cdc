"""The locustfile runs headless against a real local server; its CSV shows frames and no failures."""

from __future__ import annotations

import asyncio
import csv
import sys
from pathlib import Path

from .test_server import AppFactory, wait_free

ROOT = Path(__file__).resolve().parent.parent


async def test_locust_headless_run_reports_frames_without_failures(make_app: AppFactory, tmp_path: Path) -> None:
    app = await make_app()
    prefix = tmp_path / "load"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "2",
        "-r", "2", "-t", "6s", "--host", f"127.0.0.1:{app.port}", "--csv", str(prefix), "--html",
        str(tmp_path / "load.html"), "--only-summary", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert int(rows["frame_latency"]["Request Count"]) > 50, rows
    assert int(rows["inter_frame_gap"]["Request Count"]) > 50
    assert int(rows["time_to_first_frame"]["Request Count"]) == 2
    assert all(int(r["Failure Count"]) == 0 for r in rows.values()), rows
    assert (tmp_path / "load.html").stat().st_size > 0
    await wait_free(app)
