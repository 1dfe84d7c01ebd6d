"""One configuration on one local cluster: the resource-matched monolith, the ideal, every strategy."""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from amp4ec.bench.configs import CLIENT_HEADROOM, COMPRESSED, MATCHED, UNAWARE, Configuration, scale_nodes
from amp4ec.bench.links import shaped_for
from amp4ec.bench.measure import Bench, deploy, measure_plan
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import (
    Ideal,
    LinkRow,
    LinkShapeRow,
    MeasuredPlan,
    NodeRow,
    StandardResult,
    StrategyResult,
    Unmeasured,
    plan_rows,
)
from amp4ec.bench.transport import compare as compare_transport
from amp4ec.errors import Amp4ecError, PlanInfeasible
from amp4ec.loadgen import closed_loop
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import CLIENT_IDENTITY, LocalCluster, NodeSpec
from amp4ec.local.run import measure_links, node_capacities
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.types import Link, NodeCapacity, Plan
from amp4ec.slicing import ModelSource
from amp4ec.slicing.prepare import Prepared
from amp4ec.slicing.sources import factory_module
from amp4ec.wire.v1 import agent_pb2

__all__ = ["MEMORY_MARGIN", "run_configuration", "steps"]

MEMORY_MARGIN = 64 * 1024 * 1024
"""Kept free on a memory-limited node beyond its idle agent's resident memory (allocator
slack, the stage being built); the rest is what the planner may fill."""
MATCHED_NODE = "matched"


def steps(config: Configuration) -> int:
    """Measurements in a configuration, for the overall progress bar: each strategy and the ideal
    (a failover configuration: each of its scenarios; and the insecure comparison)."""
    if config.faults:
        return len(config.faults)
    if config.latency:
        return len(config.strategies)
    if config.batching:
        return 6
    return len(config.strategies) + 1 + config.compare_transport


