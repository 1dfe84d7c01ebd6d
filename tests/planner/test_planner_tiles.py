"""Tile groups in the planner: chosen where they cut latency, priced with their halo and their
scatter/gather bytes, refused on slow links where they lose."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.errors import InvalidSpec
from amp4ec.planner import LayerProfile, Link, NodeCapacity, Stage, TileRows, evaluate, plan, replan_reason
from amp4ec.planner.cost import CostModel
from amp4ec.planner.load import latency_under_load, pipeline_times
from amp4ec.planner.tiles import TILE_MARGIN, _phases, _walk, best_tiled

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
    assert stage.tiles, result
    for phase in stage.tiles:
        assert stage.node == "node0" and phase.nodes[0] == "node0"
        assert set(phase.nodes) == {"node0", "node1", "node2"}
        heights = [b - a for a, b in phase.rows]
        assert heights == sorted(heights, reverse=True) and sum(heights) == H  # proportional to speed
    assert stage.tiles[0].first_block == 0 and stage.tiles[-1].last_block == 5
    alone = sum(b.compute_ms for b in blocks) + 0.3
    assert result.predicted.latency_ms < 0.7 * alone
    assert any("row tiles" in n for n in result.notes)


def test_halo_costs_work_beyond_the_stripe() -> None:
    cm = CostModel(_cnn(), NODES, input_bytes=INPUT)
    whole, _ = _walk(cm, 5, (0, H))[0]
    stripes = [(0, 20), (20, 40), (40, H)]
    parts = [_walk(cm, 5, r)[0] for r in stripes]
    assert whole == pytest.approx(60.0)
    assert sum(w for w, _ in parts) > whole  # the inner stripes recompute their neighbours' rows
    _, rows = parts[1]
    assert rows == (14, 46)  # six 3x3 convolutions: a halo of six rows on each side


def test_a_tile_pays_the_blocks_fixed_part_whatever_its_rows() -> None:
    conv = replace(_conv3x3(H), fixed=0.5, overhead=0.1)
    assert conv.work(10.0, (0, H)) == pytest.approx(11.0)  # whole, as a tile: 10% more
    # 16 output rows read 18 input rows: half the block fixed, the rest by the mean share.
    assert conv.work(10.0, (16, 32)) == pytest.approx(10.0 * (0.5 + 0.6 * (16 / H + 18 / H) / 2))
    assert replace(conv, fixed=0.0, overhead=0.0).work(10.0, (16, 32)) == pytest.approx(10.0 * 17 / H)


def test_a_large_fixed_part_keeps_the_fastest_node_alone() -> None:
    """Small feature maps (weights streamed by every tile): three tiles each paying 60% of the
    block cost more than node0 alone, so the latency plan does not tile."""
    heavy = [replace(b, tile=replace(b.tile, fixed=0.6)) if b.tile else b for b in _cnn()]
    result = plan(heavy, NODES, objective="latency", input_bytes=INPUT)
    assert not any(s.tiles for s in result.stages)
    assert plan(_cnn(), NODES, objective="latency", input_bytes=INPUT).stages[0].tiles


def test_deep_halos_are_cut_by_stitching_between_phases() -> None:
    """Twenty 3x3 convolutions on 64 rows: one phase would make the middle stripe read 40 extra
    rows; stitching every few blocks keeps the halo small, so the planner uses several phases."""
    blocks = _cnn(convs=20, conv_ms=5.0)
    (stage,) = plan(blocks, NODES, objective="latency", input_bytes=INPUT).stages
    assert len(stage.tiles) > 1
    assert all(a.last_block < b.first_block for a, b in zip(stage.tiles, stage.tiles[1:], strict=False))


def test_slow_links_keep_the_fastest_node_alone() -> None:
    # Little compute, big activations, 10 Mbit/s: scatter and gather cost more than tiles save.
    blocks = _cnn(conv_ms=1.0)
    slow = Link("*", "*", rtt_ms=4.0, bandwidth_bytes_per_s=10e6 / 8)
    result = plan(blocks, NODES, objective="latency", input_bytes=INPUT, default_link=slow)
    assert not any(s.tiles for s in result.stages)
    # Every phase the planner could make is slower than node0 running its blocks alone.
    cm = CostModel(blocks, NODES, default_link=slow, input_bytes=INPUT)
    phases = [p for row in _phases(cm, 0, [0, 1, 2], 6) for p in row if p is not None]
    assert len(phases) == 21
    assert all(max(p.tile_ms) > sum(b.compute_ms for b in blocks[p.first : p.last + 1]) for p in phases)
    assert best_tiled(cm, "latency") is None
    fast = plan(blocks, NODES, objective="latency", input_bytes=INPUT)
    assert fast.stages[0].tiles  # the same model on loopback is tiled


def test_throughput_objective_keeps_replicas_when_tiles_do_not_help() -> None:
    result = plan(_cnn(), NODES, objective="throughput", input_bytes=INPUT)
    assert not any(s.tiles for s in result.stages)
    assert len(result.pipelines) == 3  # every node a replica: nothing recomputed, nothing scattered


def test_a_node_too_small_for_the_tiled_blocks_gets_no_tile() -> None:
    small = [*NODES[:2], NodeCapacity("node2", 0.4, 30_000, speed=0.4, overhead_ms=0.3)]
    result = plan(_cnn(), small, objective="latency", input_bytes=INPUT)
    (stage,) = result.stages
    assert stage.tiles and "node2" not in stage.tiles[0].nodes


def _with_codec(blocks: list[LayerProfile], ns_per_byte: float) -> list[LayerProfile]:
    return [replace(b, tile=replace(b.tile, codec_ns_per_byte=ns_per_byte)) if b.tile else b for b in blocks]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    convs=st.integers(2, 12),
    conv_ms=st.floats(0.5, 20.0),
    ns_per_byte=st.sampled_from([0.0, 0.3, 2.0]),
    speeds=st.lists(st.floats(0.2, 1.0), min_size=2, max_size=4),
    rtt_ms=st.sampled_from([0.05, 0.2, 2.0]),
)
def test_evaluate_prices_a_tiled_plan_as_the_planner_did(
    convs: int, conv_ms: float, ns_per_byte: float, speeds: list[float], rtt_ms: float
) -> None:
    """Whatever the planner chooses, re-pricing it (evaluate; re-planning) gives the same
    prediction, so a re-plan neither discards a tiled plan nor keeps a worse one by mistake."""
    blocks = _with_codec(_cnn(convs, conv_ms), ns_per_byte)
    nodes = [NodeCapacity(f"node{i}", s, 512 * MIB, speed=s, overhead_ms=0.3) for i, s in enumerate(speeds)]
    link = Link("*", "*", rtt_ms=rtt_ms, bandwidth_bytes_per_s=1e9)
    result = plan(blocks, nodes, objective="latency", input_bytes=INPUT, default_link=link)
    again = evaluate(result, blocks, nodes, input_bytes=INPUT, default_link=link)
    assert again.latency_ms == pytest.approx(result.predicted.latency_ms, rel=1e-9)
    assert again.bottleneck_ms == pytest.approx(result.predicted.bottleneck_ms, rel=1e-9)
    assert again.throughput_rps == pytest.approx(result.predicted.throughput_rps, rel=1e-9)
    assert replan_reason(result, result, 0.0, blocks=blocks, nodes=nodes, default_link=link,
                         input_bytes=INPUT) is None  # fmt: skip


def test_a_tiled_plan_is_priced_tiled_not_layer_wise_when_re_planning() -> None:
    blocks = _cnn()
    tiled = plan(blocks, NODES, objective="latency", input_bytes=INPUT)
    assert tiled.stages[0].tiles
    layerwise = evaluate([Stage("node0", 0, len(blocks) - 1)], blocks, NODES, input_bytes=INPUT)
    assert evaluate(tiled, blocks, NODES, input_bytes=INPUT).latency_ms < 0.7 * layerwise.latency_ms
    # A slower tile node since: the tiled plan's re-priced latency grows, so a re-plan may leave it.
    slower = [*NODES[:2], replace(NODES[2], speed=0.1, cpu=0.1)]
    assert evaluate(tiled, blocks, slower, input_bytes=INPUT).latency_ms > tiled.predicted.latency_ms


def test_a_tiled_stage_over_a_node_used_twice_or_rows_that_do_not_cover_is_refused() -> None:
    blocks = _cnn()
    (stage,) = plan(blocks, NODES, objective="latency", input_bytes=INPUT).stages
    g = stage.tiles[0]
    gap = replace(stage, tiles=(replace(g, rows=((0, 10), (12, 40), (40, H))), *stage.tiles[1:]))
    with pytest.raises(InvalidSpec, match=r"stages\[0\]\.tiles\[0\]\.rows: expected one stripe per node"):
        evaluate([gap], blocks, NODES, input_bytes=INPUT)
    twice = [replace(stage, last_block=len(blocks) - 2), Stage("node1", len(blocks) - 1, len(blocks) - 1)]
    with pytest.raises(InvalidSpec, match=r"stages\[1\]\.node: node 'node1' is used twice"):
        evaluate(twice, blocks, NODES, input_bytes=INPUT)


def test_scatter_and_gather_codec_cost_makes_fewer_phases_and_a_slower_prediction() -> None:
    """Encoding and decoding each stripe costs the stage's node CPU per phase: with a measured
    cost the planner stitches less often (or not at all), and never predicts faster."""
    blocks = _cnn(convs=20, conv_ms=5.0)
    free = plan(blocks, NODES, objective="latency", input_bytes=INPUT)
    costly = plan(_with_codec(blocks, 2.0), NODES, objective="latency", input_bytes=INPUT)
    assert len(free.stages[0].tiles) > 1
    assert len(costly.stages[0].tiles) < len(free.stages[0].tiles)
    assert costly.predicted.latency_ms > free.predicted.latency_ms


def test_a_tiled_stage_takes_requests_at_its_busiest_nodes_rate_under_load() -> None:
    """Its busiest node frees up before a request is stitched: the rate the plan promises is
    the one the load model (and the client's dispatch seeds) use, so at 80% of it the queue
    stays bounded (a stage taking its whole latency per request would be over 100% busy)."""
    link = Link("*", "*", rtt_ms=2.0, bandwidth_bytes_per_s=1e9)
    result = plan(_cnn(12, 5.0), NODES, objective="latency", input_bytes=INPUT, default_link=link)
    (stage,) = result.stages
    assert stage.tiles and 0.85 * stage.stage_ms > stage.busy_ms > 0
    assert result.predicted.throughput_rps == pytest.approx(1000 / stage.busy_ms)
    assert pipeline_times(result.pipelines[0])[1] == stage.busy_ms
    loaded = latency_under_load(result, 0.85 * result.predicted.throughput_rps)
    assert loaded.p50_ms < 5 * result.predicted.latency_ms


def test_tiles_must_beat_the_layer_wise_plan_by_the_margin() -> None:
    """Across link speeds, a tiled plan is chosen exactly when its prediction is at least 10%
    below the layer-wise plan's; between 0.9× and 1× the note says why it was not."""
    ratios = []
    for mbps in (50, 100, 200, 400, 800, 1600, 3200, 6400):
        link = Link("*", "*", rtt_ms=0.5, bandwidth_bytes_per_s=mbps * 1e6 / 8)
        cm = CostModel(_cnn(conv_ms=2.0), NODES, default_link=link, input_bytes=INPUT)
        tiled = best_tiled(cm, "latency")
        layerwise = plan(
            _cnn(conv_ms=2.0), NODES, objective="latency", input_bytes=INPUT, default_link=link, tiles=False
        )
        chosen = plan(_cnn(conv_ms=2.0), NODES, objective="latency", input_bytes=INPUT, default_link=link)
        ratio = tiled.latency_ms / layerwise.predicted.latency_ms if tiled else float("inf")
        ratios.append(ratio)
        assert bool(chosen.stages[0].tiles) == (ratio < TILE_MARGIN), (mbps, ratio)
        if TILE_MARGIN <= ratio < 1.0:
            assert any("not 10% better" in n for n in chosen.notes), chosen.notes
    assert any(TILE_MARGIN <= r < 1.0 for r in ratios), ratios  # the margin decided one case
    assert any(r < TILE_MARGIN for r in ratios), ratios
