"""Writes docs/grafana-dashboard.json, the Grafana dashboard over the service's Prometheus metrics.

    .venv/bin/python scripts/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


def q(hist: str, quant: float) -> str:
    return f"histogram_quantile({quant}, sum by (le) (rate({hist}_bucket{{job=~\"$job\"}}[$__rate_interval])))"


def mean(hist: str) -> str:
    return (f"sum(rate({hist}_sum{{job=~\"$job\"}}[$__rate_interval])) / "
            f"sum(rate({hist}_count{{job=~\"$job\"}}[$__rate_interval]))")


PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Sessions", "short", [("active", 'sum(avatarforcing_sessions_active{job=~"$job"})'),
                           ("capacity", 'sum(avatarforcing_sessions_capacity{job=~"$job"})')]),
    ("Frames sent / dropped per second", "short", [
        ("sent", 'sum(rate(avatarforcing_frames_emitted_total{job=~"$job"}[$__rate_interval]))'),
        ("dropped", 'sum(rate(avatarforcing_frames_dropped_total{job=~"$job"}[$__rate_interval]))')]),
    ("Inter-frame gap (real time: 40 ms at 25 fps)", "s", [
        ("p50", q("avatarforcing_inter_frame_gap_seconds", 0.5)),
        ("p99", q("avatarforcing_inter_frame_gap_seconds", 0.99))]),
    ("Frame latency (audio received to frame sent)", "s", [
        ("p50", q("avatarforcing_frame_latency_seconds", 0.5)),
        ("p99", q("avatarforcing_frame_latency_seconds", 0.99))]),
    ("Time to first frame", "s", [("p50", q("avatarforcing_time_to_first_frame_seconds", 0.5)),
                                  ("p99", q("avatarforcing_time_to_first_frame_seconds", 0.99))]),
    ("Speech onset (a burst ahead of time to its first frame)", "s", [
        ("p50", q("avatarforcing_onset_latency_seconds", 0.5)),
        ("p99", q("avatarforcing_onset_latency_seconds", 0.99))]),
    ("Engine step duration", "s", [("p50", q("avatarforcing_step_duration_seconds", 0.5)),
                                   ("p99", q("avatarforcing_step_duration_seconds", 0.99)),
                                   ("encode mean", mean("avatarforcing_encode_duration_seconds"))]),
    ("Batch size (sessions per step)", "short", [("mean", mean("avatarforcing_batch_size"))]),
    ("Output queue depth (frames)", "short", [("p99", q("avatarforcing_output_queue_frames", 0.99))]),
    ("Drift: similarity of emitted blocks to the style anchor", "percentunit", [
        ("mean", mean("avatarforcing_anchor_similarity")),
        ("p10", q("avatarforcing_anchor_similarity", 0.1))]),
    ("Silence inserted for late audio (seconds per second)", "short", [
        ("silence", 'sum(rate(avatarforcing_silence_inserted_seconds_total{job=~"$job"}[$__rate_interval]))')]),
    ("Streams refused, by status", "short", [
        ("{{code}}", 'sum by (code) (rate(avatarforcing_sessions_rejected_total{job=~"$job"}[$__rate_interval]))')]),
    ("Sessions ended, by reason", "short", [
        ("{{reason}}", 'sum by (reason) (rate(avatarforcing_sessions_ended_total{job=~"$job"}[$__rate_interval]))')]),
]


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend,
                         "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                        for j, (legend, expr) in enumerate(targets)],
        })
    return {
        "title": "AvatarForcing Serve", "uid": "avatarforcing-serve", "schemaVersion": 39, "version": 1,
        "editable": True, "tags": ["avatarforcing"], "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "job", "type": "query", "label": "Job", "includeAll": True, "multi": True,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(avatarforcing_sessions_capacity, job)", "refresh": 2},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