async def run_configuration(
    config: Configuration,
    prepared: Prepared,
    budget: float,
    progress: ProgressSink,
    *,
    limit_mode: str = "auto",
    cfs_period_us: int = PERIOD_US,
    drop_after_s: float = 10.0,
    secure: bool = True,
) -> StandardResult:
    nodes, factor = scale_nodes(config, budget)
    if factor < 1:
        cores = budget / (1 - CLIENT_HEADROOM)
        progress.note(
            f"{config.name}: scaled all shares by {factor:.2f} to fit {cores:.0f} cores with client "
            f"headroom ({config.total_cpu:g} CPU asked, {budget:.2f} available to nodes)"
        )
    mems = [n.memory_bytes for n in nodes if n.memory_bytes]
    total_memory = sum(mems) if len(mems) == len(nodes) else None
    matched = NodeSpec(MATCHED_NODE, round(sum(n.cpu for n in nodes), 4), total_memory)
    variants = matched_variants(matched)
    strategies: dict[str, StrategyResult] = {}
    names = [n.name for n in nodes]
    async with (
        LocalCluster(
            [*nodes, *variants],
            limit_mode,
            allow_factories=_named(config.source),
            secure=secure,
            cfs_period_us=cfs_period_us,
        ) as cluster,
        shaped_for(config, cluster, names) as shaped,
    ):
        cpu_limits = cluster.limit_description
        await _prime(cluster, config.source)
        caps = await _capacities(cluster)
        capacity = {c.name: c for c in node_capacities(caps, prepared.reference_ms)}
        planner_nodes = [_memory_headroom(cluster, capacity[n], config.shard_memory_mb) for n in names]
        node_rows = tuple(
            replace(_node_row(n, p), offered_to_shards_mb=_mb(offered.memory_bytes))
            for n, p, offered in zip(nodes, config.nodes, planner_nodes, strict=True)
        )
        tunings = {v.name for v in variants}
        loopback = [link for link in await measure_links(cluster) if not tunings & {link.src, link.dst}]
        links = (
            await shaped.links(names, loopback, cluster.security, cluster.identity) if shaped else loopback
        )
        links_measured = tuple(_link_row(link) for link in links)
        bench = Bench(
            cluster,
            prepared,
            config.source,
            config.sizes,
            progress,
            shaped.hop if shaped else cluster.address,
            drop_after_s,
        )

        result = await _tuned_monolith(bench, prepared, cluster, capacity, variants)
        strategies[MATCHED] = result
        progress.step()
        rate = result.open_loop.rate_rps if isinstance(result, MeasuredPlan) else None

        ideal = await _ideal(bench, planner_nodes, links)
        if ideal is not None:
            progress.step()

        plans: dict[str, Plan] = {}
        for strategy in config.strategies:
            if strategy == MATCHED:
                continue
            with_links = loopback if strategy == UNAWARE else links
            # "monolith" is the whole model on the node with the most CPU, as the paper means it.
            candidates = (
                [max(planner_nodes, key=lambda n: n.cpu)] if strategy == "monolith" else planner_nodes
            )
            squeeze: dict[str, Any] = {}
            if strategy in COMPRESSED:
                allowed, bound = COMPRESSED[strategy]
                squeeze = {"codecs": [c for c in prepared.codecs if c.name in allowed], "max_error": bound}
            try:
                plan, ms = _plan(
                    prepared,
                    candidates,
                    "optimal" if strategy == UNAWARE or strategy in COMPRESSED else strategy,
                    with_links,
                    **squeeze,
                )
            except PlanInfeasible as e:
                strategies[strategy] = Unmeasured("infeasible", str(e))
            else:
                plans[strategy] = plan
                result = await _measure_once(bench, plan, strategy, rate, strategies)
                if isinstance(result, MeasuredPlan):
                    result = replace(result, planning_ms=ms)
                strategies[strategy] = result
            progress.step()
    if ideal is None:
        ideal = await _ideal_without_memory_limits(bench, nodes, limit_mode, secure, cfs_period_us)
        progress.step()
    transport = None
    if config.compare_transport:
        transport = await compare_transport(bench, nodes, plans, strategies, rate, limit_mode, cfs_period_us)
        progress.step()
    return StandardResult(
        name=config.name,
        title=config.title,
        model=config.source.spec,
        input_shape=tuple(prepared.loaded.example_inputs[0].shape),
        blocks=len(prepared.chain),
        model_mb=round(sum(p.param_bytes for p in prepared.profiles) / 1e6, 2),
        note=config.note,
        scale_factor=factor,
        nodes=node_rows,
        matched=_node_row(matched, None),
        strategies=strategies,
        links=LinkShapeRow(config.links.rate_mbit, config.links.delay_ms) if config.links else None,
        cpu_limits=cpu_limits,
        links_measured=links_measured,
        open_loop_rate_rps=rate,
        ideal=ideal,
        transport=transport,
    )


def matched_variants(matched: NodeSpec) -> list[NodeSpec]:
    """The resource-matched monolith's tunings: one forward thread, and where it has more than
    one core, one intra-op thread per core or one request-serving worker per core."""
    cores = math.ceil(matched.cpu - 1e-9)
    if cores <= 1:
        return [matched]
    return [
        matched,
        replace(matched, name=f"{MATCHED_NODE}-threads{cores}", threads=cores),
        replace(matched, name=f"{MATCHED_NODE}-workers{cores}", workers=cores),
    ]


async def _tuned_monolith(
    bench: Bench,
    prepared: Prepared,
    cluster: LocalCluster,
    capacity: dict[str, NodeCapacity],
    variants: Sequence[NodeSpec],
) -> StrategyResult:
    """Every tuning of the matched monolith measured in full; the best saturation is kept, so the
    baseline amp4ec is compared with is the best this hardware does with one whole model."""
    tried: dict[str, StrategyResult] = {}
    for variant in variants:
        plan, ms = _plan(prepared, [_memory_headroom(cluster, capacity[variant.name])], "monolith", [])
        result = await _guarded(bench, plan, f"{MATCHED} ({_tuning(variant)})", None)
        if isinstance(result, MeasuredPlan):
            result = replace(
                result,
                planning_ms=ms,
                tuning=_tuning(variant),
                threads=variant.threads or 1,
                workers=variant.workers,
            )
        tried[_tuning(variant)] = result
    return best_tuning(tried)


