"""The ``failover`` configuration: a node killed or hung mid-run, measured from the client.

Each scenario runs one plan (``optimal``: whole-model replicas on these nodes; ``equal``: a
split whose survivors must re-plan and load new stages) in a closed loop under the local
Supervisor, and signals one node's agent once a third of the requests are answered. From the
answers' timestamps it reports requests lost, p99 latency in the failover window and the
time from the fault to full throughput on the survivors (see ``recovery``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from amp4ec.bench.configs import Configuration, scale_nodes
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import (
    FailedScenario,
    FailoverResult,
    FailoverScenario,
    NodeShare,
    Recovery,
    ScenarioResult,
    plan_rows,
)
from amp4ec.client import Client, Result
from amp4ec.errors import Amp4ecError
from amp4ec.loadgen import closed_loop
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import LocalCluster
from amp4ec.local.run import deploy, measure_links, node_capacities, quantile
from amp4ec.local.supervisor import Supervisor, endpoints
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.types import Plan
from amp4ec.slicing.prepare import Prepared
from amp4ec.slicing.sources import factory_module

__all__ = ["TARGET_S", "VICTIM", "recovery", "run_failover"]

VICTIM = "node1"
"""The node faulted: the 0.6-CPU one, a replica or the middle stage of the split."""
TARGET_S = {"optimal": 3.0, "equal": 10.0}
"""Recovery targets: replicas remain (3 s); a re-plan must load new stages (10 s)."""
FULL = 0.9
"""Full throughput: at least this fraction of the survivors' steady rate."""
WINDOW_S = 1.0


