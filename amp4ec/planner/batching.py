"""Dynamic batching in the cost model: a stage's expected batch under a target load, its time
per request at that batch, and a plan's saturation throughput when every stage batches.

[Note: expected batch] A stage that frees up takes every request waiting for it, up to
``max_requests`` (``amp4ec.node_agent.batching``, no added wait). With requests arriving at
``λ`` per ms and a batch of ``b`` taking ``T(b)`` ms, the requests waiting when a batch ends
are those that arrived during it, about Poisson with mean ``x = λ·T(b)``; when none did, the
next batch is the next single arrival. So the next batch is on average ``max(1, N)``, whose
mean is ``x + e^(-x)`` (clamped at ``max_requests``; requests beyond it wait for the batch
after, which keeps the batch at the cap rather than shrinking it). The expected batch is the
least fixed point of ``b = min(m, x(b) + e^(-x(b)))``, found by iterating from ``b = 1``:
the map grows with ``b`` (``T`` does), so the iterates rise to it. It is 1 with no load
(``x → 0``), grows with the rate, and is ``max_requests`` at saturation: once ``λ`` exceeds
``b / T(b)`` for every ``b ≤ m`` no smaller batch keeps up (``x(b) > b``), and a saturated
stage serves ``m / T(m)`` (``saturation_rps``), even where a smaller batch would have been
cheaper per request (MobileNetV2: 15.6 ms at batch 2, 16.0 at 4). ``T`` between whole batches
is linear. A plan's rate
is split over its pipelines in proportion to their saturation throughput (what expected-
completion dispatch converges to under heavy load); ``load.latency_under_load`` simulates
the batches themselves and is the finer prediction.
"""

from __future__ import annotations

import math

from amp4ec.errors import InvalidSpec
from amp4ec.planner.types import Pipeline, Plan, Stage

__all__ = [
    "batch_time_ms",
    "expected_batch",
    "expected_batches",
    "per_request_ms",
    "saturation_rps",
    "stage_ms_under_load",
]

_ITERATIONS = 10_000
"""Fixed-point steps at most (a few dozen usually; near a critical rate the steps shrink)."""


def batch_time_ms(stage: Stage, batch: float) -> float:
    """Time of one pass of ``batch`` requests at ``stage`` (1 ≤ batch ≤ ``stage.max_batch``;
    linear between whole batches)."""
    times = (stage.stage_ms, *stage.batch_ms)
    if not 1 <= batch <= len(times):
        raise InvalidSpec(f"batch: expected 1 to {len(times)} for this stage, got {batch!r}")
    whole = int(batch)
    if whole == len(times):
        return times[-1]
    return times[whole - 1] + (times[whole] - times[whole - 1]) * (batch - whole)


def expected_batch(stage: Stage, rate_rps: float) -> float:
    """The stage's mean batch with requests arriving at ``rate_rps`` (see [Note: expected batch])."""
    if not rate_rps >= 0 or math.isinf(rate_rps):
        raise InvalidSpec(f"rate_rps: expected a finite rate ≥ 0, got {rate_rps!r}")
    cap = stage.max_batch
    if cap == 1 or rate_rps == 0:
        return 1.0
    lam = rate_rps / 1000.0
    b = 1.0
    for _ in range(_ITERATIONS):
        x = lam * batch_time_ms(stage, b)
        nxt = min(float(cap), x + math.exp(-x))
        if abs(nxt - b) < 1e-9:
            return nxt
        b = nxt
    return b


def per_request_ms(stage: Stage, batch: float) -> float:
    """The stage's time per request when it runs batches of ``batch`` (its cost at that batch)."""
    return batch_time_ms(stage, batch) / batch


def saturation_rps(plan: Plan) -> float:
    """Requests per second with every pipeline saturated: each stage then always has
    ``max_batch`` requests waiting, so a pipeline's rate is its slowest stage's
    ``max_batch / T(max_batch)``, summed over pipelines (equals ``predicted.throughput_rps``
    when nothing batches)."""
    return math.fsum(_pipeline_saturation_rps(p) for p in plan.pipelines)


def expected_batches(plan: Plan, rate_rps: float) -> tuple[float, ...]:
    """Each stage's expected batch (``plan.stages`` order) at ``rate_rps`` offered to the plan,
    split over pipelines by their saturation throughput (see [Note: expected batch])."""
    capacity = [_pipeline_saturation_rps(p) for p in plan.pipelines]
    total = math.fsum(capacity)
    out: list[float] = []
    for pipe, cap in zip(plan.pipelines, capacity, strict=True):
        share = rate_rps * (cap / total if math.isfinite(total) and total > 0 else 1 / len(capacity))
        out.extend(expected_batch(s, share) for s in pipe.stages)
    return tuple(out)


def stage_ms_under_load(plan: Plan, rate_rps: float) -> tuple[float, ...]:
    """Each stage's time per request at its expected batch under ``rate_rps`` (``plan.stages``
    order): the cost model's price of the stage under that load (``stage_ms`` at batch 1)."""
    return tuple(
        per_request_ms(s, b) for s, b in zip(plan.stages, expected_batches(plan, rate_rps), strict=True)
    )


def _pipeline_saturation_rps(pipeline: Pipeline) -> float:
    slowest = max(batch_time_ms(s, s.max_batch) / s.max_batch for s in pipeline.stages)
    return 1000.0 / slowest if slowest > 0 else math.inf
