"""Baselines, the optimal strategy's shapes (replicas, hybrids, left-out nodes), evaluate, replan."""

from __future__ import annotations

import dataclasses

import pytest

from amp4ec.planner import (
    LayerProfile,
    Link,
    NodeCapacity,
    Pin,
    Pipeline,
    Stage,
    evaluate,
    plan,
    replan_reason,
    should_replan,
)

MB = 1_000_000


def blocks(n: int, ms: float = 10.0, params: int = 10 * MB, out: int = MB) -> list[LayerProfile]:
    return [LayerProfile(f"b{i}", 100, params, out, ms) for i in range(n)]


def spans(p) -> list[tuple[str, int, int]]:
    return [(s.node, s.first_block, s.last_block) for s in p.stages]


def test_equal_gives_the_first_nodes_one_block_more():
    nodes = [NodeCapacity(x, 1.0, 10**9) for x in "abc"]
    assert spans(plan(blocks(10), nodes, strategy="equal")) == [("a", 0, 3), ("b", 4, 6), ("c", 7, 9)]


def test_equal_skips_a_node_that_cannot_hold_its_part():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("tiny", 1.0, 5 * MB), NodeCapacity("c", 1.0, 10**9)]
    got = plan(blocks(4), nodes, strategy="equal")
    assert spans(got) == [("a", 0, 1), ("c", 2, 3)]
    assert any("tiny left out" in n for n in got.notes)


def test_memory_splits_by_memory_share():
    nodes = [
        NodeCapacity("a", 1.0, 400 * MB),
        NodeCapacity("b", 1.0, 200 * MB),
        NodeCapacity("c", 1.0, 200 * MB),
    ]
    assert spans(plan(blocks(8), nodes, strategy="memory")) == [("a", 0, 3), ("b", 4, 5), ("c", 6, 7)]


def test_max_stages_limits_the_split_baselines():
    nodes = [NodeCapacity(x, 1.0, 10**9) for x in "abcd"]
    for strategy in ("equal", "memory", "paper"):
        assert len(plan(blocks(8), nodes, strategy=strategy, max_stages=2).stages) == 2


def test_replicate_and_monolith():
    nodes = [
        NodeCapacity("slow", 0.5, 10**9),
        NodeCapacity("small", 1.0, 10 * MB),
        NodeCapacity("fast", 1.0, 10**9),
    ]
    rep = plan(blocks(3), nodes, strategy="replicate")
    assert spans(rep) == [("slow", 0, 2), ("fast", 0, 2)]
    assert rep.predicted.throughput_rps == pytest.approx(1000 / 60.1 + 1000 / 30.1)
    assert spans(plan(blocks(3), nodes, strategy="monolith")) == [("fast", 0, 2)]


def test_optimal_replicates_a_small_model():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("b", 0.6, 10**9), NodeCapacity("c", 0.4, 10**9)]
    got = plan(blocks(6), nodes)
    assert sorted(spans(got)) == [("a", 0, 5), ("b", 0, 5), ("c", 0, 5)]
    assert any("replicas" in n for n in got.notes)


def test_optimal_hybrid_replicas_plus_a_pipeline_of_small_nodes():
    nodes = [
        NodeCapacity("a", 1.0, 100 * MB),
        NodeCapacity("b", 1.0, 100 * MB),
        NodeCapacity("c", 1.0, 25 * MB),
        NodeCapacity("d", 1.0, 25 * MB),
    ]
    got = plan(blocks(4), nodes)
    shapes = sorted([(s.first_block, s.last_block) for s in p.stages] for p in got.pipelines)
    assert shapes == [[(0, 1), (2, 3)], [(0, 3)], [(0, 3)]]
    assert {p.stages[0].node for p in got.pipelines if len(p.stages) == 1} == {"a", "b"}
    # a, b: 40 ms + 0.1 ms from the client; c: 20.1 ms; d: 20 ms + 0.1 ms + 1 MB at 1 GB/s.
    pred = got.predicted
    assert pred.throughput_rps == pytest.approx(2 * 1000 / 40.1 + 1000 / 21.1)
    assert pred.bottleneck_ms == pytest.approx(40.1)
    assert pred.latency_ms == pytest.approx(40.1 + 1.1)  # fastest pipeline incl. the 1 MB return
    assert len(pred.stage_ms) == 4


def test_pipeline_beats_replicas_when_nothing_fits_alone():
    nodes = [NodeCapacity(x, 1.0, 25 * MB) for x in "ab"]
    got = plan(blocks(4), nodes)
    assert len(got.pipelines) == 1 and len(got.stages) == 2


