"""The p95 objective (planner/tail.py): simulated tail latency at a target rate, on plain data."""

from __future__ import annotations

import itertools
import math

import pytest

from amp4ec.errors import InvalidSpec
from amp4ec.planner import LayerProfile, NodeCapacity, Pin, Plan, plan, should_replan
from amp4ec.planner.cost import CostModel
from amp4ec.planner.load import latency_under_load
from amp4ec.planner.tail import SEED, groupings

MB = 1_000_000
GB = 1_000_000_000

STANDARD = [
    NodeCapacity("node0", 1.0, GB),
    NodeCapacity("node1", 0.6, GB),
    NodeCapacity("node2", 0.4, GB),
]
"""The standard nodes of docs/benchmarks.md (1.0/0.6/0.4 CPU)."""
MODEL = [LayerProfile(f"b{i}", 0, MB, 1000, 1.1) for i in range(20)]
"""22 ms of blocks on the reference core: whole-model stages of 22/37/55 ms on the standard nodes."""


def placement(p: Plan) -> list[list[tuple[str, int, int]]]:
    return sorted([(s.node, s.first_block, s.last_block) for s in pipe.stages] for pipe in p.pipelines)


def p95_of(p: Plan, rate: float) -> float:
    return latency_under_load(p, rate, seed=SEED).p95_ms


def test_pools_a_slow_node_where_that_shortens_the_tail() -> None:
    """At 40 req/s (44% of the replicas' capacity) a request sent to the 0.4-CPU replica waits
    55 ms; node0 → node2 as one pipeline beside node1 keeps the tail shorter."""
    replicas = plan(MODEL, STANDARD)
    assert len(replicas.pipelines) == 3 and all(len(p.stages) == 1 for p in replicas.pipelines)
    chosen = plan(MODEL, STANDARD, objective="p95", rate_rps=40.0)
    assert chosen.objective == "p95"
    assert any(len(p.stages) > 1 for p in chosen.pipelines), placement(chosen)
    assert p95_of(chosen, 40.0) < p95_of(replicas, 40.0)
    assert chosen.predicted.throughput_rps >= 40.0
    assert "throughput-optimal plan: p95" in " ".join(chosen.notes)


def test_equals_the_throughput_plan_when_that_is_also_best() -> None:
    """At 81.7 req/s (90% of the replicas' capacity) the model ranks the replicas first: pooling
    node1 → node2 beside node0 gives 201 ms against their 186 (docs/benchmarks.md, issue 15)."""
    rate = 81.7
    chosen = plan(MODEL, STANDARD, objective="p95", rate_rps=rate)
    assert placement(chosen) == placement(plan(MODEL, STANDARD))
    cm = CostModel(MODEL, STANDARD, ())
    pooled = cm.make_plan("p95", "optimal", [[(0, 0, 19)], [(1, 0, 11), (2, 12, 19)]])
    assert pooled.predicted.throughput_rps >= rate
    assert p95_of(chosen, rate) <= p95_of(pooled, rate)


def test_falls_back_to_the_throughput_plan_when_no_plan_sustains_the_rate() -> None:
    chosen = plan(MODEL, STANDARD, objective="p95", rate_rps=500.0)
    assert placement(chosen) == placement(plan(MODEL, STANDARD))
    assert chosen.notes[0].startswith("p95: no plan sustains 500 req/s")


