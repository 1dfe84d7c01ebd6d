"""Ratios to the monoliths and the ideal, the machine's description, and the results JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

from amp4ec.bench.configs import MATCHED
from amp4ec.bench.results import BenchResults, Comparison, Machine, MeasuredPlan, StandardResult

__all__ = ["machine", "read_json", "summarise", "write_json"]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def summarise(config: StandardResult) -> StandardResult:
    """Each measured strategy with its ratios to both monoliths and its fraction of the ideal."""
    ok = config.ok_strategies()
    matched, monolith = ok.get(MATCHED), ok.get("monolith")

    def summarised(result: MeasuredPlan) -> MeasuredPlan:
        return replace(
            result,
            fraction_of_ideal=_ratio(result.saturation.rps, config.ideal.rps),
            vs_matched_monolith=None if matched is None else _compare(result, matched),
            vs_monolith=None if monolith is None else _compare(result, monolith),
        )

    strategies = {
        k: summarised(v) if isinstance(v, MeasuredPlan) else v for k, v in config.strategies.items()
    }
    return replace(config, strategies=strategies)


def _compare(result: MeasuredPlan, base: MeasuredPlan) -> Comparison:
    """result / base: below 1 is better for latencies, above 1 better for throughput."""
    return Comparison(
        single_latency=_ratio(result.single_ms.p50, base.single_ms.p50),
        open_p95=_ratio(result.open_loop.p95_ms, base.open_loop.p95_ms),
        throughput=_ratio(result.saturation.rps, base.saturation.rps),
    )


def machine() -> Machine:
    """The machine the figures came from."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch

    from amp4ec import __version__

    return Machine(
        cpu=model or platform.processor(),
        cores=len(os.sched_getaffinity(0)),
        memory_gb=round(memory / 2**30, 1),
        kernel=platform.release(),
        python=platform.python_version(),
        torch=torch.__version__,
        amp4ec=__version__,
    )


def _clean(value: Any) -> Any:
    """Non-finite floats become null: the file stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: BenchResults, path: Path) -> None:
    """``results.json`` (see [Note: results.json format] in results.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results.to_json()), indent=1, allow_nan=False))


def read_json(path: Path) -> BenchResults:
    """A ``results.json`` written by ``write_json``; ``ValueError`` naming the field that does not fit."""
    return BenchResults.from_json(json.loads(path.read_text()))
