"""``amp4ec bench --quick`` end to end: the output is complete and well-formed (never a timing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from amp4ec.bench.configs import STRATEGIES
from amp4ec.bench.markdown import BEGIN, END
from amp4ec.bench.plots import PLOTS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _positive(value: Any, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


def _finite(value: Any, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{what} = {value!r}"


def test_quick_bench_writes_complete_results_plots_and_docs(tmp_path: Path) -> None:
    out, docs = tmp_path / "out", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nwritten by someone else\n")
    # The tests' small residual net (a factory the bench allows as the user named it): the
    # output's shape is the same for any model, and its stages load in a fraction of
    # mobilenet_v2's time under the nodes' CPU quotas.
    model = ["--model", "tests.model_zoo:residual_net", "--input-shape", "1,3,16,16"]
    cmd = [sys.executable, "-m", "amp4ec", "bench", "--quick", *model]
    cmd += ["--out", str(out), "--docs", str(docs)]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    (config,) = results["configurations"]
    assert config["name"] == "standard" and config["status"] == "ok"
    # The paper's 1.0/0.6/0.4 CPU, scaled to fit this machine's cores less a 20% client headroom.
    cores = len(os.sched_getaffinity(0))
    factor = min(1.0, 0.8 * cores / 2.0)
    assert results["machine"]["cores"] == cores
    assert config["scale_factor"] == pytest.approx(factor)
    assert [n["paper_cpu"] for n in config["nodes"]] == [1.0, 0.6, 0.4]
    assert [n["cpu"] for n in config["nodes"]] == pytest.approx(
        [1.0 * factor, 0.6 * factor, 0.4 * factor], abs=1e-4
    )
    if factor < 1:
        assert f"scaled all shares by {factor:.2f}" in done.stdout
    else:
        assert "scaled all shares" not in done.stdout
    _positive(config["ideal"]["rps"], "ideal")
    assert len(config["ideal"]["per_node_rps"]) == len(config["nodes"]) == 3
    _positive(config["open_loop_rate_rps"], "open-loop rate")
    assert set(config["strategies"]) == set(STRATEGIES)
    for name, s in config["strategies"].items():
        assert s["status"] == "ok", (name, s.get("reason"))
        assert s["max_abs_diff"] < 1e-3, name
        for key in ("p50", "p95", "mean"):
            _positive(s["single_ms"][key], f"{name} single {key}")
        _positive(s["saturation"]["rps"], f"{name} saturation")
        ol = s["open_loop"]
        assert ol["completed"] + ol["dropped"] == ol["sent"] > 0
        if ol["completed"]:
            _positive(ol["p50_ms"], f"{name} open p50")
            _positive(ol["p95_ms"], f"{name} open p95")
        _positive(s["planning_ms"], f"{name} planning")
        _positive(s["fraction_of_ideal"], f"{name} fraction of ideal")
        _positive(s["vs_matched_monolith"]["throughput"], f"{name} vs matched")
        _positive(s["vs_monolith"]["throughput"], f"{name} vs monolith")
        _positive(s["overhead"]["agent_cpu_ms"], f"{name} agent CPU")
        _positive(s["overhead"]["forward_cpu_ms"], f"{name} forward CPU")
        _finite(s["overhead"]["overhead_cpu_ms"], f"{name} overhead")
        _positive(s["bytes_per_request"]["client"], f"{name} client bytes")
        assert s["bytes_per_request"]["total"] >= s["bytes_per_request"]["client"]
        assert s["stages"] and len(s["stages"]) == len(s["plan"])
        for stage in s["stages"]:
            _positive(stage["predicted_ms"], f"{name} predicted")
            # Dispatch by expected completion may leave a slow replica without a request in a
            # short run: no figure for it (null); the first pipeline always served.
            if stage["pipeline"] == 0 or stage["measured_ms"] is not None:
                _positive(stage["measured_ms"], f"{name} measured")
    matched = config["strategies"]["matched_monolith"]
    assert matched["plan"][0]["node"].startswith("matched")
    # More than one core (1.6 CPU on 2 cores): one thread, one intra-op thread per core and one
    # worker per core are all measured; on one core or less, only the first.
    tunings = 3 if 2.0 * factor > 1 else 1
    assert len(matched["tunings_rps"]) == tunings and all(r > 0 for r in matched["tunings_rps"].values())
    assert matched["saturation"]["rps"] == max(matched["tunings_rps"].values())

    # Mutual TLS (every figure above) against the same plans run --insecure (issue 10, item 9).
    assert set(config["transport"]) == {"optimal", "equal"}
    for name, t in config["transport"].items():
        assert t["hops"] >= 1
        for side in ("mtls", "insecure"):
            _positive(t[side]["rps"], f"{name} {side} rps")
            _positive(t[side]["single_p50_ms"], f"{name} {side} p50")
        _finite(t["throughput_loss_pct"], f"{name} loss")
        _finite(t["added_ms_per_hop"], f"{name} per hop")
        for side in ("mtls", "insecure"):
            _positive(t[side]["agent_cpu_ms"], f"{name} {side} agents' CPU")
        _finite(t["cpu_loss_pct"], f"{name} CPU loss")
        assert abs(t["added_cpu_ms"] - (t["mtls"]["agent_cpu_ms"] - t["insecure"]["agent_cpu_ms"])) < 1e-9
    assert config["transport"]["equal"]["hops"] == 3

    for plot in PLOTS:
        assert (out / plot).read_bytes()[:8] == PNG, plot
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by someone else\n")
    table = text[text.index(BEGIN) : text.index(END)]
    for label in ("optimal (ours)", "paper (RALOS)", "replicate", "monolith, resource-matched"):
        assert f"| {label} |" in table or f"| {label} (= " in table
    assert "Default strategy (optimal):" in table and "Stage-time prediction error:" in table
    assert "Resource-matched monolith tunings" in table
    assert "Mutual TLS against --insecure (same plans): optimal (ours) " in table
    assert results["transport"] == "mutual TLS" and "gRPC: mutual TLS on every hop." in table
