"""What mutual TLS costs (issue 10, item 9): plans measured with mTLS, measured again insecure.

Every other measurement of the benchmark runs with mutual TLS, as ``amp4ec run`` does. For
the configurations that ask for it, the same plans (the same nodes, stages and shares) are
deployed once more on a plaintext cluster (``--insecure``) and measured the same way:

- throughput loss = 1 − mTLS saturation / insecure saturation;
- added latency per hop = (mTLS − insecure median single-request latency) / hops, where a
  request crosses one hop per stage of its pipeline (client → entry, then stage → stage);
- the agents' CPU per request, both ways (their cgroups' CPU time over the saturation run ÷
  requests): what the stages' CPU limits divide, so 1 − insecure / mTLS is the throughput a
  CPU-bound plan loses, read from CPU time rather than wall time.

Measured one after the other, so run-to-run noise is in the wall-time figures: a few percent
on an idle machine, far more on a loaded one, where the CPU figures hold better (CPU time is
what each agent itself used, whatever else runs). The target (under 5% and 0.5 ms per hop) is
read from a full run, not ``--quick``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from amp4ec.bench.measure import Bench, measure_plan
from amp4ec.bench.results import MeasuredPlan, StrategyResult, TransportFigures, TransportRow
from amp4ec.local.cluster import LocalCluster, NodeSpec
from amp4ec.planner.types import Plan
from amp4ec.slicing.sources import factory_module
from amp4ec.wire.v1 import agent_pb2

__all__ = ["PLANS", "compare"]

PLANS = ("optimal", "equal")
"""The default plan, and a three-stage pipeline (every request crosses every node)."""


async def compare(
    bench: Bench,
    nodes: Sequence[NodeSpec],
    plans: Mapping[str, Plan],
    secure: Mapping[str, StrategyResult],
    rate: float | None,
    limit_mode: str,
    cfs_period_us: int,
) -> dict[str, TransportRow]:
    """Measure ``plans`` on a plaintext cluster of ``nodes``; compare with their mTLS figures.

    Runs once the configuration's cluster is gone (two clusters of one process at once would
    share cgroup names)."""
    out: dict[str, TransportRow] = {}
    allowed = [m for m in (factory_module(bench.source.spec),) if m]  # as the configuration's cluster
    async with LocalCluster(
        nodes, limit_mode, allow_factories=allowed, secure=False, cfs_period_us=cfs_period_us
    ) as cluster:
        for node in cluster.node_names:  # the reference workload one agent at a time, as the main run
            await cluster.agent_stub(node).GetCapacity(agent_pb2.CapacityRequest(), timeout=60)
        plaintext = replace(bench, cluster=cluster, hop=cluster.address)
        for name in PLANS:
            mtls = secure.get(name)
            if name not in plans or not isinstance(mtls, MeasuredPlan):
                continue
            insecure = await measure_plan(plaintext, plans[name], f"{name}, insecure", rate)
            out[name] = summarise(mtls, insecure, hops=max(len(p.stages) for p in plans[name].pipelines))
    return out


def summarise(mtls: MeasuredPlan, insecure: MeasuredPlan, hops: int) -> TransportRow:
    def figures(result: MeasuredPlan) -> TransportFigures:
        return TransportFigures(
            rps=result.saturation.rps,
            single_p50_ms=result.single_ms.p50,
            agent_cpu_ms=result.overhead.agent_cpu_ms,
        )

    a, b = figures(mtls), figures(insecure)
    return TransportRow(
        hops=hops,
        mtls=a,
        insecure=b,
        throughput_loss_pct=100 * (1 - a.rps / b.rps),
        added_ms_per_hop=(a.single_p50_ms - b.single_p50_ms) / hops,
        cpu_loss_pct=100 * (1 - b.agent_cpu_ms / a.agent_cpu_ms),
        added_cpu_ms=a.agent_cpu_ms - b.agent_cpu_ms,
    )
