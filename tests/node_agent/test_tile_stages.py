"""Tile stages as the agent builds and runs them (no network): their rows equal the monolith's
rows, and a bad tile spec or frame is refused naming the field."""

from __future__ import annotations

import time

import pytest
import torch

from amp4ec.errors import InvalidSpec
from amp4ec.node_agent.executor import StageExecutor, build_stage
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.slicing.tiles import TiledRange
from amp4ec.wire import codec
from amp4ec.wire.stage import StageConfig, TilePeer, TilePhase
from amp4ec.wire.v1 import shard_pb2

MODEL = "tests.model_zoo:residual_net"
"""Five blocks; blocks 0-2 tileable, 16 rows each; the cuts inside the body carry the skip too."""


def _config(phases: tuple[TilePhase, ...], tile_only: bool, last: int) -> StageConfig:
    return StageConfig(MODEL, 0, last, tile_phases=phases, tile_only=tile_only)


def _own(rows: tuple[int, int]) -> TilePeer:
    return TilePeer("node1", "", "", rows)


def test_a_tile_stage_answers_its_rows_of_the_phase_a_frame_names() -> None:
    phases = ((0, 0, (4, 10)), (1, 2, (2, 5)))  # the second phase's cuts carry the skip too
    stage = build_stage(_config(tuple(TilePhase(a, b, (_own(r),)) for a, b, r in phases), True, 2))
    loaded = load_model(ModelSource(MODEL))
    chain = split_model(loaded)
    x = loaded.example_inputs
    executor = StageExecutor(1.0)
    try:
        for phase, (first, last, rows) in enumerate(phases):
            with torch.inference_mode():
                inputs = chain.shard(0, first - 1)(*x) if first else x
                expected = [t[:, :, rows[0] : rows[1]] for t in chain.shard(first, last)(*inputs)]
            part = TiledRange(chain, first, last).scatter(inputs, rows)
            frame = shard_pb2.Frame(request_id="r", tensors=codec.encode_all(part), tile_phase=phase)
            encoded, _ = executor._run(stage, frame, time.perf_counter())
            torch.testing.assert_close(codec.decode_all(encoded), expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(InvalidSpec, match=r"tile_phase: expected 0\.\.1, got 2"):
            executor._run(stage, shard_pb2.Frame(request_id="r", tile_phase=2), time.perf_counter())
    finally:
        executor.shutdown()


def _two(own: tuple[int, int], other: tuple[int, int]) -> tuple[TilePeer, ...]:
    return (TilePeer("node0", "", "", own), TilePeer("node1", "127.0.0.1:1", "", other))


@pytest.mark.parametrize(
    ("phases", "tile_only", "message"),
    [
        ((TilePhase(0, 2, _two((0, 5), (5, 7))),), False, "rows end at 7, expected 16"),
        ((TilePhase(0, 2, (TilePeer("n1", "127.0.0.1:1", "", (0, 16)),)),), False, "exactly one tile of"),
        (
            (TilePhase(1, 2, (_own((0, 16)),)), TilePhase(0, 0, (_own((0, 16)),))),
            False,
            r"tile_phases\[1\]: blocks",
        ),
        (
            (TilePhase(0, 2, (_own((6, 19)),)),),
            True,
            r"tile_phases\[0\]\.tiles\[0\]: rows 6\.\.19 not within",
        ),
        ((TilePhase(0, 3, (_own((0, 1)),)),), False, r"block 3 \(body\.2\) is not tileable"),
    ],
)
def test_bad_tile_specs_are_refused_naming_the_field(
    phases: tuple[TilePhase, ...], tile_only: bool, message: str
) -> None:
    with pytest.raises(InvalidSpec, match=message):
        build_stage(_config(phases, tile_only, 4))
