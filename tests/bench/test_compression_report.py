"""The slow-links compression rows are judged against issue 15's targets in the report."""

from __future__ import annotations

from dataclasses import replace

from amp4ec.bench.configs import COMPRESSED, configurations
from amp4ec.bench.markdown import _compression, _plan
from amp4ec.bench.results import ErrorFigures, PlanRow
from amp4ec.slicing import ModelSource
from tests.bench.samples import measured_plan


def test_slow_links_measures_compression_both_ways() -> None:
    (slow,) = configurations(ModelSource("mobilenet_v2"), only=("slow-links",))
    assert {"optimal", *COMPRESSED} <= set(slow.strategies)
    assert COMPRESSED["optimal_fp16"] == (("fp16",), 1e-3)


def test_targets_met_and_missed_are_said() -> None:
    ok = {
        "optimal": measured_plan(4.0, 400.0),
        "optimal_fp16": measured_plan(6.0, 390.0, ErrorFigures(8, 2e-4, 1e-4, 1.0)),
        "optimal_int8": measured_plan(8.0, 410.0, ErrorFigures(8, 3e-2, 1e-2, 0.875)),
    }
    fp16, int8 = _compression(ok)
    assert "1.50×, target ≥ 1.8×: missed" in fp16 and "target ≤ 0.001: met" in fp16 and "no worse" in fp16
    assert "2.00×, target ≥ 1.8×: met" in int8 and "target ≤ 0.02: missed" in int8 and "88%" in int8
    assert "slower" in int8
    ok["optimal_fp16"] = replace(ok["optimal_fp16"], output_error=None)
    assert "no cut compressed" in _compression(ok)[0]
    assert _plan([PlanRow(0, 0, "a", 0, 3, "int8")]) == "a[0–3] (int8)"
