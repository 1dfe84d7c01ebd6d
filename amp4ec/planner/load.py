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
import itertools
import math
import random
from collections import deque
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
    batches: tuple[float, ...] = ()
    """Mean batch each stage ran, in ``plan.stages`` order (1.0 where nothing batches)."""


def latency_under_load(plan: Plan, rate_rps: float, requests: int = 2000, seed: int = 0) -> LoadPrediction:
    """Latency percentiles of ``plan`` under Poisson arrivals at ``rate_rps``, each request sent
    to the pipeline of smallest expected completion: a deterministic discrete-event simulation
    (seeded arrivals, first come first served at each stage). A stage that frees up takes every
    request waiting for it, up to its ``max_batch`` (``Stage.batch_ms``; 1 without batching),
    and spends that batch's predicted time; a batch's requests move on together, so the next
    stage, when free, takes them as one batch too (see [Note: expected batch] in ``batching``)."""
    if not rate_rps > 0 or math.isinf(rate_rps):
        raise InvalidSpec(f"rate_rps: expected a positive finite rate, got {rate_rps!r}")
    if requests < 1:
        raise InvalidSpec(f"requests: expected at least 1, got {requests}")
    costs = [[(s.stage_ms, *s.batch_ms) for s in p.stages] for p in plan.pipelines]
    """Per pipeline and stage, the time of a batch of 1, 2, … requests."""
    intervals = [[s.interval_ms for s in p.stages] for p in plan.pipelines]
    """Per pipeline and stage, when it may take the next request after one alone: a tiled
    stage's busiest node frees up before the request has been stitched."""
    seeds = [pipeline_times(p) for p in plan.pipelines]
    waiting: list[list[deque[int]]] = [[deque() for _ in c] for c in costs]
    busy = [[False] * len(c) for c in costs]
    in_flight, counts = [0] * len(costs), [0] * len(costs)
    ran = [[[0, 0] for _ in c] for c in costs]
    """Per pipeline and stage, (batches, requests) it ran."""
    events: list[tuple[float, int, int, tuple[int, int, tuple[int, ...]]]] = []
    """(time, kind, sequence, (pipeline, stage, requests)): kind 0 a stage free again (its batch
    done, if it carries requests), -1 a batch done whose stage freed earlier (a tiled stage),
    1 an arrival; at equal times a finished batch counts before an arrival sees the in-flight
    numbers."""
    rng = random.Random(seed)
    sent, order = [0.0] * requests, itertools.count()
    latencies: list[float] = [0.0] * requests
    heapq.heappush(events, (rng.expovariate(rate_rps / 1000.0), 1, next(order), (0, 0, (0,))))
    touched: set[tuple[int, int]] = set()
    while events:
        now, kind, _, (p, k, batch) = heapq.heappop(events)
        if kind == 1:  # request batch[0] arrives at the client and is dispatched
            r = batch[0]
            sent[r] = now
            p = min(
                range(len(costs)),
                key=lambda i: (expected_completion_ms(*seeds[i], in_flight[i]), in_flight[i]),
            )
            in_flight[p] += 1
            counts[p] += 1
            waiting[p][0].append(r)
            touched.add((p, 0))
            if r + 1 < requests:
                arrival = now + rng.expovariate(rate_rps / 1000.0)
                heapq.heappush(events, (arrival, 1, next(order), (0, 0, (r + 1,))))
        else:  # stage k of pipeline p is free again, or finished a batch, or both
            if kind == 0:
                busy[p][k] = False
            touched.add((p, k))
            if k + 1 < len(costs[p]):
                waiting[p][k + 1].extend(batch)
                touched.add((p, k + 1))
            else:
                for r in batch:
                    latencies[r] = now - sent[r]
                in_flight[p] -= len(batch)
        if events and events[0][0] == now:
            continue  # everything arriving at this instant joins the batches that start now
        for p, k in sorted(touched):
            queue = waiting[p][k]
            if busy[p][k] or not queue:
                continue
            size = min(len(queue), len(costs[p][k]))
            taken = tuple(queue.popleft() for _ in range(size))
            busy[p][k] = True
            ran[p][k][0] += 1
            ran[p][k][1] += size
            cost = costs[p][k][size - 1]
            free_at = intervals[p][k] if size == 1 else cost
            if free_at < cost:
                heapq.heappush(events, (now + free_at, 0, next(order), (p, k, ())))
                heapq.heappush(events, (now + cost, -1, next(order), (p, k, taken)))
            else:
                heapq.heappush(events, (now + cost, 0, next(order), (p, k, taken)))
        touched.clear()
    ordered = sorted(latencies)
    return LoadPrediction(
        rate_rps=rate_rps,
        p50_ms=_quantile(ordered, 0.5),
        p95_ms=_quantile(ordered, 0.95),
        mean_ms=math.fsum(ordered) / len(ordered),
        shares=tuple(c / requests for c in counts),
        batches=tuple(n / b if b else 1.0 for stages in ran for b, n in stages),
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
