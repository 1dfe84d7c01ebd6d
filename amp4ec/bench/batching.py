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
from typing import Any

from amp4ec.bench.configs import Configuration, scale_nodes
from amp4ec.bench.measure import Bench
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.runner import (  # the standard configuration's steps, shared
    MATCHED_NODE,
    _capacities,
    _guarded,
    _ideal,
    _memory_headroom,
    _named,
    _plan,
    _prime,
    matched_variants,
)
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import LocalCluster, NodeSpec
from amp4ec.local.run import measure_links, node_capacities
from amp4ec.planner.batching import expected_batches, saturation_rps
from amp4ec.planner.load import latency_under_load
from amp4ec.planner.types import Plan
from amp4ec.scheduling import timed_plan
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
    secure: bool = True,
    cfs_period_us: int = PERIOD_US,
) -> dict[str, Any]:
    nodes, factor = scale_nodes(config, budget)
    matched = NodeSpec(
        MATCHED_NODE, round(sum(n.cpu for n in nodes), 4), sum(n.memory_bytes or 0 for n in nodes)
    )
    variants = [v for v in matched_variants(matched) if not v.threads]  # intra-op threads lose at batch 1
    names = [n.name for n in nodes]
    out: dict[str, Any] = {
        "name": config.name,
        "title": config.title,
        "kind": "batching",
        "model": config.source.spec,
        "scale_factor": factor,
        "nodes": [{"name": n.name, "cpu": n.cpu} for n in nodes],
        "matched_cpu": matched.cpu,
        "batching": {
            "max_requests": BATCHING.max_requests,
            "max_queue_delay_ms": BATCHING.max_queue_delay_ms,
        },
        "targets": TARGETS,
        "rows": {},
    }
    async with LocalCluster(
        [*nodes, *variants],
        limit_mode,
        allow_factories=_named(config.source),
        secure=secure,
        cfs_period_us=cfs_period_us,
    ) as cluster:
        out["cpu_limits"] = cluster.limit_description
        await _prime(cluster, config.source)
        capacity = {c.name: c for c in node_capacities(await _capacities(cluster), prepared.reference_ms)}
        planner_nodes = [_memory_headroom(cluster, capacity[n]) for n in names]
        tunings = {v.name for v in variants}
        links = [link for link in await measure_links(cluster) if not tunings & {link.src, link.dst}]
        bench = Bench(cluster, prepared, config.source, config.sizes, progress, cluster.address)
        unbatched, batched = replace(bench, batching=Batching()), replace(bench, batching=BATCHING)

        async def monolith(on: Bench, label: str, rate: float | None) -> dict[str, Any]:
            """The better tuning of the matched monolith, each measured in full."""
            tried = {}
            for variant in variants:
                plan, _ = _plan(prepared, [_memory_headroom(cluster, capacity[variant.name])], "monolith", [])
                tried[variant.workers] = await _guarded(
                    on, plan, f"{label} ({variant.workers} worker(s))", rate
                )
                tried[variant.workers]["workers"] = variant.workers
            best = max(tried.values(), key=lambda r: r.get("saturation", {}).get("rps", -1.0))
            best["tunings_rps"] = {str(w): r.get("saturation", {}).get("rps") for w, r in tried.items()}
            return best

        rows = out["rows"]
        rows["matched"] = await monolith(unbatched, "monolith", None)
        progress.step()
        rate = rows["matched"].get("open_loop", {}).get("rate_rps")
        out["open_loop_rate_rps"] = rate
        out["ideal"] = await _ideal(unbatched, planner_nodes, links)
        progress.step()
        rows["matched_batched"] = await monolith(batched, "monolith, batching", rate)
        progress.step()
        plan, _ = _plan(prepared, planner_nodes, "optimal", links)
        # The same placement (the search prices batch 1), its stages priced at batches too.
        priced, _ = _plan(prepared, planner_nodes, "optimal", links, max_batch=BATCHING.max_requests)
        out["predicted"] = {"unbatched": _predicted(plan, rate), "batched": _predicted(priced, rate)}
        rows["optimal"] = await _guarded(unbatched, plan, "optimal", rate)
        progress.step()
        rows["optimal_batched"] = await _guarded(batched, plan, "optimal, batching", rate)
        progress.step()
        if rate:
            tail, _ = timed_plan(
                prepared.profiles,
                planner_nodes,
                objective="p95",
                rate_rps=rate,
                input_bytes=prepared.chain.input_bytes,
                links=links,
            )
            out["predicted"]["p95_objective"] = _predicted(tail, rate)
            out["p95_plan"] = {
                "rows": tail.rows(),
                "same_as_optimal": tail.rows() == plan.rows(),
                "notes": list(tail.notes),
            }
            rows["p95_objective"] = await _guarded(unbatched, tail, "p95 objective", rate)
        progress.step()
    out["ratios"] = _ratios(out)
    return out


