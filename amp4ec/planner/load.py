"""Latency under load: the join-the-shortest-expected-delay model the client dispatches by.

[Note: expected completion] A request sent to a pipeline with ``n`` requests in flight is
expected to answer after ``latency + n × interval``: ``latency`` is what the pipeline takes
when idle (its stages end to end) and ``interval`` the time between its answers when busy
(its slowest stage). Each earlier request ahead holds the bottleneck for one interval. The
client sends each request to the pipeline with the smallest expected completion
(``amp4ec.dispatch``, with both terms learnt from answers and seeded from the plan), and
``latency_under_load`` predicts a plan's latency percentiles at an arrival rate with the
same rule, so prediction and dispatch agree.

Least-in-flight dispatch ignores speed: on nodes of 0.8/0.48/0.32 CPU it keeps sending to
the slowest replica as soon as it has no more requests than the others, where the request
waits ~3× as long as it would behind one request on the fastest.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from amp4ec.errors import InvalidSpec
from amp4ec.planner.types import Pipeline, Plan

__all__ = ["LoadPrediction", "expected_completion_ms", "latency_under_load", "pipeline_times"]


def expected_completion_ms(latency_ms: float, interval_ms: float, in_flight: int) -> float:
    """When a request sent now should answer (see [Note: expected completion])."""
    return latency_ms + in_flight * interval_ms


def pipeline_times(pipeline: Pipeline) -> tuple[float, float]:
    """(latency, interval) the cost model predicts for ``pipeline``: its stages end to end, and
    its slowest stage's interval between requests (the seeds of the client's estimates)."""
    return math.fsum(s.stage_ms for s in pipeline.stages), max(s.interval_ms for s in pipeline.stages)


@dataclass(frozen=True)
class LoadPrediction:
    rate_rps: float
    p50_ms: float
    p95_ms: float
    mean_ms: float
    shares: tuple[float, ...]
    """Fraction of requests each pipeline gets, in plan order."""


def latency_under_load(plan: Plan, rate_rps: float, requests: int = 2000, seed: int = 0) -> LoadPrediction:
    """Latency percentiles of ``plan`` under Poisson arrivals at ``rate_rps``, each request sent
    to the pipeline of smallest expected completion: a deterministic simulation (seeded
    arrivals, every stage taking its predicted time, first come first served at each stage)."""
    if not rate_rps > 0 or math.isinf(rate_rps):
        raise InvalidSpec(f"rate_rps: expected a positive finite rate, got {rate_rps!r}")
    if requests < 1:
        raise InvalidSpec(f"requests: expected at least 1, got {requests}")
    # A stage takes the next request ``interval_ms`` after this one (a tiled stage's busiest
    # node frees up before the request has been stitched), and answers after ``stage_ms``.
    stages = [[(s.stage_ms, s.interval_ms) for s in p.stages] for p in plan.pipelines]
    seeds = [pipeline_times(p) for p in plan.pipelines]
    free = [[0.0] * len(s) for s in stages]
    """Per pipeline and stage, when it finishes the work it has been given."""
    pending: list[list[float]] = [[] for _ in stages]
    """Per pipeline, a heap of its in-flight requests' completion times."""
    rng = random.Random(seed)
    now, latencies, counts = 0.0, [], [0] * len(stages)
    for _ in range(requests):
        now += rng.expovariate(rate_rps / 1000.0)
        for heap in pending:
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        p = min(
            range(len(stages)),
            key=lambda i: (expected_completion_ms(*seeds[i], len(pending[i])), len(pending[i])),
        )
        t = now
        for k, (ms, interval) in enumerate(stages[p]):
            start = max(t, free[p][k])
            free[p][k] = start + interval
            t = start + ms
        heapq.heappush(pending[p], t)
        latencies.append(t - now)
        counts[p] += 1
    ordered = sorted(latencies)
    return LoadPrediction(
        rate_rps=rate_rps,
        p50_ms=_quantile(ordered, 0.5),
        p95_ms=_quantile(ordered, 0.95),
        mean_ms=math.fsum(ordered) / len(ordered),
        shares=tuple(c / requests for c in counts),
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
