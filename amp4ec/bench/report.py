"""Ratios to the monoliths and the ideal, the machine's description, and the results JSON."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from amp4ec.bench.configs import MATCHED

__all__ = ["machine", "ok_strategies", "summarise", "write_json"]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b


def ok_strategies(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in config.get("strategies", {}).items() if v.get("status") == "ok"}


def summarise(config: dict[str, Any]) -> None:
    """Add, to each measured strategy, its ratios to both monoliths and its fraction of the ideal."""
    ok = ok_strategies(config)
    ideal = config.get("ideal", {}).get("rps")
    for result in ok.values():
        result["fraction_of_ideal"] = _ratio(result["saturation"]["rps"], ideal)
        for base_name in (MATCHED, "monolith"):
            base = ok.get(base_name)
            key = "vs_matched_monolith" if base_name == MATCHED else "vs_monolith"
            result[key] = None if base is None else _compare(result, base)


def _compare(result: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """result / base: below 1 is better for latencies, above 1 better for throughput."""
    return {
        "single_latency": _ratio(result["single_ms"]["p50"], base["single_ms"]["p50"]),
        "open_p95": _ratio(result["open_loop"]["p95_ms"], base["open_loop"]["p95_ms"]),
        "throughput": _ratio(result["saturation"]["rps"], base["saturation"]["rps"]),
    }


def machine() -> dict[str, Any]:
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

    return {
        "cpu": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(memory / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "amp4ec": __version__,
    }


def _clean(value: Any) -> Any:
    """Non-finite floats become null: the file stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=1, allow_nan=False))