def test_deterministic() -> None:
    first = plan(MODEL, STANDARD, objective="p95", rate_rps=40.0)
    assert all(plan(MODEL, STANDARD, objective="p95", rate_rps=40.0) == first for _ in range(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "p95"}, "rate_rps: the p95 objective needs a target rate"),
        ({"objective": "p95", "rate_rps": 0}, "rate_rps: expected a positive finite rate"),
        ({"objective": "p95", "rate_rps": -3.0}, "rate_rps: expected a positive finite rate"),
        ({"objective": "p95", "rate_rps": math.inf}, "rate_rps: expected a positive finite rate"),
        ({"objective": "p95", "rate_rps": "fast"}, "rate_rps: expected a positive finite rate"),
        ({"objective": "throughput", "rate_rps": 10.0}, "rate_rps: only objective p95"),
        ({"objective": "p95", "rate_rps": 10.0, "strategy": "equal"}, "objective: only the optimal strategy"),
    ],
)
def test_bad_rate(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        plan(MODEL, STANDARD, **kwargs)


def test_pins_keep_one_pipeline() -> None:
    chosen = plan(MODEL, STANDARD, objective="p95", rate_rps=20.0, pinned=[Pin(0, 4, "node2")])
    assert len(chosen.pipelines) == 1
    assert (chosen.stages[0].node, chosen.stages[0].last_block) == ("node2", 4)


def test_groupings_enumerates_every_split_of_every_subset() -> None:
    """Bell(n + 1) - 1 groupings of n nodes (a left-out node acts as one more group)."""
    fits = [(1.0, 1.0)] * 16
    assert sum(1 for _ in groupings(fits, 3)) == 14
    assert sum(1 for _ in groupings(fits, 4)) == 51


def _pipelines(cm: CostModel, nodes: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
    """Every pipeline over exactly ``nodes`` (every order, every contiguous split) that fits."""
    out = []
    for order in itertools.permutations(nodes):
        for cuts in itertools.combinations(range(1, cm.B), len(order) - 1):
            bounds = [0, *cuts, cm.B]
            out.append([(n, bounds[i], bounds[i + 1] - 1) for i, n in enumerate(order)])
    return out


def test_brute_force_on_three_nodes() -> None:
    """Every grouping of the three nodes, each group's every pipeline: the chosen p95 is the
    lowest among what the search covers: per group, its pipelines of smallest bottleneck, then
    latency; and the single fastest pipeline (which may be none of those)."""
    blocks = [LayerProfile(f"b{i}", 0, MB, 20_000, ms) for i, ms in enumerate([3.0, 1.7, 4.2, 2.9, 0.8, 3.3])]
    nodes = [NodeCapacity("a", 1.0, GB), NodeCapacity("b", 0.5, GB), NodeCapacity("c", 0.3, GB)]
    cm = CostModel(blocks, nodes, ())
    for rate in (25.0, 45.0, 70.0):
        covered: list[float] = []
        for groups in groupings([(1.0, 1.0)] * 8, 3):
            choices = []
            for g in groups:
                members = tuple(n for n in range(3) if g >> n & 1)
                priced = [(cm.price([p])[1], p) for p in _pipelines(cm, members)]
                best = min((pred.bottleneck_ms, pred.latency_ms) for pred, _ in priced)
                choices.append([p for pred, p in priced if (pred.bottleneck_ms, pred.latency_ms) == best])
            for raw in itertools.product(*choices):
                candidate = cm.make_plan("p95", "optimal", list(raw))
                if candidate.predicted.throughput_rps >= rate:
                    covered.append(p95_of(candidate, rate))
        fastest = plan(blocks, nodes, objective="latency")
        if fastest.predicted.throughput_rps >= rate:
            covered.append(p95_of(fastest, rate))
        chosen = plan(blocks, nodes, objective="p95", rate_rps=rate)
        assert covered, rate
        assert math.isclose(p95_of(chosen, rate), min(covered), rel_tol=1e-9), (rate, placement(chosen))


def test_replan_compares_p95_at_the_rate() -> None:
    """The hysteresis of the p95 objective: both plans simulated at the rate, re-priced on the
    capacity passed; it needs the rate."""
    replicas = plan(MODEL, STANDARD, objective="p95", rate_rps=81.7)
    pooled = plan(MODEL, STANDARD, objective="p95", rate_rps=40.0)
    assert should_replan(replicas, pooled, 0.05, rate_rps=40.0, blocks=MODEL, nodes=STANDARD)
    assert not should_replan(pooled, replicas, 0.0, rate_rps=40.0, blocks=MODEL, nodes=STANDARD)
    assert not should_replan(pooled, pooled, 0.0, rate_rps=40.0, blocks=MODEL, nodes=STANDARD)
    with pytest.raises(InvalidSpec, match="rate_rps"):
        should_replan(replicas, pooled, 0.05)
