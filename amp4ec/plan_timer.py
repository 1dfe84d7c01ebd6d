"""Times the planner: every process plans through ``timed_plan``, observed in a histogram.

The planner itself stays pure (no prometheus import); this is the one place its time is measured,
into ``amp4ec_scheduler_overhead_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Histogram

from amp4ec import planner
from amp4ec.planner.types import LayerProfile, NodeCapacity, Plan

__all__ = ["SCHEDULER_OVERHEAD", "timed_plan"]

SCHEDULER_OVERHEAD = Histogram(
    "amp4ec_scheduler_overhead_seconds",
    "Wall time of one planning call (partitioning plus node selection), per deployment.",
    ["namespace", "deployment", "strategy"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)


def timed_plan(
    blocks: Sequence[LayerProfile],
    nodes: Sequence[NodeCapacity],
    *,
    namespace: str = "",
    deployment: str = "local",
    **options: Any,
) -> tuple[Plan, float]:
    """``planner.plan(...)`` and its wall time in milliseconds (a failed call is observed too)."""
    start = time.perf_counter()
    try:
        return planner.plan(blocks, nodes, **options), (time.perf_counter() - start) * 1000
    finally:
        SCHEDULER_OVERHEAD.labels(namespace, deployment, options.get("strategy", "optimal")).observe(
            time.perf_counter() - start
        )
