"""Three real node-agent processes streaming activations over gRPC, and local mode end to end."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from amp4ec.errors import InvalidSpec
from amp4ec.local import LocalCluster, NodeSpec, RunConfig, parse_nodes, run
from amp4ec.local.cgroups import cgroups_available
from amp4ec.local.cluster import CLIENT_IDENTITY
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.wire.v1 import agent_pb2
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
MODEL = "tests.model_zoo:residual_net"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _agents_can_import_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    # Agent processes import the test model by "tests.model_zoo:..." like a user's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_three_agent_pipeline_equals_monolith_and_cleans_up() -> None:
    loaded = load_model(ModelSource(MODEL))
    n = len(split_model(loaded))
    assert n >= 3
    with torch.inference_mode():
        expected = loaded.module(*loaded.example_inputs)
    cuts = [(0, n // 3 - 1), (n // 3, 2 * n // 3 - 1), (2 * n // 3, n - 1)]
    nodes = [NodeSpec(f"node{i}", 0.5) for i in range(3)]

    async def main() -> tuple[list[int], list[Path]]:
        async with LocalCluster(nodes, limit_mode="auto", allow_factories=["tests.model_zoo"]) as cluster:
            pids = [a.process.pid for a in cluster.agents.values()]
            groups = [d for a in cluster.agents.values() if a.cgroup for d in a.cgroup.dirs]
            # Loaded last stage first or not: the next hop is dialled lazily, order does not matter.
            for i, (first, last) in enumerate(cuts):
                nxt = cluster.address(f"node{i + 1}") if i < 2 else ""
                spec = agent_pb2.StageSpec(
                    model=MODEL,
                    first_block=first,
                    last_block=last,
                    next_hop=nxt,
                    stage=i,
                    next_hop_identity=cluster.identity(f"node{i + 1}") if i < 2 else "",
                    accept_from=[cluster.identity(f"node{i - 1}") if i else CLIENT_IDENTITY],
                )
                info = await cluster.load(f"node{i}", spec)
                assert (info.first_block, info.last_block) == (first, last)
            async with cluster.client(["node0"]) as client:
                results = await asyncio.gather(*(client.infer(loaded.example_inputs) for _ in range(8)))
            for r in results:
                torch.testing.assert_close(r.outputs[0], expected, rtol=1e-4, atol=1e-5)
                assert [t.stage for t in r.timings] == [0, 1, 2]
        return pids, groups

    pids, groups = asyncio.run(main())
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    for d in groups:
        assert not d.exists(), f"cgroup {d} left behind"
    if cgroups_available():
        assert groups, "cgroup mode was available but no cgroup was made"


@pytest.mark.parametrize("strategy", ["optimal", "equal"])
def test_local_run_end_to_end_reports_a_correct_result(strategy: str) -> None:
    config = RunConfig(
        source=ModelSource("mobilenet_v2", input_shape=(1, 3, 64, 64)),
        nodes=tuple(parse_nodes("1.0,0.6,0.4")),
        requests=12,
        strategy=strategy,
    )
    phases: list[str] = []
    report = asyncio.run(run(config, lambda phase, done, total: phases.append(phase)))
    data = report.to_json()
    assert data["max_abs_diff"] < 1e-4
    assert data["transport"] == "mutual TLS"  # the default: an ephemeral CA for the run
    assert data["plan"][0]["first_block"] == 0
    blocks = [
        b
        for row in data["plan"]
        if row["pipeline"] == 0
        for b in range(row["first_block"], row["last_block"] + 1)
    ]
    assert blocks == sorted(blocks) and blocks[0] == 0
    assert data["latency_ms"]["p50"] > 0 and data["latency_ms"]["p95"] >= data["latency_ms"]["p50"]
    assert data["throughput_rps"] > 0
    assert len(report.latencies_ms) == 12
    assert "requests" in phases
    assert data["strategy"] == strategy
    if strategy == "equal":  # one pipeline of three stages: 21 blocks as 7/7/7
        assert [(r["first_block"], r["last_block"]) for r in data["plan"]] == [(0, 6), (7, 13), (14, 20)]
    measured = [s["measured_ms"] for s in data["stages"]]
    assert len(measured) == len(data["plan"])
    # Dispatch by expected completion may leave a slow replica without a request in 12: no
    # figure for it (NaN); every stage that served has one, and the first pipeline served.
    served = [m for m in measured if not math.isnan(m)]
    assert all(m > 0 for m in served) and not math.isnan(measured[0])


def test_bad_run_arguments() -> None:
    with pytest.raises(InvalidSpec, match=r"--nodes\[1\]: expected a CPU share > 0"):
        parse_nodes("1.0,0,0.4")
    with pytest.raises(InvalidSpec, match=r"--nodes\[0\]: expected a CPU share such as 0.4, got 'x'"):
        parse_nodes("x")
    config = RunConfig(
        source=ModelSource(MODEL), nodes=tuple(parse_nodes(",".join(["0.5"] * 40))), requests=1
    )
    with pytest.raises(InvalidSpec, match=r"40 nodes but .* has only"):
        asyncio.run(run(config))


@pytest.mark.skipif(not cgroups_available(), reason="needs cgroup v1 permission (root)")
def test_a_nodes_memory_is_read_and_limited_through_the_cluster() -> None:
    async def main() -> tuple[int | None, int | None, int | None]:
        nodes = [NodeSpec("limited", 0.5, memory_bytes=1 << 30), NodeSpec("free", 0.5)]
        async with LocalCluster(nodes, limit_mode="cgroup") as cluster:
            resident = cluster.resident_bytes("limited")
            assert resident is not None
            cluster.set_memory_limit("limited", resident + (256 << 20))
            free = cluster.resident_bytes("free")
            with pytest.raises(ValueError, match="node free has no memory cgroup"):
                cluster.set_memory_limit("free", 1 << 30)
            pid = cluster.agents["limited"].process.pid
            (path,) = [
                line.split(":", 2)[2]
                for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if "memory" in line.split(":")[1].split(",")
            ]
            limit = int(Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes").read_text())
            return resident, free, limit

    resident, free, limit = asyncio.run(main())
    assert resident is not None and resident > 64 << 20, "an agent holds Python, torch and gRPC"
    assert free is None
    assert limit == resident + (256 << 20)


def test_agents_are_faulted_and_read_through_the_clusters_public_methods() -> None:
    """What the bench uses instead of the agents' processes: names, addresses, limits, faults."""

    async def main() -> None:
        nodes = [NodeSpec("a", 0.5, memory_bytes=1 << 30), NodeSpec("b", 0.5)]
        async with LocalCluster(nodes, limit_mode="none", secure=False) as cluster:
            assert cluster.node_names == ["a", "b"]
            assert cluster.memory_limit("a") == 1 << 30 and cluster.memory_limit("b") is None
            assert cluster.control_address("a").startswith("127.0.0.1:")
            assert cluster.control_address("a") != cluster.address("a")
            assert cluster.exited() == {}
            cluster.send_signal("a", signal.SIGKILL)
            reasons = wait_for(cluster.exited, 30, "agent a to exit")
            assert reasons == {
                "a": "was killed (SIGKILL): most likely out of memory under its 1024 MiB limit"
            }
            cluster.send_signal("b", signal.SIGSTOP)
            cluster.kill("b")  # a stopped agent dies at once
            assert set(wait_for(lambda: len(cluster.exited()) == 2 and cluster.exited(), 30, "b")) == {
                "a",
                "b",
            }
            cluster.send_signal("a", signal.SIGKILL)  # gone already: nothing to signal, no error
            cluster.kill("a")

    asyncio.run(main())
