"""The ``batching`` configuration: dispatch and dynamic batching against a batching monolith.

On the standard nodes, the default plan and the resource-matched monolith (its one-worker and
one-worker-per-core tunings, the better kept) are each measured without batching and with
the same batching (``BATCHING``: up to 4 waiting requests per forward, no added wait), so the
monolith gets every advantage the split gets. Every open-loop run uses one rate: 90% of the
unbatched monolith's saturation throughput. Reported against the targets of issue 15:

- p95 at 90% load ≤ 1.1× the resource-matched monolith's (both unbatched);
- with batching, saturation ≥ 1.1× the batch-1 ideal (each node alone, whole model, no
  batching), and p95 at 90% load no worse than the batching monolith's;
- single-request latency at idle no worse with batching than without.

Beside the measured figures, the planner's predictions for the same plan at the same rate
(``predicted``: without batching, and with it from the blocks' batch times, see
``amp4ec.planner.batching``) and their ratios to what was measured.

A last row, unbatched at the same rate: the plan of the ``p95`` objective for that rate
(``amp4ec.planner.tail``; it may be the default plan itself), its p95 against the monolith's
beside the default plan's, with its predicted p95.
"""

from __future__ import annotations

import math
from dataclasses import replace

from amp4ec.bench.configs import Configuration, scale_nodes
from amp4ec.bench.measure import Bench
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import (
    BatchingPredictions,
    BatchingResult,
    Ideal,
    MeasuredPlan,
    NodeShare,
    P95Plan,
    PlannerPrediction,
    StrategyResult,
    plan_rows,
)
from amp4ec.bench.runner import (  # the standard configuration's steps, shared
    MATCHED_NODE,
    _capacities,
    _guarded,
    _ideal,
    _memory_headroom,
    _named,
    _plan,
    _prime,
    best_tuning,
    matched_variants,
)
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import LocalCluster, NodeSpec
from amp4ec.local.run import measure_links, node_capacities
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.batching import expected_batches, saturation_rps
from amp4ec.planner.load import latency_under_load
from amp4ec.planner.types import Plan
from amp4ec.slicing.prepare import Prepared
from amp4ec.wire.stage import Batching

__all__ = ["BATCHING", "TARGETS", "run_batching"]

BATCHING = Batching(max_requests=4, max_queue_delay_ms=0.0)
"""What both sides get: up to 4 waiting requests per forward (MobileNetV2 on one thread costs
18.1 ms an image alone, 15.6 at batch 2, 16.0 at batch 4), never an added wait."""
TARGETS = {"p95_vs_matched": 1.1, "batched_vs_ideal": 1.1, "batched_p95_vs_batched_matched": 1.0}


async def run_batching(
    config: Configuration,
    prepared: Prepared,
    budget: float,
    progress: ProgressSink,
    *,
    limit_mode: str = "auto",
    cfs_period_us: int = PERIOD_US,
    secure: bool = True,
) -> BatchingResult:
    nodes, factor = scale_nodes(config, budget)
    matched = NodeSpec(
        MATCHED_NODE, round(sum(n.cpu for n in nodes), 4), sum(n.memory_bytes or 0 for n in nodes)
    )
    variants = [v for v in matched_variants(matched) if not v.threads]  # intra-op threads lose at batch 1
    names = [n.name for n in nodes]
    rows: dict[str, StrategyResult] = {}
    async with LocalCluster(
        [*nodes, *variants],
        limit_mode,
        allow_factories=_named(config.source),
        secure=secure,
        cfs_period_us=cfs_period_us,
    ) as cluster:
        cpu_limits = cluster.limit_description
        await _prime(cluster, config.source)
        capacity = {c.name: c for c in node_capacities(await _capacities(cluster), prepared.reference_ms)}
        planner_nodes = [_memory_headroom(cluster, capacity[n]) for n in names]
        tunings = {v.name for v in variants}
        links = [link for link in await measure_links(cluster) if not tunings & {link.src, link.dst}]
        bench = Bench(cluster, prepared, config.source, config.sizes, progress, cluster.address)
        unbatched, batched = replace(bench, batching=Batching()), replace(bench, batching=BATCHING)

        async def monolith(on: Bench, label: str, rate: float | None) -> StrategyResult:
            """The better tuning of the matched monolith, each measured in full."""
            tried: dict[str, StrategyResult] = {}
            for variant in variants:
                plan, _ = _plan(prepared, [_memory_headroom(cluster, capacity[variant.name])], "monolith", [])
                result = await _guarded(on, plan, f"{label} ({variant.workers} worker(s))", rate)
                if isinstance(result, MeasuredPlan):
                    result = replace(result, workers=variant.workers)
                tried[str(variant.workers)] = result
            return best_tuning(tried)

        rows["matched"] = await monolith(unbatched, "monolith", None)
        progress.step()
        matched_row = rows["matched"]
        rate = matched_row.open_loop.rate_rps if isinstance(matched_row, MeasuredPlan) else None
        ideal = await _ideal(unbatched, planner_nodes, links)
        progress.step()
        rows["matched_batched"] = await monolith(batched, "monolith, batching", rate)
        progress.step()
        plan, _ = _plan(prepared, planner_nodes, "optimal", links)
        # The same placement (the search prices batch 1), its stages priced at batches too.
        priced, _ = _plan(prepared, planner_nodes, "optimal", links, max_batch=BATCHING.max_requests)
        predicted = BatchingPredictions(unbatched=_predicted(plan, rate), batched=_predicted(priced, rate))
        rows["optimal"] = await _guarded(unbatched, plan, "optimal", rate)
        progress.step()
        rows["optimal_batched"] = await _guarded(batched, plan, "optimal, batching", rate)
        progress.step()
        p95_plan = None
        if rate:
            tail, _ = timed_plan(
                prepared.profiles,
                planner_nodes,
                objective="p95",
                rate_rps=rate,
                input_bytes=prepared.chain.input_bytes,
                links=links,
            )
            predicted = replace(predicted, p95_objective=_predicted(tail, rate))
            p95_plan = P95Plan(plan_rows(tail.rows()), tail.rows() == plan.rows(), tuple(tail.notes))
            rows["p95_objective"] = await _guarded(unbatched, tail, "p95 objective", rate)
        progress.step()
    return BatchingResult(
        name=config.name,
        title=config.title,
        model=config.source.spec,
        scale_factor=factor,
        nodes=tuple(NodeShare(n.name, n.cpu) for n in nodes),
        matched_cpu=matched.cpu,
        batching=BATCHING,
        targets=TARGETS,
        rows=rows,
        cpu_limits=cpu_limits,
        open_loop_rate_rps=rate,
        ideal=ideal,
        predicted=predicted,
        p95_plan=p95_plan,
        ratios=ratios(rows, ideal, predicted),
    )