def _predicted(plan: Plan, rate: float | None) -> dict[str, Any]:
    """What the planner expects of ``plan``: saturation, and at ``rate`` latency and batches."""
    out: dict[str, Any] = {"saturation_rps": saturation_rps(plan)}
    if rate:
        load = latency_under_load(plan, rate)
        out |= {
            "rate_rps": rate,
            "p50_ms": load.p50_ms,
            "p95_ms": load.p95_ms,
            "mean_batch": math.fsum(load.batches) / len(load.batches),
            "expected_batches": list(expected_batches(plan, rate)),
        }
    return out


def _ratios(out: dict[str, Any]) -> dict[str, float | None]:
    rows, ideal = out["rows"], (out.get("ideal") or {}).get("rps")
    predicted = out.get("predicted") or {}

    def guess(which: str, key: str) -> float | None:
        value = (predicted.get(which) or {}).get(key)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    def get(row: str, *path: str) -> float | None:
        value: Any = rows.get(row, {})
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "p95_vs_matched": ratio(get("optimal", "open_loop", "p95_ms"), get("matched", "open_loop", "p95_ms")),
        "batched_vs_ideal": ratio(get("optimal_batched", "saturation", "rps"), ideal),
        "batched_p95_vs_batched_matched": ratio(
            get("optimal_batched", "open_loop", "p95_ms"), get("matched_batched", "open_loop", "p95_ms")
        ),
        "batched_p95_vs_matched": ratio(
            get("optimal_batched", "open_loop", "p95_ms"), get("matched", "open_loop", "p95_ms")
        ),
        "batched_vs_unbatched_saturation": ratio(
            get("optimal_batched", "saturation", "rps"), get("optimal", "saturation", "rps")
        ),
        "batched_vs_unbatched_single": ratio(
            get("optimal_batched", "single_ms", "p50"), get("optimal", "single_ms", "p50")
        ),
        "matched_batched_vs_matched_saturation": ratio(
            get("matched_batched", "saturation", "rps"), get("matched", "saturation", "rps")
        ),
        # The planner against the measurement (predicted / measured; 1 = exact).
        "predicted_saturation": ratio(
            guess("unbatched", "saturation_rps"), get("optimal", "saturation", "rps")
        ),
        "predicted_p95": ratio(guess("unbatched", "p95_ms"), get("optimal", "open_loop", "p95_ms")),
        "p95_objective_p95_vs_matched": ratio(
            get("p95_objective", "open_loop", "p95_ms"), get("matched", "open_loop", "p95_ms")
        ),
        "predicted_p95_objective_p95": ratio(
            guess("p95_objective", "p95_ms"), get("p95_objective", "open_loop", "p95_ms")
        ),
        "predicted_batched_saturation": ratio(
            guess("batched", "saturation_rps"), get("optimal_batched", "saturation", "rps")
        ),
        "predicted_batched_p95": ratio(
            guess("batched", "p95_ms"), get("optimal_batched", "open_loop", "p95_ms")
        ),
    }
