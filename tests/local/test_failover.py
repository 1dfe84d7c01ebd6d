"""Chaos: kill -9 or SIGSTOP one real agent mid-run; no request may fail.

Each case starts real agent processes, serves a plan over real gRPC through the Client
under the local Supervisor, and signals one agent once a third of the requests are
answered (a condition, not a time). Every answer is checked against the monolith.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from amp4ec import planner
from amp4ec.client import Client, Result, RetryPolicy
from amp4ec.errors import Amp4ecError, DeadlineExceeded, ShardUnavailable
from amp4ec.loadgen import closed_loop
from amp4ec.local import LocalCluster, NodeSpec, RunConfig, parse_nodes, run
from amp4ec.local.run import deploy
from amp4ec.local.supervisor import Supervisor, endpoints, parse_fault
from amp4ec.planner.types import NodeCapacity, Plan, Prediction
from amp4ec.slicing import ModelSource, load_model, profile_chain, split_model

pytestmark = pytest.mark.slow
MODEL = "tests.model_zoo:residual_net"
ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 300
FAULT_AFTER = 100


@pytest.fixture(autouse=True)
def _agents_can_import_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def model() -> tuple[ModelSource, list[planner.LayerProfile], int, tuple[torch.Tensor, ...], torch.Tensor]:
    source = ModelSource(MODEL)
    loaded = load_model(source)
    chain = split_model(loaded)
    profiles = profile_chain(chain, loaded.example_inputs, repeats=3)
    with torch.inference_mode():
        expected = loaded.module(*loaded.example_inputs)
    return source, profiles, chain.input_bytes, loaded.example_inputs, expected


def _capacities(names: list[str]) -> list[NodeCapacity]:
    return [NodeCapacity(n, cpu=0.5, memory_bytes=2**30, speed=1.0) for n in names]


def _plan(profiles, input_bytes: int, layout: str) -> Plan:
    """split: node0 → node1 → node2. replicated: that pipeline plus the whole model on node3."""
    split = planner.plan(
        profiles, _capacities(["node0", "node1", "node2"]), strategy="equal", input_bytes=input_bytes
    )
    if layout == "split":
        return split
    whole = planner.plan(profiles, _capacities(["node3"]), strategy="monolith", input_bytes=input_bytes)
    pipelines = split.pipelines + whole.pipelines
    stage_ms = tuple(s.stage_ms for p in pipelines for s in p.stages)
    rps = sum(1000 / max(s.stage_ms for s in p.stages) for p in pipelines)
    predicted = Prediction(stage_ms, max(stage_ms), split.predicted.latency_ms, rps)
    return Plan("throughput", "hybrid", pipelines, predicted)


@pytest.mark.parametrize("layout", ["replicated", "split"])
@pytest.mark.parametrize("kind", ["kill", "hang"])
@pytest.mark.parametrize("victim", ["node0", "node1", "node2"], ids=["entry", "middle", "last"])
def test_no_request_fails_when_an_agent_dies_or_hangs(model, layout: str, kind: str, victim: str) -> None:
    source, profiles, input_bytes, inputs, expected = model
    plan = _plan(profiles, input_bytes, layout)
    names = sorted({s.node for s in plan.stages})
    assert victim in {s.node for s in plan.pipelines[0].stages}

    def replan(alive) -> Plan:  # the same planner, on the survivors
        return planner.plan(profiles, _capacities(list(alive)), input_bytes=input_bytes)

    async def main() -> tuple[list[Result], list[str], Supervisor]:
        nodes = [NodeSpec(n, 0.5) for n in names]
        async with LocalCluster(nodes, limit_mode="none", allow_factories=["tests.model_zoo"]) as cluster:
            await deploy(cluster, plan, source)
            results: list[Result] = []
            errors: list[str] = []
            third = asyncio.Event()

            def done(result: Result) -> None:
                results.append(result)
                if len(results) >= FAULT_AFTER:
                    third.set()

            def failed(error: Amp4ecError) -> None:
                errors.append(str(error))

            async with (
                Client(endpoints(plan, cluster.address), cluster.client_security) as client,
                Supervisor(cluster, client, plan, replan, lambda p: deploy(cluster, p, source)) as supervisor,
            ):
                loop = asyncio.create_task(
                    closed_loop(client, inputs, REQUESTS, 4, done, failed, deadline_s=20)
                )
                process = cluster.agents[victim].process
                try:
                    await asyncio.wait_for(third.wait(), 60)
                    supervisor.injected[victim] = supervisor.now()
                    os.kill(process.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                    await asyncio.wait_for(loop, 60)
                    # The survivors may have answered everything before the re-plan finished.
                    await asyncio.wait_for(supervisor.recovered(), 30)
                finally:
                    supervisor.ignored.add(victim)
                    if process.poll() is None:  # stopped: killed, and continued so that it dies
                        process.kill()
                        os.kill(process.pid, signal.SIGCONT)
                    loop.cancel()
            return results, errors, supervisor

    started = time.monotonic()
    results, errors, supervisor = asyncio.run(main())
    assert errors == [], errors[:3]
    assert len(results) == REQUESTS
    for r in results:
        torch.testing.assert_close(r.outputs[0], expected, rtol=1e-4, atol=1e-5)
    (failover,) = supervisor.failovers
    assert failover.node == victim and failover.kind == ("exited" if kind == "kill" else "hung")
    assert failover.error == "" and failover.recovery_s is not None
    assert victim not in {row["node"] for row in failover.plan_after}
    covered = sorted(
        b
        for row in failover.plan_after
        if row["pipeline"] == 0
        for b in range(row["first_block"], row["last_block"] + 1)
    )
    assert covered == list(range(len(profiles)))
    print(
        f"{layout} {kind} {victim}: recovered in {failover.recovery_s:.2f} s "
        f"(detected {failover.detected_s - failover.fault_s:.2f} s after the fault), "
        f"{sum(r.attempts > 1 for r in results)} retried, test took {time.monotonic() - started:.1f} s"
    )


def test_client_alone_routes_around_dead_and_hung_pipelines_and_fails_fast(model) -> None:
    """No supervisor: the client ejects a dead replica instead of black-holing into it (it has
    0 requests in flight), retries what a hung pipeline held on the others; a stage that cannot
    forward says so in seconds, naming the stage and node; a hung entry cannot hold a request
    past its deadline."""
    source, profiles, input_bytes, inputs, _ = model
    split = planner.plan(profiles, _capacities(["node0", "node1"]), strategy="equal", input_bytes=input_bytes)
    whole = planner.plan(profiles, _capacities(["node2"]), strategy="monolith", input_bytes=input_bytes)
    spare = planner.plan(profiles, _capacities(["node3"]), strategy="monolith", input_bytes=input_bytes)
    plan = Plan("throughput", "hybrid", split.pipelines + whole.pipelines + spare.pipelines, split.predicted)

    async def main() -> None:
        names = ("node0", "node1", "node2", "node3")
        async with LocalCluster(
            [NodeSpec(n, 0.5) for n in names], "none", allow_factories=["tests"]
        ) as cluster:
            await deploy(cluster, plan, source)
            stopped = []
            try:
                async with Client(endpoints(plan, cluster.address), cluster.client_security) as client:
                    await closed_loop(client, inputs, 20, 4)
                    cluster.agents["node3"].process.kill()
                    await asyncio.to_thread(cluster.agents["node3"].process.wait)  # gone, not dying
                    results: list[Result] = []

                    async def serve_until(done: Callable[[], bool]) -> None:
                        # Dispatch by expected completion may leave a pipeline idle for a while
                        # (it probes an idle one after dispatch.STALE_S): keep the load on until
                        # the fault has been met, then check that nothing was lost.
                        while True:
                            await closed_loop(client, inputs, 20, 4, results.append)
                            if done():
                                return

                    await asyncio.wait_for(serve_until(lambda: bool(client.stats.ejections)), 60)
                    assert len(results) % 20 == 0 and client.stats.failed == 0
                    assert [e[1] for e in client.stats.ejections] == ["stage 0 on node3"], client.stats
                    assert client.stats.retries <= 2 * client.policy.eject_after
                    results.clear()
                    stopped.append(cluster.agents["node1"].process)
                    os.kill(stopped[-1].pid, signal.SIGSTOP)
                    await asyncio.wait_for(serve_until(lambda: any(r.attempts > 1 for r in results)), 60)
                    # What went into the stuck pipeline was answered UNAVAILABLE once keepalive
                    # gave up on node1, and retried on the others: nothing failed.
                    assert len(results) % 20 == 0 and client.stats.failed == 0
                    assert any("stage 1 on node1 unavailable" in e for e in client.stats.recent_errors)

                entry = endpoints(plan, cluster.address)[:1]
                async with Client(
                    entry, cluster.client_security, policy=RetryPolicy(max_attempts=1)
                ) as alone:
                    started = time.monotonic()
                    with pytest.raises(
                        ShardUnavailable, match=r"UNAVAILABLE: .*stage 1 on node1 unavailable"
                    ):
                        await alone.infer(inputs)  # no deadline: keepalive and the connect timeout
                    assert time.monotonic() - started < 8

                stopped.append(cluster.agents["node2"].process)
                os.kill(stopped[-1].pid, signal.SIGSTOP)
                async with cluster.client(["node2"]) as hung:
                    started = time.monotonic()
                    with pytest.raises(DeadlineExceeded):
                        await hung.infer(inputs, deadline_s=1.0)
                    assert time.monotonic() - started < 1.5
            finally:
                for process in stopped:
                    process.kill()
                    os.kill(process.pid, signal.SIGCONT)

    asyncio.run(main())


def test_local_run_with_an_injected_fault_reports_the_failover_and_loses_nothing() -> None:
    config = RunConfig(
        source=ModelSource("mobilenet_v2", input_shape=(1, 3, 64, 64)),
        nodes=tuple(parse_nodes("1.0,0.6,0.4")),
        requests=300,
        strategy="equal",
        faults=(parse_fault("node2:kill@0.3s"),),
    )
    data = asyncio.run(run(config)).to_json()
    assert (data["answered"], data["failed"], data["errors"]) == (300, 0, [])
    (failover,) = data["failovers"]
    assert failover["node"] == "node2" and failover["kind"] == "exited" and failover["replanned"]
    assert 0.3 <= failover["fault_s"] < 3 and failover["recovery_s"] > 0
    assert [r["node"] for r in failover["plan_before"]] == ["node0", "node1", "node2"]
    assert {r["node"] for r in failover["plan_after"]} <= {"node0", "node1"}
    assert data["final_plan"] == failover["plan_after"]
    assert data["retried"] >= 1