def _predicted(plan: Plan, rate: float | None) -> PlannerPrediction:
    """What the planner expects of ``plan``: saturation, and at ``rate`` latency and batches."""
    if not rate:
        return PlannerPrediction(saturation_rps(plan))
    load = latency_under_load(plan, rate)
    return PlannerPrediction(
        saturation_rps=saturation_rps(plan),
        rate_rps=rate,
        p50_ms=load.p50_ms,
        p95_ms=load.p95_ms,
        mean_batch=math.fsum(load.batches) / len(load.batches),
        expected_batches=tuple(expected_batches(plan, rate)),
    )


def ratios(
    rows: dict[str, StrategyResult], ideal: Ideal | None, predicted: BatchingPredictions
) -> dict[str, float | None]:
    """The figures the targets judge (module docstring), and the planner's predictions against
    the measurements (predicted / measured; 1 = exact); None where a row was not measured."""

    def measured(row: str) -> MeasuredPlan | None:
        result = rows.get(row)
        return result if isinstance(result, MeasuredPlan) else None

    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    def p95(row: str) -> float | None:
        return finite(r.open_loop.p95_ms) if (r := measured(row)) else None

    def rps(row: str) -> float | None:
        return finite(r.saturation.rps) if (r := measured(row)) else None

    def single(row: str) -> float | None:
        return finite(r.single_ms.p50) if (r := measured(row)) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "p95_vs_matched": ratio(p95("optimal"), p95("matched")),
        "batched_vs_ideal": ratio(rps("optimal_batched"), finite(ideal.rps) if ideal else None),
        "batched_p95_vs_batched_matched": ratio(p95("optimal_batched"), p95("matched_batched")),
        "batched_p95_vs_matched": ratio(p95("optimal_batched"), p95("matched")),
        "batched_vs_unbatched_saturation": ratio(rps("optimal_batched"), rps("optimal")),
        "batched_vs_unbatched_single": ratio(single("optimal_batched"), single("optimal")),
        "matched_batched_vs_matched_saturation": ratio(rps("matched_batched"), rps("matched")),
        "predicted_saturation": ratio(finite(predicted.unbatched.saturation_rps), rps("optimal")),
        "predicted_p95": ratio(finite(predicted.unbatched.p95_ms), p95("optimal")),
        "p95_objective_p95_vs_matched": ratio(p95("p95_objective"), p95("matched")),
        "predicted_p95_objective_p95": ratio(
            finite(predicted.p95_objective.p95_ms) if predicted.p95_objective else None, p95("p95_objective")
        ),
        "predicted_batched_saturation": ratio(
            finite(predicted.batched.saturation_rps), rps("optimal_batched")
        ),
        "predicted_batched_p95": ratio(finite(predicted.batched.p95_ms), p95("optimal_batched")),
    }
