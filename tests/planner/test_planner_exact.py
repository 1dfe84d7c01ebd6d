"""The optimal strategy against brute force on small instances (every split × every node order)."""

from __future__ import annotations

import itertools
import random
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.errors import PlanInfeasible
from amp4ec.planner import LayerProfile, Link, NodeCapacity, Pin, plan
from amp4ec.planner import optimal as optimal_module
from amp4ec.planner.dp import Search, best_per_mask, solve
from amp4ec.planner.heuristic import ordered_pipeline
from tests.planner.planner_cases import (
    MB,
    TOL,
    all_pipelines,
    brute_rate,
    brute_single,
    close,
    instances,
    model,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(instances(), st.sampled_from([None, 1, 2]))
def test_latency_objective_matches_brute_force(instance, max_stages):
    cm = model(instance)
    best = brute_single(cm, "latency", max_stages)
    if best is None:
        with pytest.raises(PlanInfeasible):
            plan(**instance, objective="latency", max_stages=max_stages)
        return
    got = plan(**instance, objective="latency", max_stages=max_stages)
    assert len(got.pipelines) == 1
    assert len(got.stages) <= (max_stages or cm.N)
    assert close(got.predicted.latency_ms, best[0])
    assert got.predicted.bottleneck_ms <= best[1] + TOL


@SETTINGS
@given(instances(), st.sampled_from([None, 2]))
def test_single_pipeline_bottleneck_matches_brute_force(instance, max_stages):
    """The exact DP's single-pipeline answer: min bottleneck, then min latency."""
    cm = model(instance)
    best = brute_single(cm, "throughput", max_stages)
    sp = Search(cm, list(range(cm.N)))
    per_mask = best_per_mask(sp, max_stages)
    if best is None:
        assert all(b == float("inf") for b, _ in per_mask)
        return
    bottleneck, latency = min(per_mask)
    found = solve(sp, "sum", cap=bottleneck, max_stages=max_stages, ub=latency)
    assert found is not None
    pred = cm.price([found[1]])[1]
    assert close(pred.bottleneck_ms, best[0])
    assert pred.latency_ms <= best[1] + TOL


@SETTINGS
@given(instances(), st.sampled_from([None, 2]), st.booleans())
def test_throughput_matches_best_split_into_pipelines(instance, max_stages, bounded):
    """Replicas, one pipeline and every hybrid: plan() finds the best total throughput.

    ``bounded`` forces the heuristic incumbent + rate-bounded search used on big instances."""
    cm = model(instance)
    best = brute_rate(cm, max_stages)
    with mock.patch.object(optimal_module, "_big", lambda cm: bounded):
        if best == 0:
            with pytest.raises(PlanInfeasible):
                plan(**instance, max_stages=max_stages)
            return
        got = plan(**instance, max_stages=max_stages)
    assert all(len(p.stages) <= (max_stages or cm.N) for p in got.pipelines)
    assert close(got.predicted.throughput_rps, best)


@SETTINGS
@given(instances(max_nodes=3), st.data())
def test_pins_are_respected_and_optimal_around_them(instance, data):
    cm = model(instance)
    first = data.draw(st.integers(0, cm.B - 1))
    last = data.draw(st.integers(first, cm.B - 1))
    node = data.draw(st.sampled_from(cm.names))
    pin = Pin(first, last, node)
    for objective in ("throughput", "latency"):
        best = brute_single(cm, objective, keep=lambda s: (cm.index[node], first, last) in s)
        if best is None:
            with pytest.raises(PlanInfeasible):
                plan(**instance, objective=objective, pinned=[pin])
            continue
        got = plan(**instance, objective=objective, pinned=[pin])
        assert len(got.pipelines) == 1
        assert any((s.node, s.first_block, s.last_block) == (node, first, last) for s in got.stages)
        primary = got.predicted.latency_ms if objective == "latency" else got.predicted.bottleneck_ms
        assert close(primary, best[0])


@SETTINGS
@given(instances(max_nodes=4))
def test_ordered_heuristic_is_feasible_and_no_better_than_exact(instance):
    cm = model(instance)
    exact = brute_single(cm, "throughput")
    found = ordered_pipeline(cm, list(range(cm.N)), "throughput")
    if found is None:
        return
    pred = cm.price([found])[1]
    assert exact is not None
    assert pred.bottleneck_ms >= exact[0] - TOL


def test_brute_force_reference_counts_every_pipeline():
    inst = {
        "blocks": [LayerProfile(f"b{i}", 1, 0, 0, 1.0) for i in range(3)],
        "nodes": [NodeCapacity(f"n{i}", 1.0, 10**9) for i in range(2)],
        "links": [],
        "input_bytes": 0,
    }
    # 2 single-node pipelines + 2 orders × 2 cut positions.
    assert len(list(all_pipelines(model(inst)))) == 2 + 4


def _full_instance(seed: int) -> dict:
    """7 blocks × 4 nodes with links: the largest size brute force checks quickly."""
    rng = random.Random(seed)
    nodes = [
        NodeCapacity(
            f"n{i}",
            rng.choice([0.4, 0.6, 1.0]),
            rng.randint(30, 200) * MB,
            speed=rng.choice([0, 1.5]),
            overhead_ms=rng.choice([0.0, 0.5, 2.0]),
        )
        for i in range(4)
    ]
    names = ["client"] + [n.name for n in nodes]
    links = [
        Link(a, b, rng.uniform(0, 4), rng.choice([1e7, 1e8, 1e9]))
        for a, b in itertools.combinations(names, 2)
        if rng.random() < 0.6
    ]
    model_blocks = [
        LayerProfile(f"b{i}", 1, rng.randint(0, 50) * MB, rng.randint(0, 4 * MB), rng.uniform(0.5, 30), MB)
        for i in range(7)
    ]
    return {"blocks": model_blocks, "nodes": nodes, "links": links, "input_bytes": rng.randint(0, 2 * MB)}


@pytest.mark.parametrize("seed", range(12))
def test_full_size_instances_match_brute_force(seed):
    instance = _full_instance(seed)
    cm = model(instance)
    best_rate = brute_rate(cm)
    best_latency = brute_single(cm, "latency")
    if best_latency is None:
        with pytest.raises(PlanInfeasible):
            plan(**instance)
        return
    for bounded in (False, True):
        with mock.patch.object(optimal_module, "_big", lambda cm, b=bounded: b):
            assert close(plan(**instance).predicted.throughput_rps, best_rate)
            got = plan(**instance, objective="latency")
            assert close(got.predicted.latency_ms, best_latency[0])
            assert got.predicted.bottleneck_ms <= best_latency[1] + TOL