def recovery(samples: Sequence[tuple[float, float]], fault_s: float, concurrency: int) -> Recovery:
    """From (start, end) times of the answered requests (seconds, the run's clock):

    - ``rps_before``: the rate before the fault; ``rps_after``: the survivors' steady rate, over
      the second half of the answers after the fault (the loop's last ``concurrency`` answers,
      its drain, left out);
    - ``to_full_s``: from the fault to the start of the first ``WINDOW_S`` window, wholly after
      the fault, that answers at least ``FULL`` of ``rps_after`` (scanned every 0.05 s);
    - ``p99_window_ms`` / ``max_window_ms``: latency of the requests in flight at any time
      between the fault and full throughput (the failover window); ``p99_before_ms``."""
    ends = sorted(end for _, end in samples)
    steady = [e for e in ends if e > fault_s][: -concurrency or None]
    before = [(e - s) * 1000 for s, e in samples if e <= fault_s]
    out = Recovery(
        rps_before=len(before) / fault_s if before and fault_s > 0 else None,
        p99_before_ms=quantile(before, 0.99) if before else None,
    )
    if len(steady) < 20:
        return out
    half = steady[len(steady) // 2 :]
    rps_after = (len(half) - 1) / max(half[-1] - half[0], 1e-9)
    to_full, t = None, fault_s
    while t + WINDOW_S <= steady[-1]:
        if sum(1 for e in steady if t < e <= t + WINDOW_S) >= FULL * rps_after * WINDOW_S:
            to_full = t - fault_s
            break
        t += 0.05
    window_end = fault_s + to_full if to_full is not None else steady[-1]
    during = [(e - s) * 1000 for s, e in samples if s <= window_end and e > fault_s]
    return replace(
        out,
        rps_after=rps_after,
        to_full_s=to_full,
        p99_window_ms=quantile(during, 0.99) if during else None,
        max_window_ms=max(during) if during else None,
    )


async def run_failover(
    config: Configuration,
    prepared: Prepared,
    budget: float,
    progress: ProgressSink,
    *,
    limit_mode: str = "auto",
    cfs_period_us: int = PERIOD_US,
    secure: bool = True,
) -> FailoverResult:
    nodes, factor = scale_nodes(config, budget)
    scenarios: list[ScenarioResult] = []
    cpu_limits = ""
    for strategy, fault in config.faults:
        label = f"{strategy}, {VICTIM} {fault}"
        try:
            cpu_limits, result = await _scenario(
                config, prepared, nodes, strategy, fault, progress, limit_mode, secure, cfs_period_us
            )
        except Amp4ecError as e:
            progress.note(f"failover {label} failed: {e}")
            result = FailedScenario(strategy, fault, "failed", str(e))
        scenarios.append(result)
        progress.step()
    return FailoverResult(
        name=config.name,
        title=config.title,
        model=config.source.spec,
        scale_factor=factor,
        nodes=tuple(NodeShare(n.name, n.cpu) for n in nodes),
        requests=config.sizes.saturation,
        scenarios=tuple(scenarios),
        cpu_limits=cpu_limits,
        note=config.note,
    )


async def _scenario(
    config: Configuration,
    prepared: Prepared,
    nodes: Sequence[Any],
    strategy: str,
    fault: str,
    progress: ProgressSink,
    limit_mode: str,
    secure: bool,
    cfs_period_us: int,
) -> tuple[str, FailoverScenario]:
    """The scenario's figures, and the CPU limits its cluster ran under."""
    requests = config.sizes.saturation  # the failover's request count (see configs.FAILOVER)
    inputs = prepared.loaded.example_inputs
    progress.phase(f"failover ({strategy}, {VICTIM} {fault}): starting agents")
    named = [m for m in (factory_module(config.source.spec),) if m]  # a factory the user named
    async with LocalCluster(
        nodes, limit_mode, allow_factories=named, secure=secure, cfs_period_us=cfs_period_us
    ) as cluster:
        capacity = node_capacities(await cluster.capacities(), prepared.reference_ms)
        links = await measure_links(cluster)

        def replan(alive: Sequence[str]) -> Plan:
            survivors = [n for n in capacity if n.name in alive]
            kept = [link for link in links if {link.src, link.dst} <= {"client", *alive}]
            return timed_plan(
                prepared.profiles,
                survivors,
                strategy=strategy,
                input_bytes=prepared.chain.input_bytes,
                links=kept,
            )[0]

        plan = replan(cluster.node_names)
        await deploy(cluster, plan, config.source)
        concurrency = max(len(p.stages) for p in plan.pipelines) * len(plan.pipelines)
        samples: list[tuple[float, float, int]] = []
        lost: list[str] = []
        third = asyncio.Event()
        async with (
            Client(endpoints(plan, cluster.address), cluster.client_security) as client,
            Supervisor(cluster, client, plan, replan, lambda p: deploy(cluster, p, config.source)) as sup,
        ):
            await closed_loop(client, inputs, 2 * len(plan.stages), concurrency, deadline_s=30)

            def done(result: Result) -> None:
                end = sup.now()
                samples.append((end - result.latency_s, end, result.attempts))
                progress.advance()
                if len(samples) >= requests // 3:
                    third.set()

            def failed(error: Amp4ecError) -> None:
                lost.append(str(error))
                progress.advance()

            progress.phase(f"failover ({strategy}, {VICTIM} {fault}): {requests} requests", requests)
            sup.start = time.monotonic()  # the run's clock starts now
            loop = asyncio.create_task(closed_loop(client, inputs, requests, concurrency, done, failed, 30))
            try:
                await asyncio.wait_for(third.wait(), 300)
                fault_s = sup.injected[VICTIM] = sup.now()
                cluster.send_signal(VICTIM, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                await asyncio.wait_for(loop, 300)
                (record,) = await asyncio.wait_for(sup.recovered(), 60)
            finally:
                loop.cancel()
                sup.ignored.add(VICTIM)
                cluster.kill(VICTIM)
        figures = recovery([(s, e) for s, e, _ in samples], fault_s, concurrency)
        to_full = figures.to_full_s
        return cluster.limit_description, FailoverScenario(
            strategy=strategy,
            fault=fault,
            node=VICTIM,
            requests=requests,
            answered=len(samples),
            lost=len(lost),
            errors=tuple(sorted(set(lost))[:5]),
            retried=sum(1 for *_, attempts in samples if attempts > 1),
            concurrency=concurrency,
            fault_s=fault_s,
            detected_after_s=record.detected_s - fault_s,
            serving_after_s=record.recovery_s,
            replanned=record.replanned,
            target_s=TARGET_S.get(strategy),
            met=len(lost) == 0 and to_full is not None and to_full < TARGET_S.get(strategy, float("inf")),
            plan_before=plan_rows(plan.rows()),
            plan_after=plan_rows(record.plan_after),
            **asdict(figures),
        )
