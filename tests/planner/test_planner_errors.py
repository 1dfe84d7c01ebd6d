"""Unplannable input raises the right error, and its message names the reason or field."""

from __future__ import annotations

import math

import pytest

from amp4ec.errors import InvalidSpec, PlanInfeasible
from amp4ec.planner import LayerProfile, Link, NodeCapacity, Pin, evaluate, plan

MB = 2**20  # MiB, the unit of the planner's messages
BLOCKS = [LayerProfile(f"b{i}", 100, 10 * MB, MB, 2.0, MB) for i in range(4)]
NODES = [NodeCapacity("a", 1.0, 100 * MB), NodeCapacity("b", 0.5, 100 * MB)]


def test_zero_nodes_is_infeasible():
    with pytest.raises(PlanInfeasible, match="zero nodes"):
        plan(BLOCKS, [])


def test_empty_model_is_invalid():
    with pytest.raises(InvalidSpec, match="blocks"):
        plan([], NODES)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"strategy": "fastest"}, "strategy.*optimal, paper, equal, memory, replicate, monolith"),
        ({"objective": "cost"}, "objective.*throughput, latency"),
        ({"max_stages": 0}, "max_stages"),
        ({"input_bytes": -1}, "input_bytes"),
        ({"links": [Link("a", "b", 1.0, 0.0)]}, r"links\[0\].bandwidth_bytes_per_s"),
        ({"links": [Link("a", "b", math.nan, 1e6)]}, r"links\[0\].rtt_ms"),
        ({"default_link": Link("x", "y", -1.0, 1e6)}, "default_link.rtt_ms"),
        ({"pinned": [Pin(0, 9, "a")]}, r"pinned\[0\]: block range 0..9"),
        ({"pinned": [Pin(0, 1, "zz")]}, r"pinned\[0\].node: unknown node 'zz'"),
        ({"pinned": [Pin(0, 1, "a"), Pin(1, 2, "b")]}, "overlap"),
        ({"pinned": [Pin(0, 0, "a"), Pin(1, 1, "a")]}, "pinned twice"),
        ({"pinned": [Pin(0, 1, "a")], "strategy": "equal"}, "only the optimal strategy honours pins"),
        ({"history": {"a": [1.0]}}, "history"),
    ],
)
def test_bad_arguments_name_the_field(kw, match):
    with pytest.raises(InvalidSpec, match=match):
        plan(BLOCKS, NODES, **kw)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        (NodeCapacity("a", -1.0, MB), r"nodes\[0\].cpu"),
        (NodeCapacity("a", 1.0, -5), r"nodes\[0\].memory_bytes"),
        (NodeCapacity("a", 1.0, MB, speed=math.nan), r"nodes\[0\].speed"),
        (NodeCapacity("a", 1.0, MB, load=1.5), r"nodes\[0\].load"),
        (NodeCapacity("a", 1.0, MB, overhead_ms=-1.0), r"nodes\[0\].overhead_ms"),
        (NodeCapacity("a", 0.0, MB), "no speed"),
        (NodeCapacity("client", 1.0, MB), "reserved"),
        (NodeCapacity("", 1.0, MB), r"nodes\[0\].name"),
    ],
)
def test_bad_nodes_name_field_and_index(node, match):
    with pytest.raises(InvalidSpec, match=match):
        plan(BLOCKS, [node])


def test_duplicate_node_names():
    with pytest.raises(InvalidSpec, match=r"nodes\[1\].name: duplicate"):
        plan(BLOCKS, [NODES[0], NODES[0]])


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (LayerProfile("x", 1, 1, 1, math.nan), r"blocks\[0\].compute_ms"),
        (LayerProfile("x", 1, 1, 1, -1.0), r"blocks\[0\].compute_ms"),
        (LayerProfile("x", 1, -1, 1, 1.0), r"blocks\[0\].param_bytes"),
        (LayerProfile("x", 1.5, 1, 1, 1.0), r"blocks\[0\].flops"),  # type: ignore[arg-type]
        (LayerProfile("x", True, 1, 1, 1.0), r"blocks\[0\].flops"),
    ],
)
def test_bad_blocks_name_field_and_index(block, match):
    with pytest.raises(InvalidSpec, match=match):
        plan([block], NODES)


def test_block_too_big_for_any_node_says_which_and_by_how_much():
    blocks = [*BLOCKS, LayerProfile("huge", 1, 250 * MB, MB, 1.0)]
    with pytest.raises(
        PlanInfeasible, match=r"block 4 \('huge'\).*250.0 MiB.*'a' has 100.0 MiB \(lacks 150.0 MiB\)"
    ):
        plan(blocks, NODES)


def test_model_bigger_than_all_nodes_together():
    blocks = [LayerProfile(f"b{i}", 1, 60 * MB, MB, 1.0) for i in range(5)]
    with pytest.raises(
        PlanInfeasible, match=r"parameters need 300.0 MiB.*together have 200.0 MiB \(lack 100.0 MiB\)"
    ):
        plan(blocks, NODES)


@pytest.mark.parametrize("strategy", ["replicate", "monolith"])
def test_whole_model_strategies_say_which_node_lacks_how_much(strategy):
    nodes = [NodeCapacity("a", 1.0, 30 * MB), NodeCapacity("b", 1.0, 35 * MB)]
    with pytest.raises(PlanInfeasible, match=r"41.0 MiB\): a lacks 11.0 MiB, b lacks 6.0 MiB"):
        plan(BLOCKS, nodes, strategy=strategy)


def test_equal_split_that_fits_nowhere():
    nodes = [NodeCapacity("a", 1.0, 15 * MB), NodeCapacity("b", 1.0, 15 * MB)]
    with pytest.raises(PlanInfeasible, match=r"equal: .*lacks"):
        plan(BLOCKS, nodes, strategy="equal")


def test_pin_on_a_node_too_small():
    nodes = [NodeCapacity("a", 1.0, 100 * MB), NodeCapacity("b", 1.0, 15 * MB)]
    with pytest.raises(PlanInfeasible, match=r"pinned\[0\]: blocks 0..1 need 21.0 MiB.*'b' has 15.0 MiB"):
        plan(BLOCKS, nodes, pinned=[Pin(0, 1, "b")])


def test_more_pins_than_stages():
    with pytest.raises(PlanInfeasible, match="max_stages=1"):
        plan(BLOCKS, NODES, pinned=[Pin(0, 1, "a"), Pin(2, 3, "b")], max_stages=1)


def test_evaluate_rejects_broken_placements():
    good = plan(BLOCKS, NODES, objective="latency")
    stages = list(good.stages)
    with pytest.raises(InvalidSpec, match="do not continue the chain"):
        evaluate(stages[1:] or [stages[0].__class__("a", 1, 3)], BLOCKS, NODES)
    with pytest.raises(InvalidSpec, match="unknown node 'zz'"):
        evaluate([stages[0].__class__("zz", 0, 3)], BLOCKS, NODES)
    with pytest.raises(PlanInfeasible, match="lacks"):
        evaluate(good, BLOCKS, [NodeCapacity(n.name, 1.0, MB) for n in NODES])
