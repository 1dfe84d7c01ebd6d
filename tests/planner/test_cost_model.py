"""The per-request agent overhead in the cost model: priced per stage, at the node's speed."""

from __future__ import annotations

import pytest

from amp4ec.planner import LayerProfile, Link, NodeCapacity, evaluate, plan
from amp4ec.planner.types import Pipeline, Stage

MB = 1_000_000
FAST = [Link(a, b, 0.0, float("inf")) for a in ("client", "a", "b") for b in ("a", "b") if a != b]


def blocks(n: int, ms: float) -> list[LayerProfile]:
    return [LayerProfile(f"b{i}", 0, MB, 0, ms) for i in range(n)]


def test_every_stage_pays_its_nodes_overhead_at_that_nodes_speed():
    nodes = [
        NodeCapacity("a", 1.0, 100 * MB, overhead_ms=2.0),
        NodeCapacity("b", 0.5, 100 * MB, overhead_ms=2.0),
    ]
    placement = Pipeline((Stage("a", 0, 1), Stage("b", 2, 3)))
    predicted = evaluate(placement, blocks(4, 5.0), nodes, FAST)
    # a: (10 + 2) / 1.0; b: (10 + 2) / 0.5.
    assert predicted.stage_ms == pytest.approx((12.0, 24.0))
    assert predicted.latency_ms == pytest.approx(36.0)


def test_the_overhead_decides_whether_splitting_onto_a_slow_node_pays():
    # a holds the whole model; b (0.4 CPU) only two blocks, so b can never be a replica.
    model = [LayerProfile(f"b{i}", 0, 10 * MB, 0, 5.0) for i in range(4)]

    def stages(overhead: float) -> list[tuple[str, int]]:
        nodes = [
            NodeCapacity("a", 1.0, 100 * MB, overhead_ms=overhead),
            NodeCapacity("b", 0.4, 25 * MB, overhead_ms=overhead),
        ]
        chosen = plan(model, nodes, links=FAST)
        return sorted((s.node, s.last_block - s.first_block + 1) for s in chosen.stages)

    # No overhead: a 15 ms + b 12.5 ms beats a alone at 20 ms.
    assert stages(0.0) == [("a", 3), ("b", 1)]
    # 6 ms per stage: b's block costs (5 + 6) / 0.4 = 27.5 ms, a alone 26 ms.
    assert stages(6.0) == [("a", 4)]


def test_a_measured_node_is_as_fast_as_its_reference_workload_says() -> None:
    from amp4ec.planner.types import measured_node

    half = measured_node(
        "n", cpu=0.5, memory_bytes=1e9, workload_ms=20.0, reference_ms=10.0, overhead_cpu_ms=1.0
    )
    assert (half.speed, half.memory_bytes, half.cpu) == (0.5, 10**9, 0.5)
    assert half.overhead_ms / half.effective_speed == pytest.approx(1.0 / 0.5), "back to the node's wall ms"
    for workload, reference in ((0.0, 10.0), (10.0, 0.0)):  # either side unmeasured: speed unknown
        assert (
            measured_node("n", cpu=0.5, memory_bytes=0, workload_ms=workload, reference_ms=reference).speed
            == 0
        )