def saturation_rps(result: StrategyResult) -> float | None:
    return result.saturation.rps if isinstance(result, MeasuredPlan) else None


def best_tuning(tried: dict[str, StrategyResult]) -> StrategyResult:
    """The tuning with the best saturation, carrying every tuning's (an unmeasured one if none was)."""
    best = max(tried.values(), key=lambda r: rps if (rps := saturation_rps(r)) is not None else -1.0)
    if not isinstance(best, MeasuredPlan):
        return best
    return replace(best, tunings_rps={name: saturation_rps(r) for name, r in tried.items()})


def _tuning(node: NodeSpec) -> str:
    return f"{node.threads or 1} thread(s) x {node.workers} worker(s)"


async def _capacities(cluster: LocalCluster) -> dict[str, agent_pb2.Capacity]:
    """Each agent's capacity, the reference workload run one agent at a time.

    [Note: one at a time] LocalCluster.capacities asks every agent at once; with the
    resource-matched monolith beside the nodes their shares add up to more than the machine,
    so simultaneous workloads would slow each other and every speed would read low. Agents
    keep their first measurement, so the later, simultaneous readings cost nothing.
    """
    for node in cluster.node_names:
        await cluster.agent_stub(node).GetCapacity(agent_pb2.CapacityRequest(), timeout=60)
    return await cluster.capacities()


def _plan(
    prepared: Prepared,
    nodes: Sequence[NodeCapacity],
    strategy: str,
    links: Sequence[Link],
    repeats: int = 5,
    **compression: Any,
) -> tuple[Plan, float]:
    """The plan, and the median wall time of ``repeats`` planning calls (ms); ``compression``:
    the planner's ``codecs`` and ``max_error``."""
    times, plan = [], None
    for _ in range(repeats):
        plan, ms = timed_plan(
            prepared.profiles,
            nodes,
            strategy=strategy,
            objective="throughput",
            input_bytes=prepared.chain.input_bytes,
            links=links,
            **compression,
        )
        times.append(ms)
    assert plan is not None
    return plan, statistics.median(times)


async def _measure_once(
    bench: Bench, plan: Plan, strategy: str, rate: float | None, done: dict[str, StrategyResult]
) -> StrategyResult:
    """Measure ``plan``, unless a strategy before made the very same plan: the same deployment
    measured twice differs only by run-to-run noise (a few percent), which would rank two
    identical plans. Its figures are then shared, marked ``same_plan_as``."""
    rows = plan_rows(plan.rows())
    for name, result in done.items():
        if name != MATCHED and isinstance(result, MeasuredPlan) and result.plan == rows:
            return replace(result, same_plan_as=result.same_plan_as or name, notes=tuple(plan.notes))
    return await _guarded(bench, plan, strategy, rate)


async def _guarded(bench: Bench, plan: Plan, label: str, rate: float | None) -> StrategyResult:
    """measure_plan, with a failure (an agent killed for memory, say) recorded instead of raised."""
    try:
        return await measure_plan(bench, plan, label, rate)
    except Amp4ecError as e:
        dead = [f"{name} {why}" for name, why in bench.cluster.exited().items()]
        reason = str(e).splitlines()[0] + (f" ({'; '.join(dead)})" if dead else "")
        bench.progress.note(f"{label} failed: {reason}")
        if dead:
            raise Amp4ecError(f"{label}: node agent died: {'; '.join(dead)}") from e
        return Unmeasured("failed", reason)


