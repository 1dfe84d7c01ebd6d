"""The planner: where each block of a model runs, as one or more pipelines of stages over nodes.

Reading order:

1. ``types``      — the data contract (LayerProfile, NodeCapacity, Link, Pin,
                     SchedulerHistory → Stage, Pipeline, Prediction, Plan).
2. ``validate``   — argument checks (InvalidSpec naming field and index).
3. ``cost``       — the cost model: stage = compute on its node + inbound transfer
                     (each cut raw or compressed, whichever is cheaper on its link);
                     ``evaluate`` prices any placement.
4. ``kernel``     — the DP value modes and the vectorised row relaxation.
5. ``dp``         — the exact single-pipeline DP over (used-node set, last node's link
                     class, blocks covered), branch and bound.
6. ``heuristic``  — the ordered O(N·B²) DP used beyond 8 nodes.
7. ``optimal``    — the default strategy: replicas/hybrids/pipeline, exact ≤ 8 nodes.
8. ``paper``      — AMP4EC's RALOS partitioner + weighted scheduler, as published.
9. ``baselines``  — equal, memory (exo-like), replicate, monolith.
10. ``replan``    — hysteresis: replan only for a real gain.
11. ``tiles``     — tile groups: leading convolutional blocks as row stripes over
                     several nodes, one request's work split (optimal strategy).
12. ``batching``  — dynamic batching: a stage's expected batch under a target load, its
                     price at that batch, saturation throughput at the largest batch.
13. ``load``      — latency under load: the expected-completion rule the client dispatches
                     by, and a plan's latency percentiles at an arrival rate (batches simulated).
14. ``tail``      — the ``p95`` objective: candidates (throughput plan, replicas, fastest
                     pipeline, node groupings) simulated at a target rate, lowest p95 wins.

Cost model (all strategies): a stage's time is the sum of its blocks' ``compute_ms``
and its node's per-request ``overhead_ms``, divided by the node's ``effective_speed``,
plus the time its input takes over the inbound link (from the previous stage's node, or
from ``client`` with ``input_bytes`` for the first stage). Links are looked up src→dst,
then dst→src, then ``default_link`` (0.2 ms round trip, 1 GB/s). A stage's memory is its
parameters plus its largest activation and must fit its node. A pipeline's latency adds the return of the last
block's output to the client; its throughput is 1000/slowest stage; a plan's
throughput is the sum over its pipelines (see ``types.Prediction``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from amp4ec.errors import InvalidSpec
from amp4ec.planner.baselines import plan_equal, plan_memory, plan_monolith, plan_replicate
from amp4ec.planner.cost import INF, CostModel, evaluate
from amp4ec.planner.optimal import plan_optimal
from amp4ec.planner.paper import plan_paper
from amp4ec.planner.replan import replan_reason, should_replan
from amp4ec.planner.tail import plan_p95
from amp4ec.planner.tiles import TILE_MARGIN, best_tiled
from amp4ec.planner.types import (
    OBJECTIVES,
    CodecProfile,
    LayerProfile,
    Link,
    NodeCapacity,
    Pin,
    Pipeline,
    Plan,
    Prediction,
    SchedulerHistory,
    Stage,
    TileGroup,
    TileRows,
    reference_overhead_ms,
)
from amp4ec.planner.validate import (
    check_choice,
    check_history,
    check_max_error,
    check_max_stages,
    check_pins,
    check_rate,
)

__all__ = [
    "OBJECTIVES",
    "STRATEGIES",
    "CodecProfile",
    "LayerProfile",
    "Link",
    "NodeCapacity",
    "Pin",
    "Pipeline",
    "Plan",
    "Prediction",
    "SchedulerHistory",
    "Stage",
    "TileGroup",
    "TileRows",
    "evaluate",
    "plan",
    "reference_overhead_ms",
    "replan_reason",
    "should_replan",
]

STRATEGIES = ("optimal", "paper", "equal", "memory", "replicate", "monolith")


def plan(
    blocks: Sequence[LayerProfile],
    nodes: Sequence[NodeCapacity],
    *,
    links: Iterable[Link] = (),
    objective: str = "throughput",
    strategy: str = "optimal",
    input_bytes: int = 0,
    default_link: Link | None = None,
    max_stages: int | None = None,
    pinned: Sequence[Pin] = (),
    history: SchedulerHistory | None = None,
    codecs: Sequence[CodecProfile] = (),
    max_error: float | None = None,
    tiles: bool = True,
    max_batch: int = 1,
    rate_rps: float | None = None,
) -> Plan:
    """Place ``blocks`` on ``nodes`` with ``strategy``, optimising ``objective``.

    ``max_stages`` caps the stages of each pipeline (optimal; equal/memory/paper use at
    most that many nodes). ``pinned`` (optimal only) fixes block ranges on nodes.
    ``history`` feeds the paper's scheduler and is never mutated. ``codecs`` may compress
    cuts, the estimated output error within ``max_error`` (None: no bound; see the module
    docstring). ``tiles`` (optimal only) lets leading blocks with tile geometry run as row
    tiles. ``max_batch`` (a deployment's ``max_requests``) prices each stage at batches up to
    it too (``Stage.batch_ms``, for ``batching`` and ``load``; the search itself optimises batch
    1). ``rate_rps`` is the arrival rate the ``p95`` objective minimises the tail at (required
    by it, refused by the others). Raises InvalidSpec for bad arguments and PlanInfeasible when nothing fits.
    """
    check_choice(strategy, "strategy", STRATEGIES)
    check_choice(objective, "objective", OBJECTIVES)
    rate = check_rate(rate_rps, objective)
    if objective == "p95" and strategy != "optimal":
        raise InvalidSpec(f"objective: only the optimal strategy searches p95, not strategy={strategy!r}")
    bound = check_max_error(max_error)
    cap = check_max_stages(max_stages)
    links = tuple(links)
    divisor = 1
    while True:
        limit = INF if bound is None else bound / divisor
        cm = CostModel(
            blocks,
            nodes,
            links,
            input_bytes=input_bytes,
            default_link=default_link,
            codecs=codecs,
            error_limit=limit,
            max_batch=max_batch,
        )
        result = _plan(cm, objective, strategy, cap, pinned, history, tiles, rate)
        # A pipeline of k stages has k cuts that may be compressed (k - 1 inner, the answer).
        most = cm.N if cap is None else min(cm.N, cap)
        if bound is None or result.predicted.output_error <= bound or divisor >= most:
            if bound is not None and divisor > 1:
                note = f"compression: cuts held to {limit:.2g} each to keep the output error within {bound:g}"
                result = replace(result, notes=(*result.notes, note))
            return result
        divisor = min(2 * divisor, max(most, 1))


def _plan(
    cm: CostModel,
    objective: str,
    strategy: str,
    cap: int | None,
    pinned: Sequence[Pin],
    history: SchedulerHistory | None,
    tiles: bool,
    rate: float | None = None,
) -> Plan:
    pins = check_pins(pinned, cm.B, cm.names)
    hist = check_history(history)
    if pins and strategy != "optimal":
        raise InvalidSpec(f"pinned: only the optimal strategy honours pins, not strategy={strategy!r}")
    if objective == "p95" and rate is not None:
        # Tiled stages are not searched for p95 (see tail's [Note: p95 search]).
        return cm.make_plan(objective, strategy, *plan_p95(cm, rate, cap, pins))
    if strategy == "optimal":
        raw, notes = plan_optimal(cm, objective, cap, pins)
    elif strategy == "paper":
        raw, notes = plan_paper(cm, cap, hist)
    elif strategy == "equal":
        raw, notes = plan_equal(cm, cap)
    elif strategy == "memory":
        raw, notes = plan_memory(cm, cap)
    elif strategy == "replicate":
        raw, notes = plan_replicate(cm)
    else:
        raw, notes = plan_monolith(cm, objective)
    layerwise = cm.make_plan(objective, strategy, raw, notes)
    if strategy == "optimal" and not pins and tiles:
        return _with_tiles(cm, layerwise)
    return layerwise


def _with_tiles(cm: CostModel, layerwise: Plan) -> Plan:
    """The tiled plan when it beats the layer-wise one on the objective (see ``tiles``)."""
    replicas = all(len(p.stages) == 1 for p in layerwise.pipelines) and len(layerwise.pipelines) == cm.N
    if layerwise.objective == "throughput" and replicas:
        # Every node serves whole requests and is never idle; a tile group only adds work to
        # each (halo rows, a frame per tile), so it cannot raise the rate: skip the search.
        return layerwise
    tiled = best_tiled(cm, layerwise.objective)
    if tiled is None:
        return layerwise
    mine, theirs = tiled.prediction(), layerwise.predicted
    if layerwise.objective == "latency":
        better = mine.latency_ms < TILE_MARGIN * theirs.latency_ms
    else:
        better = mine.throughput_rps * TILE_MARGIN > theirs.throughput_rps
    if not better:
        note = (
            f"tiles: the best tiled plan (latency {mine.latency_ms:.2f} ms, {mine.throughput_rps:.2f} req/s) "
            f"is not {1 - TILE_MARGIN:.0%} better than the layer-wise one ({theirs.latency_ms:.2f} ms, "
            f"{theirs.throughput_rps:.2f} req/s)"
        )
        return replace(layerwise, notes=(*layerwise.notes, note))
    phases = tiled.stage.tiles
    ranges = ", ".join(f"{g.first_block}..{g.last_block}" for g in phases)
    notes = [
        f"blocks {ranges} as {len(phases[0].nodes)} row tiles on {', '.join(phases[0].nodes)}; "
        f"the rest on {tiled.stage.node} (layer-wise best: latency {theirs.latency_ms:.2f} ms, "
        f"{theirs.throughput_rps:.2f} req/s)"
    ]
    left = [n for n in cm.names if n not in phases[0].nodes]
    notes += [f"node {n} left out: it does not improve the {layerwise.objective}" for n in left]
    return Plan(layerwise.objective, layerwise.strategy, (tiled.pipeline(),), mine, tuple(notes))
