"""The ``latency`` configuration: one request's latency, tiles against the fastest node alone.

Three plans on the same nodes (1.0/0.6/0.4, scaled to the machine): the latency-objective plan
(tiled when the planner finds it pays), the best layer-wise plan (tiles off), and the fastest
node alone. Side by side: a fourth agent with the fastest node's CPU share serves the whole
model throughout, and single requests alternate between it and the plan measured, so each
pair sees the same background load; the median of the pairs' ratios is the figure. Each plan's open-loop
p50/p95 at 50% of its own saturation follow. ``latency-100mbit`` shapes the links between the
nodes (100 Mbit/s, 2 ms round trip; ``bench/links.py``): scatter and gather then cost more, and
the target is only never to be slower than the fastest node alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from amp4ec.bench.configs import Configuration, scale_nodes
from amp4ec.bench.links import shaped_for
from amp4ec.bench.measure import quantiles
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import (
    LatencyOpenLoop,
    LatencyPlan,
    LatencyResult,
    LinkShapeRow,
    NodeShare,
    TiledStageRow,
    TileGroupRow,
)
from amp4ec.loadgen import closed_loop, open_loop
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import CLIENT_IDENTITY, LocalCluster
from amp4ec.local.run import client_of, deploy, measure_links, node_capacities
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.types import Plan
from amp4ec.slicing.prepare import Prepared
from amp4ec.slicing.sources import factory_module
from amp4ec.wire.v1 import agent_pb2

__all__ = ["ALONE", "PLANS", "SHAPED_TARGET", "TARGET", "run_latency"]

ALONE = "alone"
"""The extra agent: the fastest node's CPU share, the whole model, always loaded."""
PLANS = ("latency_objective", "layerwise", "fastest_node")
TARGET = 0.7
"""Single-request latency of the latency-objective plan / the fastest node alone (issue 14)."""
SHAPED_TARGET = 1.0
"""On shaped links: never slower than the fastest node alone (issue 14)."""


async def run_latency(
    config: Configuration,
    prepared: Prepared,
    budget: float,
    progress: ProgressSink,
    *,
    limit_mode: str = "auto",
    cfs_period_us: int = PERIOD_US,
    secure: bool = True,
) -> LatencyResult:
    nodes, factor = scale_nodes(config, budget)
    fastest = max(nodes, key=lambda n: n.cpu)
    names = [n.name for n in nodes]
    measured: dict[str, LatencyPlan] = {}
    links_shape: LinkShapeRow | None = None
    named = [m for m in (factory_module(config.source.spec),) if m]
    agents = [
        *(replace(n, memory_bytes=None) for n in nodes),
        replace(fastest, name=ALONE, memory_bytes=None),
    ]
    async with (
        LocalCluster(
            agents, limit_mode, allow_factories=named, secure=secure, cfs_period_us=cfs_period_us
        ) as cluster,
        shaped_for(config, cluster, names) as shaped,
    ):
        cpu_limits = cluster.limit_description
        capacity = node_capacities(await cluster.capacities(names), prepared.reference_ms)
        links = [link for link in await measure_links(cluster) if ALONE not in (link.src, link.dst)]
        if shaped is not None and config.links is not None:
            # Between the nodes only: the client and the lone agent stay on loopback.
            links = await shaped.links(names, links, cluster.security, cluster.identity)
            links_shape = LinkShapeRow(config.links.rate_mbit, config.links.delay_ms)
        hop = shaped.hop if shaped else cluster.address
        await cluster.load(ALONE, _whole(config, len(prepared.chain)))
        plans = {
            "latency_objective": _plan(prepared, capacity, links),
            "layerwise": _plan(prepared, capacity, links, tiles=False),
            "fastest_node": _plan(prepared, [c for c in capacity if c.name == fastest.name], links),
        }
        async with cluster.client([ALONE]) as alone:
            for label, plan in plans.items():
                measured[label] = await _measure(cluster, prepared, config, plan, label, alone, progress, hop)
                progress.step()
    return LatencyResult(
        name=config.name,
        title=config.title,
        model=config.source.spec,
        input_shape=tuple(prepared.loaded.example_inputs[0].shape),
        scale_factor=factor,
        nodes=tuple(NodeShare(n.name, n.cpu) for n in nodes),
        target=TARGET if config.links is None else SHAPED_TARGET,
        plans=measured,
        cpu_limits=cpu_limits,
        ratio=measured["latency_objective"].ratio_vs_alone,
        note=config.note,
        links=links_shape,
    )


