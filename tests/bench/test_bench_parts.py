"""The benchmark's parts without a cluster: scaling, load generators, the delay proxy, the docs section."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from amp4ec.bench.configs import (
    ALL_CONFIGURATIONS,
    STRATEGIES,
    LinkShape,
    configurations,
    cpu_budget,
    scale_nodes,
)
from amp4ec.bench.links import ShapedLinks, links_available
from amp4ec.bench.markdown import BEGIN, END, write_docs
from amp4ec.bench.proxy import serve
from amp4ec.errors import InvalidSpec
from amp4ec.loadgen import closed_loop, open_loop
from amp4ec.slicing import ModelSource


def test_configurations_and_scaling() -> None:
    every = configurations(ModelSource("mobilenet_v2"))
    assert [c.name for c in every] == list(ALL_CONFIGURATIONS)
    standard = every[0]
    assert [n.cpu for n in standard.nodes] == [1.0, 0.6, 0.4]
    assert set(standard.strategies) == set(STRATEGIES)
    nodes, factor = scale_nodes(standard, cpu_budget(2))
    assert factor == pytest.approx(0.8)
    assert sum(n.cpu for n in nodes) == pytest.approx(1.6)
    assert scale_nodes(every[1], cpu_budget(2))[1] == 1.0, "1 CPU fits 2 cores with headroom"
    assert [c.name for c in configurations(ModelSource("mobilenet_v2"), quick=True)] == ["standard"]
    with pytest.raises(InvalidSpec, match="unknown configuration 'nope'"):
        configurations(ModelSource("mobilenet_v2"), only=("nope",))


class _FakeClient:
    """Answers after ``service_s``, one at a time (a single-server queue)."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.lock = asyncio.Lock()

    async def infer(self, inputs: object, deadline_s: float | None = None) -> SimpleNamespace:
        async with self.lock:
            await asyncio.sleep(self.service_s)
        return SimpleNamespace(latency_s=self.service_s)


def test_open_loop_counts_from_the_schedule_and_drops_what_is_too_slow() -> None:
    async def main() -> tuple:
        fast = await open_loop(_FakeClient(0.001), (), 20, 200.0, drop_after_s=1.0)  # type: ignore[arg-type]
        slow = await open_loop(_FakeClient(0.05), (), 10, 1000.0, drop_after_s=0.2)  # type: ignore[arg-type]
        results, wall = await closed_loop(_FakeClient(0.01), (), 10, 3)  # type: ignore[arg-type]
        return fast, slow, results, wall

    fast, slow, results, wall = asyncio.run(main())
    assert fast.completed == 20 and fast.dropped == 0 and fast.achieved_rps > 0
    assert min(fast.latencies_ms) >= 1.0
    # 10 requests in ~10 ms into a server that takes 50 ms each: the queue grows, latencies with it,
    # and what waits beyond 200 ms is dropped and counted.
    assert slow.dropped > 0 and slow.completed + slow.dropped == 10
    assert slow.latencies_ms == sorted(slow.latencies_ms)
    assert len(results) == 10 and wall >= 0.1


def test_the_proxy_adds_its_delay_each_way(tmp_path: Path) -> None:
    async def main() -> float:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        port_file = tmp_path / "proxy.port"
        proxy = asyncio.create_task(serve("127.0.0.1:0", f"127.0.0.1:{target_port}", 30.0, port_file))

        async def listening() -> None:  # the port file appears once the proxy listens
            while not port_file.exists():
                if proxy.done():
                    proxy.result()  # its exception, if it failed
                    raise AssertionError("the proxy stopped before it listened")
                await asyncio.sleep(0.01)

        await asyncio.wait_for(listening(), 10)
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port_file.read_text()))
        start = time.perf_counter()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        elapsed = time.perf_counter() - start
        writer.close()
        proxy.cancel()
        target.close()
        return elapsed

    assert asyncio.run(main()) >= 0.06


def test_docs_section_is_replaced_between_markers_and_the_rest_kept(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    write_docs(docs, "first table\n")
    assert BEGIN in docs.read_text() and "first table" in docs.read_text()
    docs.write_text("# Mine\n\nkeep me\n\n" + docs.read_text() + "\nand me\n")
    write_docs(docs, "second table\n")
    text = docs.read_text()
    assert "keep me" in text and "and me" in text and "second table" in text
    assert "first table" not in text and text.count(BEGIN) == 1 and text.count(END) == 1
    other = tmp_path / "other.md"
    other.write_text("# Benchmarks\n\nsomeone's notes\n")
    write_docs(other, "table\n")
    assert other.read_text().startswith("# Benchmarks\n\nsomeone's notes\n") and "table" in other.read_text()


@pytest.mark.skipif(links_available() is not None, reason=f"slow links: {links_available()}")
def test_shaped_links_delay_and_limit_then_leave_nothing_behind() -> None:
    def namespaces() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout

    async def main() -> tuple[float, float, str]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = target.sockets[0].getsockname()[1]
        async with ShapedLinks(
            LinkShape(rate_mbit=20, delay_ms=10), {"n0": f"127.0.0.1:{port}"}, os.getpid()
        ) as links:
            inside = namespaces()
            host, hop_port = links.hop("n0").rsplit(":", 1)
            assert host.startswith("198.18.")
            reader, writer = await asyncio.open_connection(host, int(hop_port))
            start = time.perf_counter()
            writer.write(b"x")
            await reader.readexactly(1)
            rtt = time.perf_counter() - start
            payload = bytes(250_000)  # 2 Mbit each way at 20 Mbit/s: at least 0.2 s
            start = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(len(payload))
            transfer = time.perf_counter() - start
            writer.close()
        target.close()
        return rtt, transfer, inside

    rtt, transfer, inside = asyncio.run(main())
    assert f"amp4ec-{os.getpid()}-0" in inside
    assert rtt >= 0.02 and transfer >= 0.2
    assert f"amp4ec-{os.getpid()}-" not in namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=False).stdout
    assert f"a4h{os.getpid() % 100000}x" not in links


