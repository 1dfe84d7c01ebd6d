"""The failover configuration: its recovery figures on plain data, and ``amp4ec bench --only failover``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amp4ec.bench.failover import TARGET_S, recovery

ROOT = Path(__file__).resolve().parents[2]


def _answers(rate: float, start: float, end: float, latency: float = 0.02) -> list[tuple[float, float]]:
    n = round((end - start) * rate)
    return [(start + i / rate - latency, start + i / rate) for i in range(1, n + 1)]


def test_recovery_figures_from_answer_times() -> None:
    # 100 req/s until the fault at 10 s, nothing for 2 s, then 60 req/s; one request stuck 2 s.
    samples = _answers(100, 0, 10) + _answers(60, 12, 30) + [(9.9, 12.0)]
    figures = recovery(samples, fault_s=10.0, concurrency=3)
    assert figures.rps_before == pytest.approx(100, rel=0.02)
    assert figures.rps_after == pytest.approx(60, rel=0.02)
    assert 1.9 <= figures.to_full_s <= 2.0  # the first 1 s window at ≥ 90% starts ~2 s in
    assert figures.max_window_ms == pytest.approx(2100)
    assert figures.p99_before_ms == pytest.approx(20)
    # Too few answers after the fault: no figure rather than a wrong one.
    assert recovery(_answers(100, 0, 10), fault_s=10.0, concurrency=3).to_full_s is None


@pytest.mark.slow
def test_bench_only_failover_loses_no_request(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "amp4ec", "bench", "--quick", "--only", "failover"]
    cmd += ["--input-shape", "1,3,64,64", "--out", str(out), "--no-docs"]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (config,) = json.loads((out / "results.json").read_text())["configurations"]
    assert config["name"] == "failover" and config["status"] == "ok"
    assert [(s["strategy"], s["fault"]) for s in config["scenarios"]] == [
        ("optimal", "kill"),
        ("equal", "hang"),
    ]
    for s in config["scenarios"]:
        assert s["status"] == "ok", s.get("reason")
        assert s["lost"] == 0 and s["answered"] == s["requests"], s["errors"]
        assert s["node"] not in {row["node"] for row in s["plan_after"]}
        for key in ("detected_after_s", "serving_after_s", "to_full_s", "p99_window_ms", "rps_after"):
            assert isinstance(s[key], (int, float)) and math.isfinite(s[key]) and s[key] >= 0, (key, s[key])
        assert s["target_s"] == TARGET_S[s["strategy"]]
    assert config["scenarios"][1]["replanned"] is True
    assert "| equal (node0[0–6] → node1[7–13] → node2[14–20]) | node1 hang | 0 of 400 |" in done.stdout