def test_latency_objective_leaves_slow_nodes_out_with_a_note():
    nodes = [NodeCapacity("fast", 1.0, 10**9), NodeCapacity("slow", 0.2, 10**9)]
    got = plan(blocks(4), nodes, objective="latency")
    assert spans(got) == [("fast", 0, 3)]
    assert any("slow left out" in n for n in got.notes)


def test_links_change_the_order_of_nodes():
    # The client is near b and far from a: the first stage should sit on b.
    nodes = [NodeCapacity("a", 1.0, 25 * MB), NodeCapacity("b", 1.0, 25 * MB)]
    links = [Link("client", "a", 50.0, 1e9), Link("client", "b", 0.2, 1e9)]
    got = plan(blocks(4), nodes, links=links, objective="latency")
    assert got.stages[0].node == "b"


def test_evaluate_prices_a_manual_placement_like_plan_does():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("b", 0.5, 10**9)]
    manual = [Stage("b", 0, 0), Stage("a", 1, 3)]
    pred = evaluate(manual, blocks(4), nodes, input_bytes=2 * MB)
    # b: 10/0.5 + 0.1 + 2 ms; a: 30 + 0.1 + 1 ms; return 0.1 + 1 ms.
    assert pred.stage_ms == pytest.approx((22.1, 31.1))
    assert pred.latency_ms == pytest.approx(22.1 + 31.1 + 1.1)
    assert pred.throughput_rps == pytest.approx(1000 / 31.1)
    assert evaluate(Pipeline(tuple(manual)), blocks(4), nodes, input_bytes=2 * MB) == pred
    assert evaluate([Pipeline(tuple(manual))], blocks(4), nodes, input_bytes=2 * MB) == pred


def _scaled(p, factor):
    return dataclasses.replace(
        p,
        predicted=dataclasses.replace(
            p.predicted,
            throughput_rps=p.predicted.throughput_rps * factor,
            latency_ms=p.predicted.latency_ms / factor,
        ),
    )


def test_hysteresis_replans_only_above_the_threshold():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("b", 1.0, 10**9)]
    current = plan(blocks(4), nodes)
    assert should_replan(None, current, 0.1)
    assert not should_replan(current, current, 0.0)
    assert not should_replan(current, _scaled(current, 1.05), 0.1)
    assert should_replan(current, _scaled(current, 1.2), 0.1)
    assert not should_replan(current, _scaled(current, 1.2), 0.3)
    assert not should_replan(current, _scaled(current, 0.5), 0.1)
    fast = plan(blocks(4), nodes, objective="latency")
    assert should_replan(fast, _scaled(fast, 1.5), 0.2)
    assert not should_replan(fast, _scaled(fast, 1.1), 0.2)
    assert should_replan(current, fast, 10.0), "a new objective always replans"


def test_hysteresis_replans_when_current_no_longer_fits():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("b", 1.0, 10**9)]
    current = plan(blocks(4), nodes)
    shrunk = [NodeCapacity("a", 1.0, 10**9)]
    proposed = plan(blocks(4), shrunk)
    assert should_replan(current, proposed, 10.0, blocks=blocks(4), nodes=shrunk)
    # Same capacity: re-pricing changes nothing, the gain is 0.
    assert not should_replan(current, current, 0.01, blocks=blocks(4), nodes=nodes)


def test_bad_threshold():
    p = plan(blocks(2), [NodeCapacity("a", 1.0, 10**9)])
    with pytest.raises(ValueError, match="threshold"):
        should_replan(p, p, -0.1)


def test_replan_reason_says_why():
    nodes = [NodeCapacity("a", 1.0, 10**9), NodeCapacity("b", 1.0, 10**9)]
    current = plan(blocks(4), nodes)
    assert replan_reason(None, current, 0.1) == "no current plan"
    assert replan_reason(current, current, 0.1) is None
    assert replan_reason(current, _scaled(current, 1.25), 0.1) == "throughput improves by 25.0% (> 10.0%)"
    gone = replan_reason(current, current, 0.1, blocks=blocks(4), nodes=nodes[:1])
    assert gone is not None and gone.startswith("the current plan no longer fits")


@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_pins_beyond_eight_nodes(objective):
    nodes = [NodeCapacity(f"n{i}", 1.0, 45 * MB) for i in range(10)]
    got = plan(blocks(20), nodes, objective=objective, pinned=[Pin(5, 6, "n3"), Pin(12, 14, "n0")])
    assert ("n3", 5, 6) in spans(got) and ("n0", 12, 14) in spans(got)
    assert len(got.pipelines) == 1
    assert any("heuristic" in n for n in got.notes)