def _whole(config: Configuration, blocks: int) -> agent_pb2.StageSpec:
    source = config.source
    return agent_pb2.StageSpec(
        model=source.spec,
        weights=source.weights or "",
        seed=source.seed,
        input_shape=list(source.input_shape or ()),
        first_block=0,
        last_block=blocks - 1,
        accept_from=[CLIENT_IDENTITY],
    )


def _plan(prepared: Prepared, nodes: list[Any], links: list[Any], tiles: bool = True) -> Plan:
    plan, _ = timed_plan(
        prepared.profiles,
        nodes,
        objective="latency",
        input_bytes=prepared.chain.input_bytes,
        links=links,
        tiles=tiles,
    )
    return plan


async def _measure(
    cluster: LocalCluster,
    prepared: Prepared,
    config: Configuration,
    plan: Plan,
    label: str,
    alone: Any,
    progress: ProgressSink,
    hop: Callable[[str], str],
) -> LatencyPlan:
    sizes = config.sizes
    progress.phase(f"{label}: loading")
    await _unload(cluster, [n for n in cluster.node_names if n != ALONE])
    await deploy(cluster, plan, config.source, hop=hop)
    inputs = prepared.loaded.example_inputs
    async with client_of(cluster, plan) as client:
        first = await client.infer(inputs)
        diff = max(
            float((a.float() - b.float()).abs().max())
            for a, b in zip(first.outputs, prepared.expected, strict=True)
        )
        for _ in range(2):  # warm both
            await client.infer(inputs)
            await alone.infer(inputs)
        progress.phase(f"{label}: single requests beside the fastest node alone", sizes.sequential)
        mine, theirs = [], []
        for _ in range(sizes.sequential):
            mine.append((await client.infer(inputs)).latency_s * 1000)
            theirs.append((await alone.infer(inputs)).latency_s * 1000)
            progress.advance()
        progress.phase(f"{label}: saturation", sizes.saturation)
        level = len({n for s in plan.stages for n in s.nodes})
        results, wall = await closed_loop(
            client, inputs, sizes.saturation, level, lambda _: progress.advance()
        )
        rps = len(results) / wall
        progress.phase(f"{label}: open loop at 50% load", sizes.open_loop)
        opened = await open_loop(client, inputs, sizes.open_loop, 0.5 * rps, tick=progress.advance)
    latencies = quantiles(opened.latencies_ms)
    return LatencyPlan(
        plan=tuple(
            TiledStageRow(
                node=s.node,
                first_block=s.first_block,
                last_block=s.last_block,
                tiles=tuple(
                    TileGroupRow(g.first_block, g.last_block, tuple(g.nodes), g.rows) for g in s.tiles
                ),
            )
            for s in plan.stages
        ),
        tiled=bool(plan.stages[0].tiles),
        notes=tuple(plan.notes),
        max_abs_diff=diff,
        predicted_latency_ms=plan.predicted.latency_ms,
        single_ms=quantiles(mine),
        single_p50_ms=statistics.median(mine),
        alone_single_p50_ms=statistics.median(theirs),
        # Each request against the fastest node's answer right after it: the pair saw the same
        # background load, so the median of the pairs' ratios is the figure (load drifts cancel).
        ratio_vs_alone=statistics.median(m / t for m, t in zip(mine, theirs, strict=True)),
        single_samples_ms=tuple(round(x, 2) for x in mine),
        alone_samples_ms=tuple(round(x, 2) for x in theirs),
        saturation_rps=rps,
        open_loop=LatencyOpenLoop(
            rate_rps=0.5 * rps,
            completed=opened.completed,
            p50_ms=latencies.p50,
            p95_ms=latencies.p95,
            mean_ms=latencies.mean,
            max_ms=latencies.max,
        ),
    )


async def _unload(cluster: LocalCluster, nodes: list[str]) -> None:
    for node in nodes:
        await cluster.agent_stub(node).UnloadStage(agent_pb2.UnloadRequest(), timeout=30)
