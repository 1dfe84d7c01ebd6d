"""Dispatch by expected completion against real agents: a slow replica gets less traffic."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import pytest

from amp4ec.client import Client, Endpoint
from amp4ec.local import LocalCluster, NodeSpec
from amp4ec.local.cluster import CLIENT_IDENTITY
from amp4ec.slicing import ModelSource, load_model
from amp4ec.wire.v1 import agent_pb2

pytestmark = pytest.mark.slow
MODEL = "tests.model_zoo:residual_net"
SHAPE = (1, 3, 96, 96)  # ~5 ms a forward on one core
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _agents_can_import_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_a_slow_replica_gets_less_traffic() -> None:
    # Emulated CPU shares (each agent idles after a forward to match its share): deterministic,
    # where a CFS quota lets short bursts through at full speed.
    nodes = [NodeSpec("slow", 0.1), NodeSpec("fast", 1.0)]
    inputs = load_model(ModelSource(MODEL, input_shape=SHAPE)).example_inputs

    async def main() -> tuple[Counter[str], Counter[str], dict[str, float]]:
        async with LocalCluster(nodes, limit_mode="emulate", allow_factories=["tests.model_zoo"]) as cluster:
            spec = dict(model=MODEL, input_shape=list(SHAPE), first_block=0, last_block=-1)
            for node in ("slow", "fast"):
                await cluster.load(node, agent_pb2.StageSpec(**spec, accept_from=[CLIENT_IDENTITY]))
            # The slow replica first and nothing predicted: least-in-flight would send every
            # request of a sequential client to it; expected completion learns from answers.
            entries = [Endpoint(cluster.address(n), n, cluster.identity(n)) for n in ("slow", "fast")]
            async with Client(entries, cluster.client_security) as client:
                sequential: Counter[str] = Counter()
                for _ in range(40):
                    sequential[(await client.infer(inputs)).entry] += 1
                loaded: Counter[str] = Counter()

                async def worker() -> None:
                    for _ in range(20):
                        loaded[(await client.infer(inputs)).entry] += 1

                await asyncio.gather(*(worker() for _ in range(16)))
                estimates = {n: e.interval_ms or e.latency_ms for n, e in client.estimates.items()}
            address = {cluster.address(n): n for n in ("slow", "fast")}
        return (
            Counter({address[a]: c for a, c in sequential.items()}),
            Counter({address[a]: c for a, c in loaded.items()}),
            estimates,
        )

    sequential, loaded, estimates = asyncio.run(main())
    assert all(e > 0 for e in estimates.values()), estimates  # both learnt from answers
    assert sequential["fast"] >= 34, sequential  # a few tries of each, then the fast one
    # Under load the slow one is used too, but less than the fast one.
    assert 0 < loaded["slow"] < loaded["fast"], loaded
