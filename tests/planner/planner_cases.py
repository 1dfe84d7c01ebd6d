"""Hypothesis strategies and brute-force references shared by the planner tests."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

from amp4ec.errors import PlanInfeasible
from amp4ec.planner import LayerProfile, Link, NodeCapacity, Plan, Prediction
from amp4ec.planner.cost import CostModel

MB = 1_000_000
TOL = 1e-5
"""Absolute ms tolerance: the exact search rounds stage costs to whole nanoseconds."""
TIE = 3e-6
"""Primary costs closer than this (3 ns, the rounding of a few terms) are a tie that the
secondary cost decides; a larger difference, even 10 ns, is one the exact search sees."""


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL + 1e-6 * max(abs(a), abs(b))


@st.composite
def instances(draw: Any, max_blocks: int = 7, min_nodes: int = 1, max_nodes: int = 4) -> dict[str, Any]:
    """A random model + cluster: plan(**instance) is a valid call (it may be infeasible)."""
    n_blocks = draw(st.integers(1, max_blocks))
    n_nodes = draw(st.integers(min_nodes, max_nodes))
    ms = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.floats(0.1, 50.0))
    blocks = [
        LayerProfile(
            name=f"b{i}",
            flops=draw(st.integers(0, 1000)) * 10**6,
            param_bytes=draw(st.integers(0, 60)) * MB,
            out_bytes=draw(st.integers(0, 5 * MB)),
            compute_ms=draw(ms),
            act_bytes=draw(st.integers(0, 30)) * MB,
        )
        for i in range(n_blocks)
    ]
    nodes = [
        NodeCapacity(
            name=f"n{i}",
            cpu=draw(st.sampled_from([0.2, 0.4, 0.6, 1.0, 2.0])),
            memory_bytes=draw(st.integers(20, 300)) * MB,
            speed=draw(st.sampled_from([0.0, 0.0, 0.5, 1.3])),
            load=draw(st.sampled_from([0.0, 0.0, 0.5, 0.9])),
            overhead_ms=draw(st.sampled_from([0.0, 0.0, 0.7, 3.0])),
        )
        for i in range(n_nodes)
    ]
    names = ["client"] + [n.name for n in nodes]
    links = []
    if draw(st.booleans()):
        for a, b in itertools.combinations(names, 2):
            if draw(st.booleans()):
                links.append(
                    Link(a, b, draw(st.floats(0.0, 5.0)), draw(st.sampled_from([1e6, 1e7, 1e8, 1e9])))
                )
    return {"blocks": blocks, "nodes": nodes, "links": links, "input_bytes": draw(st.integers(0, 5 * MB))}


def model(instance: dict[str, Any]) -> CostModel:
    return CostModel(
        instance["blocks"], instance["nodes"], instance["links"], input_bytes=instance["input_bytes"]
    )


def all_pipelines(cm: CostModel, max_stages: int | None = None) -> Iterator[tuple[list, Prediction]]:
    """Every feasible single pipeline: all ordered node sequences × all contiguous splits."""
    top = min(cm.N, cm.B, max_stages or cm.N)
    for r in range(1, top + 1):
        for order in itertools.permutations(range(cm.N), r):
            for cuts in itertools.combinations(range(1, cm.B), r - 1):
                ends = [0, *cuts, cm.B]
                stages = [(order[i], ends[i], ends[i + 1] - 1) for i in range(r)]
                try:
                    yield stages, cm.price([stages])[1]
                except PlanInfeasible:
                    continue


def brute_single(cm: CostModel, objective: str, max_stages: int | None = None, keep: Any = None):
    """(primary, secondary) optimum over single pipelines, lexicographic with tolerance."""
    found = [(s, p) for s, p in all_pipelines(cm, max_stages) if keep is None or keep(s)]
    if not found:
        return None
    if objective == "latency":
        first = min(p.latency_ms for _, p in found)
        second = min(p.bottleneck_ms for _, p in found if p.latency_ms <= first + TIE)
    else:
        first = min(p.bottleneck_ms for _, p in found)
        second = min(p.latency_ms for _, p in found if p.bottleneck_ms <= first + TIE)
    return first, second


def brute_rate(cm: CostModel, max_stages: int | None = None) -> float:
    """Best total throughput over every split of the nodes into disjoint pipelines."""
    per_mask = [math.inf] * (1 << cm.N)
    for stages, pred in all_pipelines(cm, max_stages):
        mask = sum(1 << n for n, _, _ in stages)
        per_mask[mask] = min(per_mask[mask], pred.bottleneck_ms)
    best = [0.0] * (1 << cm.N)
    for mask in range(1, 1 << cm.N):
        low = mask & -mask
        top = best[mask ^ low]
        sub = mask ^ low
        while True:
            g = sub | low
            if per_mask[g] < math.inf:
                rate = 1000.0 / per_mask[g] if per_mask[g] > 0 else math.inf
                top = max(top, rate + best[mask ^ g])
            if not sub:
                break
            sub = (sub - 1) & (mask ^ low)
        best[mask] = top
    return best[-1]


def check_plan(plan: Plan, instance: dict[str, Any]) -> None:
    """Structural invariants every plan must satisfy, and its prediction re-derived."""
    cm = model(instance)
    seen: set[str] = set()
    for pipe in plan.pipelines:
        expect = 0
        for stage in pipe.stages:
            assert stage.first_block == expect and stage.last_block >= stage.first_block
            assert stage.node not in seen, "a node serves two stages"
            seen.add(stage.node)
            node = cm.nodes[cm.index[stage.node]]
            assert stage.memory_bytes == cm.memory_bytes(stage.first_block, stage.last_block)
            assert stage.memory_bytes <= node.memory_bytes
            expect = stage.last_block + 1
        assert expect == cm.B, "a pipeline does not cover every block"
    again = cm.price(cm.to_raw(plan))[1]
    assert again == plan.predicted
    assert math.isclose(plan.predicted.bottleneck_ms, max(s.stage_ms for s in plan.stages))
