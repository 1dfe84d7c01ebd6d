"""Tile groups in the planner: chosen where they cut latency, priced with their halo and their
scatter/gather bytes, refused on slow links where they lose."""

from __future__ import annotations

import pytest

from amp4ec.planner import LayerProfile, Link, NodeCapacity, TileRows, plan
from amp4ec.planner.cost import CostModel
from amp4ec.planner.tiles import _stripe_work, best_tiled

H = 64
MIB = 2**20


def _conv3x3(height: int) -> TileRows:
    """A stride-1 3x3 convolution with padding 1: row r reads rows r-1..r+1."""
    return TileRows(
        in_height=height,
        out_height=height,
        lo=tuple(max(0, r - 1) for r in range(height)),
        hi=tuple(min(height, r + 2) for r in range(height)),
    )


def _cnn(convs: int = 6, conv_ms: float = 10.0, head_ms: float = 2.0) -> list[LayerProfile]:
    act = 32 * H * H * 4
    blocks = [
        LayerProfile(f"conv{i}", 10**8, 10_000, act, conv_ms, 2 * act, tile=_conv3x3(H)) for i in range(convs)
    ]
    return [*blocks, LayerProfile("head", 10**6, 10_000, 4000, head_ms, act)]


NODES = [
    NodeCapacity("node0", 1.0, 512 * MIB, speed=1.0, overhead_ms=0.3),
    NodeCapacity("node1", 0.6, 512 * MIB, speed=0.6, overhead_ms=0.3),
    NodeCapacity("node2", 0.4, 512 * MIB, speed=0.4, overhead_ms=0.3),
]
INPUT = 3 * H * H * 4


def test_latency_objective_tiles_the_convolutions_over_all_nodes() -> None:
    blocks = _cnn()
    result = plan(blocks, NODES, objective="latency", input_bytes=INPUT)
    (stage,) = result.stages
    assert stage.tiles is not None, result
    assert stage.node == "node0" and stage.tiles.nodes[0] == "node0"
    assert set(stage.tiles.nodes) == {"node0", "node1", "node2"}
    heights = [b - a for a, b in stage.tiles.rows]
    assert heights == sorted(heights, reverse=True) and sum(heights) == H  # proportional to speed
    alone = sum(b.compute_ms for b in blocks) + 0.3
    assert result.predicted.latency_ms < 0.7 * alone
    assert any("row tiles" in n for n in result.notes)


def test_halo_costs_work_beyond_the_stripe() -> None:
    cm = CostModel(_cnn(), NODES, input_bytes=INPUT)
    whole, _ = _stripe_work(cm, 5, (0, H))
    stripes = [(0, 20), (20, 40), (40, H)]
    parts = [_stripe_work(cm, 5, r) for r in stripes]
    assert whole == pytest.approx(60.0)
    assert sum(w for w, _ in parts) > whole  # the inner stripes recompute their neighbours' rows
    _, rows = parts[1]
    assert rows == (14, 46)  # six 3x3 convolutions: a halo of six rows on each side


def test_slow_links_keep_the_fastest_node_alone() -> None:
    # Little compute, big activations, 10 Mbit/s: scatter and gather cost more than tiles save.
    blocks = _cnn(conv_ms=1.0)
    slow = Link("*", "*", rtt_ms=4.0, bandwidth_bytes_per_s=10e6 / 8)
    result = plan(blocks, NODES, objective="latency", input_bytes=INPUT, default_link=slow)
    assert all(s.tiles is None for s in result.stages)
    assert best_tiled(CostModel(blocks, NODES, default_link=slow, input_bytes=INPUT), "latency") is not None
    fast = plan(blocks, NODES, objective="latency", input_bytes=INPUT)
    assert fast.stages[0].tiles is not None  # the same model on loopback is tiled


def test_throughput_objective_keeps_replicas_when_tiles_do_not_help() -> None:
    result = plan(_cnn(), NODES, objective="throughput", input_bytes=INPUT)
    assert all(s.tiles is None for s in result.stages)
    assert len(result.pipelines) == 3  # every node a replica: nothing recomputed, nothing scattered


def test_a_node_too_small_for_the_tiled_blocks_gets_no_tile() -> None:
    small = [*NODES[:2], NodeCapacity("node2", 0.4, 30_000, speed=0.4, overhead_ms=0.3)]
    result = plan(_cnn(), small, objective="latency", input_bytes=INPUT)
    (stage,) = result.stages
    assert stage.tiles is not None and "node2" not in stage.tiles.nodes
