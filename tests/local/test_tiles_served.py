"""A tiled plan served by real agent processes over mutual TLS: the stage's node scatters row
tiles to two other agents, gathers their rows, runs a block alone, tiles again, runs the rest,
and the answer equals the monolith."""

from __future__ import annotations

import asyncio

import pytest
import torch

from amp4ec.local import LocalCluster, NodeSpec
from amp4ec.local.run import client_of, deploy
from amp4ec.planner import Pipeline, Plan, Prediction, Stage, TileGroup
from amp4ec.planner.tiles import split_rows
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.slicing.tiles import tileable_prefix

pytestmark = pytest.mark.slow
SOURCE = ModelSource("mobilenet_v2", input_shape=(1, 3, 32, 32))


def test_agents_serve_a_tiled_stage_equal_to_the_monolith() -> None:
    loaded = load_model(SOURCE)
    chain = split_model(loaded)
    assert tileable_prefix(chain) > 4
    nodes3 = ("node0", "node1", "node2")

    def phase(first: int, last: int) -> TileGroup:
        rows = tuple(split_rows(chain.boundaries[last + 1][0].shape[2], [1.0, 0.6, 0.4]))
        return TileGroup(first, last, nodes3, rows)

    # Blocks 0-1 tiled (16 rows), block 2 on node0 alone, block 3 tiled (8 rows), the rest alone.
    stage = Stage("node0", 0, len(chain) - 1, tiles=(phase(0, 1), phase(3, 3)))
    plan = Plan("latency", "optimal", (Pipeline((stage,)),), Prediction((0.0,), 0.0, 0.0, 0.0))
    with torch.inference_mode():
        expected = loaded.module(*loaded.example_inputs)
    nodes = [NodeSpec(f"node{i}", 1.0) for i in range(3)]

    async def main() -> list[torch.Tensor]:
        async with LocalCluster(nodes, limit_mode="none") as cluster:
            await deploy(cluster, plan, SOURCE)
            async with client_of(cluster, plan) as client:
                results = await asyncio.gather(*(client.infer(loaded.example_inputs) for _ in range(4)))
            return [r.outputs[0] for r in results]

    for out in asyncio.run(main()):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