@pytest.mark.skipif(links_available() is not None, reason=f"slow links: {links_available()}")
def test_shaped_links_are_measured_over_mutual_tls_to_the_control_port() -> None:
    """Echo is on the agent's control port, operator identity only: the probe goes there, through
    the same shaped path (delay and rate) the stages' traffic takes."""
    from amp4ec.local.cluster import LocalCluster, NodeSpec

    async def main() -> list:
        async with LocalCluster([NodeSpec("node0", 1.0), NodeSpec("node1", 1.0)], "none") as cluster:
            names = cluster.node_names
            targets = {n: cluster.address(n) for n in names}
            probes = {n: cluster.control_address(n) for n in names}
            async with ShapedLinks(
                LinkShape(rate_mbit=20, delay_ms=10), targets, os.getpid(), probes
            ) as links:
                return await links.links(names, [], cluster.security, cluster.identity)

    measured = asyncio.run(main())
    assert {(link.src, link.dst) for link in measured} == {("node0", "node1"), ("node1", "node0")}
    for link in measured:
        assert link.rtt_ms >= 20 and link.bandwidth_bytes_per_s < 20e6 / 8 * 1.2


def test_the_matched_monolith_is_tuned_only_where_it_has_several_cores() -> None:
    from amp4ec.bench.runner import matched_variants
    from amp4ec.local.cluster import NodeSpec

    assert matched_variants(NodeSpec("matched", 0.8)) == [NodeSpec("matched", 0.8)]
    variants = matched_variants(NodeSpec("matched", 1.6, 2**30))
    assert [(v.threads, v.workers) for v in variants] == [(None, 1), (2, 1), (None, 2)]
    assert len({v.name for v in variants}) == 3
    assert all(v.cpu == 1.6 and v.memory_bytes == 2**30 for v in variants)


def test_tenants_are_planned_in_turn_on_their_fair_share_of_what_is_free() -> None:
    from amp4ec.bench.markdown import render
    from amp4ec.bench.results import BenchResults
    from amp4ec.bench.tenants import MIN_CPU, plan_tenants
    from amp4ec.planner.types import LayerProfile, NodeCapacity

    blocks = [LayerProfile(f"b{i}", 10**6, 10**5, 10**4, 5.0) for i in range(4)]
    prepared = SimpleNamespace(profiles=blocks, chain=SimpleNamespace(input_bytes=10**4))
    nodes = [NodeCapacity("a", 0.8, 2**30, speed=0.8), NodeCapacity("b", 0.32, 2**30, speed=0.32)]
    plans = plan_tenants(prepared, nodes, 4)  # type: ignore[arg-type]
    assert len(plans) == 4
    for plan, granted in plans:
        assert granted == {"a": 0.2, "b": 0.08}  # a quarter of each node, every tenant alike
        assert {s.node for s in plan.stages} == {"a", "b"}
    # With more tenants than a node's share is worth, it is left out of their plans.
    assert all(set(g) == {"a"} for _, g in plan_tenants(prepared, nodes, 8))  # type: ignore[arg-type]
    assert MIN_CPU > 0.32 / 8
    result = {
        "name": "multi-tenant", "title": "t", "kind": "multi-tenant", "status": "ok", "model": "m",
        "scale_factor": 0.8, "nodes": [{"name": "a", "cpu": 0.8}], "note": "", "requests_per_tenant": 3,
        "cpu_limits": "cgroup", "ideal": {"rps": 20.0, "per_node_rps": {"a": 20.0}, "measured": "alone"},
        "aggregate_rps": 15.0, "fraction_of_ideal": 0.75,
        "tenants": [{"name": "t0", "plan": [{"pipeline": 0, "stage": 0, "node": "a", "first_block": 0,
                                             "last_block": 3}],
                     "cpu": 0.2, "fair_cpu": 0.2, "rps": 7.5, "predicted_rps": 8.0, "share": 0.5,
                     "fair_share": 0.5}],
    }  # fmt: skip
    machine = {
        "cpu": "x",
        "cores": 2,
        "memory_gb": 1,
        "kernel": "k",
        "python": "3",
        "torch": "t",
        "amp4ec": "0",
    }
    run = {"command": "c", "started": "s", "quick": False, "transport": "mutual TLS", "cpu_budget": 1.6}
    text = render(BenchResults.from_json({**run, "machine": machine, "configurations": [result]}))
    assert "Aggregate 15.0 req/s = 0.75× the ideal 20.0 req/s" in text
    assert "| t0 | a[0–3] | 0.20 (0.20) | 7.5 (8.0) | 50% (50%) |" in text


