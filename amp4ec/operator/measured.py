"""Measured throughput and latency of a deployment (``status.measured``), from Prometheus.

Every request a pipeline answers passes its entry stage (stage 0) once, and the entry
stage alone observes ``amp4ec_request_seconds{node,code}``: a request's time from its
arrival to its answer, through every later stage. So one histogram gives both numbers:

- throughput = ``sum(rate(amp4ec_request_seconds_count{...,code="OK"}[window]))``, summed
  over every entry shard (replicated pipelines, and an old and a new plan during a switch);
- latency p50/p95 = ``histogram_quantile(q, sum by (le) (rate(..._bucket{...}[window])))``.

A deployment's series are selected by the ``namespace`` and ``deployment`` *target* labels,
which the scrape configuration derives from the shard Pod (its namespace and its
``amp4ec.io/deployment`` label), as the chart's PodMonitor does; the agent itself knows only
its node. Pure query building and parsing here; ``Prometheus.query`` does the I/O.

No traffic in the window (no series yet, a zero rate, a NaN quantile) gives no numbers at
all: ``status.measured`` then holds only ``window`` and ``observedAt``, never invented zeros.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "METRIC",
    "NUMBERS",
    "measured_queries",
    "measured_status",
    "scalar",
    "valid_window",
]

METRIC = "amp4ec_request_seconds"
"""The entry stage's end-to-end histogram (``amp4ec/node_agent/metrics.py``)."""

NUMBERS = ("throughputRps", "latencyP50Ms", "latencyP95Ms")
"""The keys of ``status.measured`` that carry measurements (absent without traffic)."""

_QUANTILES = {"latencyP50Ms": 0.5, "latencyP95Ms": 0.95}
_DURATION = re.compile(r"^([0-9]+(ms|[smhdwy]))+$")


def valid_window(window: str) -> bool:
    """A PromQL range duration such as ``30s``, ``2m`` or ``1h30m``."""
    return bool(_DURATION.match(window)) and any(c != "0" for c in re.sub(r"[a-z]", "", window))


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def measured_queries(namespace: str, name: str, window: str) -> dict[str, str]:
    """PromQL per ``status.measured`` key; throughput in requests/s, latencies in seconds."""
    if not valid_window(window):
        raise ValueError(f"window: expected a PromQL duration like 2m or 30s, got {window!r}")
    selector = f'namespace={_quote(namespace)},deployment={_quote(name)},code="OK"'
    queries = {"throughputRps": f"sum(rate({METRIC}_count{{{selector}}}[{window}]))"}
    for key, q in _QUANTILES.items():
        queries[key] = f"histogram_quantile({q}, sum by (le) (rate({METRIC}_bucket{{{selector}}}[{window}])))"
    return queries


def scalar(result: Sequence[tuple[Mapping[str, str], float]]) -> float | None:
    """The one value of an aggregated instant vector; None when empty or not a finite number."""
    if len(result) != 1:
        return None
    value = result[0][1]
    return value if math.isfinite(value) else None


def measured_status(values: Mapping[str, float | None], window: str, observed_at: str) -> dict[str, Any]:
    """``status.measured`` from the query results (throughput in 1/s, latencies in s).

    Numbers only when requests were answered in the window; the other keys are None, which
    a merge patch turns into "absent" (an earlier measurement's numbers do not linger).
    """
    throughput = values.get("throughputRps")
    traffic = throughput is not None and throughput > 0
    out: dict[str, Any] = {key: None for key in NUMBERS}
    if traffic:
        out["throughputRps"] = round(throughput, 3)  # type: ignore[arg-type]
        for key in _QUANTILES:
            seconds = values.get(key)
            if seconds is not None and seconds >= 0:
                out[key] = round(1000.0 * seconds, 3)
    out["window"] = window
    out["observedAt"] = observed_at
    return out
