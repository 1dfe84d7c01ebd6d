"""The typed bench results: results.json round trip, its key format, and bad files named by field."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from amp4ec.bench.json_form import from_json, to_json
from amp4ec.bench.markdown import render
from amp4ec.bench.report import read_json, write_json
from amp4ec.bench.results import BenchResults, MeasuredPlan, StandardResult
from tests.bench.samples import every_kind, measured_plan


def test_every_kind_survives_results_json(tmp_path: Path) -> None:
    results = every_kind()
    write_json(results, tmp_path / "results.json")
    assert read_json(tmp_path / "results.json") == results
    assert render(read_json(tmp_path / "results.json")) == render(results)


def test_the_json_keeps_its_keys() -> None:
    """Optional parts that were absent stay absent; the discriminators are where readers look."""
    data = every_kind().to_json()
    assert data["schema"] == 1 and data["machine"]["cores"] == 2
    standard, failover, tenants, latency, batching, skipped = data["configurations"]
    assert "kind" not in standard and standard["status"] == "ok"
    assert [c["kind"] for c in (failover, tenants, latency, batching)] == [
        "failover",
        "multi-tenant",
        "latency",
        "batching",
    ]
    assert skipped == {"name": "slow-links", "status": "skipped", "reason": "needs root"}
    optimal, matched = standard["strategies"]["optimal"], standard["strategies"]["matched_monolith"]
    assert "output_error" not in optimal and "same_plan_as" not in optimal and "tuning" not in optimal
    assert optimal["vs_monolith"] is None and optimal["vs_matched_monolith"]["throughput"] == 1.2
    assert matched["tunings_rps"] == {"1 thread(s) x 1 worker(s)": 10.0, "2 thread(s) x 1 worker(s)": None}
    assert standard["strategies"]["paper"] == {"status": "infeasible", "reason": "no node holds block 3"}
    assert "out_codec" not in optimal["plan"][0] and optimal["stages"][0]["measured_ms"] == 97.0
    assert standard["strategies"]["optimal_fp16"]["plan"][0]["out_codec"] == "fp16"
    assert standard["links"] == {"rate_mbit": 20.0, "delay_ms": 10.0}
    assert "paper_cpu" not in standard["matched"] and standard["nodes"][0]["paper_cpu"] == 1.0
    assert optimal["open_loop"]["p95_ms"] == 150.0 and optimal["batching"]["max_requests"] == 1
    assert latency["plans"]["latency_objective"]["plan"][0]["tiles"][0]["rows"] == [[0, 5], [5, 10]]
    assert batching["predicted"]["batched"] == {"saturation_rps": 120.0}
    assert batching["predicted"]["unbatched"]["expected_batches"] == [1.0, 1.0]
    no_links = replace(every_kind().configurations[0], links=None, transport=None)
    assert "links" not in to_json(no_links) and "transport" not in to_json(no_links)


def test_non_finite_figures_are_null_in_the_file_and_nan_when_read(tmp_path: Path) -> None:
    plan = measured_plan()
    nan = replace(plan, overhead=replace(plan.overhead, overhead_fraction=float("nan")))
    results = every_kind()
    standard = results.configurations[0]
    assert isinstance(standard, StandardResult)
    strategies = {**standard.strategies, "optimal": nan}
    results = replace(results, configurations=(replace(standard, strategies=strategies),))
    write_json(results, tmp_path / "results.json")
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["configurations"][0]["strategies"]["optimal"]["overhead"]["overhead_fraction"] is None
    back = read_json(tmp_path / "results.json").configurations[0]
    assert isinstance(back, StandardResult)
    read = back.strategies["optimal"]
    assert isinstance(read, MeasuredPlan) and math.isnan(read.overhead.overhead_fraction)


def test_a_file_that_does_not_fit_names_the_field() -> None:
    data = every_kind().to_json()
    del data["configurations"][0]["strategies"]["optimal"]["saturation"]["rps"]
    with pytest.raises(
        ValueError, match=r"^results\.configurations\[0\]\.strategies\.optimal\.saturation\.rps: missing$"
    ):
        BenchResults.from_json(data)
    data = every_kind().to_json()
    data["configurations"][1]["requests"] = "many"
    with pytest.raises(ValueError, match=r"configurations\[1\]\.requests: expected int, got 'many'"):
        BenchResults.from_json(data)
    data["configurations"][1]["kind"] = "unknown"
    with pytest.raises(ValueError, match=r"configurations\[1\]: none of StandardResult, .* fits"):
        BenchResults.from_json(data)
    with pytest.raises(ValueError, match="results: expected an object, got list"):
        from_json(BenchResults, [])