def test_the_batching_report_sets_the_planners_predictions_beside_the_measurements() -> None:
    from dataclasses import replace

    from amp4ec.bench.batching import BATCHING, _predicted, ratios
    from amp4ec.bench.json_form import to_json
    from amp4ec.bench.markdown import render
    from amp4ec.bench.results import (
        BatchingPredictions,
        BatchingResult,
        BenchResults,
        Ideal,
        MeasuredPlan,
        NodeShare,
        P95Plan,
        PlannerPrediction,
        PlanRow,
    )
    from amp4ec.planner import plan
    from amp4ec.planner.types import LayerProfile, NodeCapacity
    from amp4ec.wire.stage import Batching
    from tests.bench.samples import MACHINE, measured_plan

    blocks = [
        LayerProfile(f"b{i}", 10**6, 10**5, 10**4, 5.0, batch_ms=((2, 8.0), (4, 14.0))) for i in range(4)
    ]
    nodes = [NodeCapacity("a", 1.0, 2**30), NodeCapacity("b", 0.5, 2**30)]
    unbatched = _predicted(plan(blocks, nodes, tiles=False), 30.0)
    batched = _predicted(plan(blocks, nodes, tiles=False, max_batch=BATCHING.max_requests), 30.0)
    assert batched.saturation_rps > unbatched.saturation_rps  # 3.5 ms an image at batch 4, not 5
    assert unbatched.mean_batch == 1.0 < (batched.mean_batch or 0)  # 30 req/s on 75: some requests wait
    assert set(to_json(batched)) == {
        "saturation_rps",
        "rate_rps",
        "p50_ms",
        "p95_ms",
        "mean_batch",
        "expected_batches",
    }
    assert to_json(_predicted(plan(blocks, nodes, tiles=False), None)) == {
        "saturation_rps": unbatched.saturation_rps
    }
    assert batched.p95_ms is not None

    def row(rps: float, p95: float) -> MeasuredPlan:
        measured = measured_plan(rps, 20.0)
        return replace(measured, open_loop=replace(measured.open_loop, p50_ms=p95 / 2, p95_ms=p95, dropped=0))

    rows: dict = {"matched": row(40, 50), "matched_batched": row(45, 45), "optimal": row(50, 40),
                  "optimal_batched": row(2 * batched.saturation_rps, batched.p95_ms / 4),
                  "p95_objective": row(45, 25)}  # fmt: skip
    predicted = BatchingPredictions(unbatched, batched, PlannerPrediction(1.0, p95_ms=50.0))
    p95_plan = P95Plan(
        (PlanRow(0, 0, "a", 0, 3), PlanRow(1, 0, "b", 0, 1), PlanRow(1, 1, "c", 2, 3)),
        same_as_optimal=False,
        notes=("p95 50.0 ms predicted at 30 req/s, the lowest of 4 simulated",),
    )
    ideal = Ideal(50.0, {"a": 50.0}, "each node alone")
    figures = ratios(rows, ideal, predicted)
    assert figures["predicted_batched_saturation"] == pytest.approx(0.5)
    assert figures["predicted_batched_p95"] == pytest.approx(4.0)
    assert figures["predicted_saturation"] == pytest.approx(unbatched.saturation_rps / 50)
    result = BatchingResult(
        name="batching", title="t", model="m", scale_factor=1.0, nodes=(NodeShare("a", 1.0),),
        matched_cpu=1.5, batching=Batching(4, 0.0), targets={}, rows=rows, cpu_limits="",
        open_loop_rate_rps=30.0, ideal=ideal, ratios=figures, predicted=predicted, p95_plan=p95_plan,
    )  # fmt: skip
    text = render(BenchResults("c", "s", False, "mutual TLS", MACHINE, 1.6, (result,)))
    assert f"saturation {batched.saturation_rps:.1f} req/s (0.50×)" in text
    assert "(4.00×), mean batch" in text
    assert figures["p95_objective_p95_vs_matched"] == pytest.approx(0.5)
    assert "p95-objective plan for this rate (a ∥ b → c; the planner: p95 50.0 ms predicted" in text
    assert "monolith 0.50× (the optimal plan's 0.80×); predicted p95 50.0 ms" in text
    assert "(2.00× of measured)" in text


def test_every_configuration_runner_takes_what_the_suite_passes() -> None:
    # The suite calls each with the same keywords; one missing broke `--only batching` and
    # `--only multi-tenant` at their first step (a TypeError after profiling).
    import inspect

    from amp4ec.bench import suite

    runners = (suite.run_configuration, suite.run_failover, suite.run_latency, suite.run_batching)
    for run in (*runners, suite.run_multi_tenant):
        assert {"limit_mode", "cfs_period_us", "secure"} <= set(inspect.signature(run).parameters), run