async def _ideal(bench: Bench, planner_nodes: Sequence[NodeCapacity], links: Sequence[Link]) -> Ideal | None:
    """Each node's standalone throughput with the whole model on it; their sum is the ideal.
    None when some node cannot hold the model (then ``_ideal_without_memory_limits``)."""
    try:
        plan, _ = _plan(bench.prepared, planner_nodes, "replicate", links, repeats=1)
    except PlanInfeasible:
        return None
    if len(plan.pipelines) < len(planner_nodes):
        return None
    per_node = await _standalone(bench, plan)
    return Ideal(sum(per_node.values()), per_node, "each node alone, under its CPU and memory limits")


async def _ideal_without_memory_limits(
    bench: Bench, nodes: Sequence[NodeSpec], limit_mode: str, secure: bool, cfs_period_us: int
) -> Ideal:
    """The ideal where no node holds the model: the same CPU shares, memory limits lifted.

    Runs on a cluster of its own once the configuration's cluster is gone (two clusters of
    one process at once would share cgroup names)."""
    free = [replace(n, memory_bytes=None) for n in nodes]
    async with LocalCluster(
        free, limit_mode, allow_factories=_named(bench.source), secure=secure, cfs_period_us=cfs_period_us
    ) as cluster:
        caps = node_capacities(await _capacities(cluster), bench.prepared.reference_ms)
        plan, _ = _plan(bench.prepared, caps, "replicate", [], repeats=1)
        per_node = await _standalone(replace(bench, cluster=cluster, hop=cluster.address), plan)
    where = "each node alone under its CPU limit, its memory limit lifted (no node holds the model)"
    return Ideal(sum(per_node.values()), per_node, where)


async def _standalone(bench: Bench, plan: Plan) -> dict[str, float]:
    await deploy(bench, plan)
    inputs = bench.prepared.loaded.example_inputs
    out = {}
    for pipeline in plan.pipelines:
        node = pipeline.stages[0].node
        bench.progress.phase(f"ideal: {node} alone", bench.sizes.ideal)
        async with bench.cluster.client([node]) as client:
            await closed_loop(client, inputs, 2, 2)
            results, wall = await closed_loop(
                client, inputs, bench.sizes.ideal, 2, lambda _: bench.progress.advance()
            )
        out[node] = len(results) / wall
    return out


async def _prime(cluster: LocalCluster, source: ModelSource) -> None:
    """Load the model's first block on every agent: what building any stage imports and keeps
    (fx, tracing caches) is then resident, so the memory left over is what stages can use."""
    spec = source.stage(0, 0, accept_from=(CLIENT_IDENTITY,)).to_message()
    await asyncio.gather(*(cluster.load(node, spec) for node in cluster.node_names))


def _memory_headroom(cluster: LocalCluster, node: NodeCapacity, shard_mb: int | None = None) -> NodeCapacity:
    """A memory-limited node offers its limit less its primed agent's resident memory (anonymous
    and mapped files, as its cgroup counts them) and a margin. With ``shard_mb`` the node offers
    exactly that, and its cgroup limit is lowered to resident + margin + ``shard_mb``."""
    limit = cluster.memory_limit(node.name)
    resident = cluster.resident_bytes(node.name)
    if not limit or resident is None:
        return node
    if shard_mb is not None:
        offer = shard_mb * 2**20
        cluster.set_memory_limit(node.name, resident + MEMORY_MARGIN + offer)
        return replace(node, memory_bytes=offer)
    free = limit - resident - MEMORY_MARGIN
    return replace(node, memory_bytes=max(0, min(node.memory_bytes, free)))


def _node_row(node: NodeSpec, paper: NodeSpec | None) -> NodeRow:
    return NodeRow(node.name, node.cpu, _mb(node.memory_bytes), paper.cpu if paper is not None else None)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _link_row(link: Link) -> LinkRow:
    return LinkRow(
        src=link.src,
        dst=link.dst,
        rtt_ms=round(link.rtt_ms, 3),
        mbit_s=round(link.bandwidth_bytes_per_s * 8 / 1e6, 2),
    )


def _named(source: ModelSource) -> list[str]:
    """The factory module the user named on the command line, the only one agents may import."""
    return [m for m in (factory_module(source.spec),) if m]
