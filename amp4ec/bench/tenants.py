"""The ``multi-tenant`` configuration: several deployments of one model share the same nodes.

Each tenant is planned in turn, as the operator plans a deployment (``planner.shares``, the
rules of ``operator/placement.py``): on each node it may take at most its fair share of the
node's CPU (equal weights: 1/k of it with k tenants) and at most what the tenants before it left
free; a node offering less than ``MIN_CPU`` is left out. The plan is the optimal throughput plan
on those shares (speeds scaled to them). Each (tenant, node) stage then runs in an agent of its
own under a CPU quota of the share it was granted, as a shard Pod's limit would hold it, and all
tenants are driven at once, closed loop.

Reported, side by side from one run: the aggregate throughput against the *ideal* (each node
running the whole model alone under its full share, all nodes driven at once, summed: what the
nodes could do with no sharing and no splitting, under the same contention for the machine as
the tenants), and each tenant's share of the aggregate against its fair share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from amp4ec.bench.configs import Configuration, scale_nodes
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import Ideal, MultiTenantResult, NodeShare, TenantRow, plan_rows
from amp4ec.bench.runner import _capacities, _named, _plan
from amp4ec.errors import PlanInfeasible
from amp4ec.loadgen import closed_loop
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import LocalCluster
from amp4ec.local.run import client_of, deploy, node_capacities
from amp4ec.nodes import NodeSpec
from amp4ec.planner.shares import fair_share, millicores, scaled
from amp4ec.planner.types import NodeCapacity, Pipeline, Plan
from amp4ec.slicing.prepare import Prepared

__all__ = ["MIN_CPU", "plan_tenants", "run_multi_tenant"]

MIN_CPU = 0.05
"""Least share worth a stage here (the operator's default is 0.1 core; the shares of this
machine's scaled nodes are smaller)."""


def plan_tenants(
    prepared: Prepared, nodes: Sequence[NodeCapacity], tenants: int
) -> list[tuple[Plan, dict[str, float]]]:
    """Each tenant's plan and the CPU it was granted per node, planned in turn (module docstring)."""
    taken = {n.name: 0.0 for n in nodes}
    out = []
    for _ in range(tenants):
        offered = []
        for n in nodes:
            share = min(fair_share(n.cpu, 1, [1] * (tenants - 1)), n.cpu - taken[n.name])
            share = millicores(share)  # as a Pod's request
            if share >= MIN_CPU:
                offered.append(scaled(n, share))
        if not offered:
            raise PlanInfeasible(f"multi-tenant: no node offers {MIN_CPU} cpu to tenant {len(out)}")
        plan, _ = _plan(prepared, offered, "optimal", [], repeats=1)
        granted = {s.node: next(o.cpu for o in offered if o.name == s.node) for s in plan.stages}
        for node, cpu in granted.items():
            taken[node] += cpu
        out.append((plan, granted))
    return out


async def _ideal_at_once(
    cluster: LocalCluster,
    prepared: Prepared,
    config: Configuration,
    caps: Sequence[NodeCapacity],
    progress: ProgressSink,
) -> Ideal | None:
    """Each node running the whole model under its full share, all nodes driven at once (as the
    tenants are: the machine's contention is the same on both sides of the ratio); None when a
    node cannot hold the model."""
    try:
        plan, _ = _plan(prepared, caps, "replicate", [], repeats=1)
    except PlanInfeasible:
        return None
    if len(plan.pipelines) < len(caps):
        return None
    await deploy(cluster, plan, config.source)
    inputs = prepared.loaded.example_inputs
    n = config.sizes.saturation
    progress.phase("ideal: every node alone with the whole model, all at once", n * len(caps))

    async def drive(node: str) -> tuple[str, float]:
        async with cluster.client([node]) as client:
            await closed_loop(client, inputs, 2, 2)  # warm
            results, wall = await closed_loop(client, inputs, n, 2, lambda _: progress.advance())
        return node, len(results) / wall

    per_node = dict(await asyncio.gather(*(drive(p.stages[0].node) for p in plan.pipelines)))
    where = "each node alone with the whole model under its CPU quota, all nodes driven at once"
    return Ideal(sum(per_node.values()), per_node, where)


def _renamed(plan: Plan, tag: str) -> Plan:
    """The plan with each node ``N`` renamed to the tenant's agent ``<tag>-N``."""
    pipelines = tuple(
        Pipeline(tuple(replace(s, node=f"{tag}-{s.node}") for s in p.stages)) for p in plan.pipelines
    )
    return replace(plan, pipelines=pipelines)


async def run_multi_tenant(
    config: Configuration,
    prepared: Prepared,
    budget: float,
    progress: ProgressSink,
    *,
    limit_mode: str = "auto",
    cfs_period_us: int = PERIOD_US,
    secure: bool = True,
) -> MultiTenantResult:
    nodes, factor = scale_nodes(config, budget)
    k = config.tenants
    allow = _named(config.source)
    async with LocalCluster(
        nodes, limit_mode, allow_factories=allow, secure=secure, cfs_period_us=cfs_period_us
    ) as cluster:
        cpu_limits = cluster.limit_description
        caps = node_capacities(await _capacities(cluster), prepared.reference_ms)
        ideal = await _ideal_at_once(cluster, prepared, config, caps, progress)
        progress.step()
    plans = plan_tenants(prepared, caps, k)
    agents = [
        NodeSpec(f"t{i}-{node}", cpu) for i, (_, granted) in enumerate(plans) for node, cpu in granted.items()
    ]
    async with LocalCluster(
        agents, limit_mode, allow_factories=allow, secure=secure, cfs_period_us=cfs_period_us
    ) as cluster:
        deployed = [_renamed(plan, f"t{i}") for i, (plan, _) in enumerate(plans)]
        for plan in deployed:
            await deploy(cluster, plan, config.source)
        inputs = prepared.loaded.example_inputs
        n = config.sizes.saturation
        progress.phase(f"{k} tenants at once", n * k)

        async def drive(plan: Plan) -> tuple[int, float]:
            async with client_of(cluster, plan) as client:
                await closed_loop(client, inputs, 2, 2)  # warm
                results, wall = await closed_loop(
                    client, inputs, n, 2 * len(plan.stages), lambda _: progress.advance()
                )
            return len(results), wall

        measured = await asyncio.gather(*(drive(p) for p in deployed))
        progress.step()
    rates = [count / wall for count, wall in measured]
    total = sum(rates)
    total_cpu = sum(n.cpu for n in nodes)
    tenants = tuple(
        TenantRow(
            name=f"t{i}",
            plan=plan_rows(plan.rows()),
            cpu=round(sum(granted.values()), 3),
            fair_cpu=round(total_cpu / k, 3),
            rps=rate,
            predicted_rps=plan.predicted.throughput_rps,
            share=rate / total if total else None,
            fair_share=1 / k,
        )
        for i, ((plan, granted), rate) in enumerate(zip(plans, rates, strict=True))
    )
    return MultiTenantResult(
        name=config.name,
        title=config.title,
        model=config.source.spec,
        scale_factor=factor,
        nodes=tuple(NodeShare(n.name, n.cpu) for n in nodes),
        tenants=tenants,
        note=config.note,
        cpu_limits=cpu_limits,
        ideal=ideal,
        aggregate_rps=total,
        fraction_of_ideal=total / ideal.rps if ideal is not None and ideal.rps else None,
        requests_per_tenant=config.sizes.saturation,
    )
