"""The slow-links compression rows are judged against issue 15's targets in the report."""

from __future__ import annotations

from amp4ec.bench.configs import COMPRESSED, configurations
from amp4ec.bench.markdown import _compression, _plan
from amp4ec.slicing import ModelSource


def _row(rps: float, single: float, error: dict | None = None) -> dict:
    out = {"status": "ok", "saturation": {"rps": rps}, "single_ms": {"p50": single}}
    if error is not None:
        out["output_error"] = error
    return out


def test_slow_links_measures_compression_both_ways() -> None:
    (slow,) = configurations(ModelSource("mobilenet_v2"), only=("slow-links",))
    assert {"optimal", *COMPRESSED} <= set(slow.strategies)
    assert COMPRESSED["optimal_fp16"] == (("fp16",), 1e-3)


def test_targets_met_and_missed_are_said() -> None:
    ok = {
        "optimal": _row(4.0, 400.0),
        "optimal_fp16": _row(6.0, 390.0, {"rel_l2_max": 2e-4, "inputs": 8, "top1_agreement": 1.0}),
        "optimal_int8": _row(8.0, 410.0, {"rel_l2_max": 3e-2, "inputs": 8, "top1_agreement": 0.875}),
    }
    fp16, int8 = _compression(ok)
    assert "1.50×, target ≥ 1.8×: missed" in fp16 and "target ≤ 0.001: met" in fp16 and "no worse" in fp16
    assert "2.00×, target ≥ 1.8×: met" in int8 and "target ≤ 0.02: missed" in int8 and "88%" in int8
    assert "slower" in int8
    ok["optimal_fp16"].pop("output_error")
    assert "no cut compressed" in _compression(ok)[0]
    plan = {"plan": [{"pipeline": 0, "node": "a", "first_block": 0, "last_block": 3, "out_codec": "int8"}]}
    assert _plan(plan) == "a[0–3] (int8)"
