"""One deployed plan → its figures: latency, saturation, open-loop percentiles, overhead, bytes, stages."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from amp4ec.bench.configs import Sizes
from amp4ec.bench.progress import ProgressSink
from amp4ec.bench.results import (
    ErrorFigures,
    MeanBatch,
    MeasuredPlan,
    OpenLoop,
    Overhead,
    Predicted,
    Quantiles,
    Saturation,
    StageFigures,
    WireBytes,
    plan_rows,
)
from amp4ec.client import Result
from amp4ec.loadgen import closed_loop, open_loop, sequential
from amp4ec.local.cluster import LocalCluster
from amp4ec.local.run import (
    client_of,
    forward_ms_per_stage,
    measure_output_error,
    measured_stage_ms,
    quantile,
)
from amp4ec.local.run import deploy as deploy_stages
from amp4ec.planner.types import Plan
from amp4ec.slicing import ModelSource
from amp4ec.slicing.prepare import Prepared
from amp4ec.wire.stage import Batching
from amp4ec.wire.v1 import agent_pb2

__all__ = ["OUTPUT_ERROR_INPUTS", "Bench", "deploy", "measure_plan", "quantiles"]

Capacities = dict[str, agent_pb2.Capacity]

OUTPUT_ERROR_INPUTS = 8
"""Fixed inputs a compressed plan's answers are compared with the monolith's over."""


@dataclass
class Bench:
    """What every measurement in one configuration shares."""

    cluster: LocalCluster
    prepared: Prepared
    source: ModelSource
    sizes: Sizes
    progress: ProgressSink
    hop: Callable[[str], str]
    """Address an upstream stage sends to for a node (the agent itself, or a shaped link)."""
    drop_after_s: float = 10.0
    forward_cache: dict[tuple[int, int], float] = field(default_factory=dict)
    batching: Batching = field(default_factory=Batching)
    """Dynamic batching of every stage deployed (the closed loop keeps a batch per stage in flight)."""

    def forward_cpu_ms(self, first: int, last: int, repeats: int = 5) -> float:
        """CPU time of one forward of blocks first..last on one thread, measured here.

        [Note: forward CPU measured, not taken from wall times] A forward's wall time under a
        CFS quota includes the time it sat throttled, and the profile's wall times include
        whatever else ran on the machine; thread CPU time is neither. The agents run on the
        same cores with one intra-op thread, so this is the CPU their forward costs.
        """
        key = (first, last)
        if key not in self.forward_cache:
            shard = self.prepared.chain.shard(first, last)
            inputs = self.prepared.loaded.example_inputs
            with torch.inference_mode():
                x = tuple(self.prepared.chain.shard(0, first - 1)(*inputs)) if first > 0 else inputs
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    shard(*x)
                    times = []
                    for _ in range(repeats):
                        t0 = time.thread_time()
                        shard(*x)
                        times.append((time.thread_time() - t0) * 1000)
                finally:
                    torch.set_num_threads(threads)
            self.forward_cache[key] = statistics.median(times)
        return self.forward_cache[key]


def quantiles(values: list[float]) -> Quantiles:
    return Quantiles(
        p50=quantile(values, 0.5),
        p95=quantile(values, 0.95),
        mean=statistics.fmean(values) if values else float("nan"),
        max=max(values) if values else float("nan"),
    )


async def deploy(bench: Bench, plan: Plan) -> tuple[list[str], list[int]]:
    """Unload every agent (memory first), then load each stage; (entry addresses, param bytes)."""
    cluster = bench.cluster
    await asyncio.gather(
        *(
            cluster.agent_stub(n).UnloadStage(agent_pb2.UnloadRequest(), timeout=30)
            for n in cluster.node_names
        )
    )
    param_bytes = await deploy_stages(cluster, plan, bench.source, bench.hop, bench.batching)
    return [cluster.address(p.stages[0].node) for p in plan.pipelines], param_bytes


async def measure_plan(bench: Bench, plan: Plan, label: str, rate_rps: float | None) -> MeasuredPlan:
    """Deploy ``plan`` and measure it; ``rate_rps`` None = open loop at 90% of its own saturation."""
    progress, sizes, prepared = bench.progress, bench.sizes, bench.prepared
    progress.phase(f"{label}: loading {len(plan.stages)} stage(s)")
    entries, param_bytes = await deploy(bench, plan)
    inputs = prepared.loaded.example_inputs
    stages = len(plan.stages)
    async with client_of(bench.cluster, plan) as client:
        first = await client.infer(inputs)
        diff = prepared.max_abs_diff(first.outputs)
        await closed_loop(client, inputs, 2 * stages, stages)  # warm-up: every stage, every stream
        error: ErrorFigures | None = None
        if any(s.out_codec != "raw" for s in plan.stages):
            progress.phase(f"{label}: output error over {OUTPUT_ERROR_INPUTS} fixed inputs")
            measured = await measure_output_error(client, prepared, OUTPUT_ERROR_INPUTS)
            error = ErrorFigures(**measured.to_json())

        progress.phase(f"{label}: single requests", sizes.sequential)
        single = await sequential(client, inputs, sizes.sequential, progress.advance)

        by_level: dict[int, float] = {}
        best: tuple[float, int, list[Result], Capacities, Capacities] | None = None
        for factor in sizes.concurrency_factors:
            level = max(1, factor * stages * bench.batching.max_requests)
            if level in by_level:
                continue
            progress.phase(f"{label}: saturation, {level} in flight", sizes.saturation)
            before = await bench.cluster.capacities()
            results, wall = await closed_loop(
                client, inputs, sizes.saturation, level, lambda _: progress.advance()
            )
            after = await bench.cluster.capacities()
            by_level[level] = len(results) / wall
            if best is None or by_level[level] > best[0]:
                best = (by_level[level], level, results, before, after)
        assert best is not None
        rps, level, results, before, after = best

        rate = rate_rps if rate_rps is not None else 0.9 * rps
        progress.phase(f"{label}: open loop at {rate:.1f} req/s", sizes.open_loop)
        opened = await open_loop(
            client, inputs, sizes.open_loop, rate, drop_after_s=bench.drop_after_s, tick=progress.advance
        )

    share = _pipeline_shares(plan, results, entries)
    latencies = quantiles(opened.latencies_ms)
    return MeasuredPlan(
        batching=bench.batching,
        mean_batch=MeanBatch(saturation=_mean_batch(results), open_loop=_mean_batch(opened.results)),
        plan=plan_rows(plan.rows()),
        notes=tuple(plan.notes),
        max_abs_diff=diff,
        output_error=error,
        param_mb=tuple(round(b / 1e6, 3) for b in param_bytes),
        single_ms=quantiles([r.latency_s * 1000 for r in single]),
        saturation=Saturation(
            rps=rps,
            concurrency=level,
            requests=len(results),
            by_concurrency={str(k): v for k, v in by_level.items()},
        ),
        open_loop=OpenLoop(
            rate_rps=rate,
            sent=opened.sent,
            completed=opened.completed,
            dropped=opened.dropped,
            late=opened.late,
            achieved_rps=opened.achieved_rps,
            p50_ms=latencies.p50,
            p95_ms=latencies.p95,
            mean_ms=latencies.mean,
            max_ms=latencies.max,
            latencies_ms=tuple(round(x, 3) for x in opened.latencies_ms),
        ),
        overhead=_overhead(bench, plan, results, share, before, after),
        bytes_per_request=_bytes(plan, prepared, results, share),
        stages=_stages(plan, results, entries, before, after),
        predicted=Predicted(
            bottleneck_ms=plan.predicted.bottleneck_ms,
            latency_ms=plan.predicted.latency_ms,
            throughput_rps=plan.predicted.throughput_rps,
            output_error=plan.predicted.output_error,
        ),
    )


def _mean_batch(results: list[Result]) -> float | None:
    """Mean requests per forward the answers met, over every stage they went through."""
    sizes = [t.batch or 1 for r in results for t in r.timings]
    return statistics.fmean(sizes) if sizes else None


def _pipeline_shares(plan: Plan, results: list[Result], entries: list[str]) -> list[float]:
    counts = [0] * len(plan.pipelines)
    index = {e: i for i, e in enumerate(entries)}
    for r in results:
        counts[index[r.entry]] += 1
    total = sum(counts) or 1
    return [c / total for c in counts]


def _overhead(
    bench: Bench,
    plan: Plan,
    results: list[Result],
    share: list[float],
    before: Capacities,
    after: Capacities,
) -> Overhead:
    """Agents' CPU per request beyond the forward passes (decode, encode, gRPC, relaying
    answers, idle polling); the forward's own CPU is ``Bench.forward_cpu_ms``."""
    nodes = {s.node for s in plan.stages}
    agent_ms = 1000 * sum(after[n].cpu_seconds - before[n].cpu_seconds for n in nodes) / max(1, len(results))
    forward_ms = sum(
        f * sum(bench.forward_cpu_ms(s.first_block, s.last_block) for s in p.stages)
        for f, p in zip(share, plan.pipelines, strict=True)
    )
    overhead = agent_ms - forward_ms
    return Overhead(
        agent_cpu_ms=agent_ms,
        forward_cpu_ms=forward_ms,
        overhead_cpu_ms=overhead,
        overhead_fraction=overhead / agent_ms if agent_ms > 0 else float("nan"),
    )


def _bytes(plan: Plan, prepared: Prepared, results: list[Result], share: list[float]) -> WireBytes:
    """Client bytes as measured (frames); inter-stage bytes from the cut sizes (as encoded when a
    stage compresses), answers relayed back."""
    client = statistics.fmean(r.request_bytes + r.response_bytes for r in results)
    response = statistics.fmean(r.response_bytes for r in results)
    wire = {c.name: c.wire_bytes for c in prepared.codecs}

    def cut_bytes(stage: Any) -> int:
        """What the stage sends on: its outputs raw, or as its codec encodes them."""
        if stage.out_codec in wire:
            return wire[stage.out_codec][stage.last_block + 1]
        return prepared.profiles[stage.last_block].out_bytes

    inter = sum(
        f * sum(cut_bytes(s) + response for s in p.stages[:-1])
        for f, p in zip(share, plan.pipelines, strict=True)
    )
    return WireBytes(client=client, inter_stage=inter, total=client + inter)


def _stages(
    plan: Plan,
    results: list[Result],
    entries: list[str],
    before: Capacities,
    after: Capacities,
) -> tuple[StageFigures, ...]:
    measured = measured_stage_ms(plan, results, entries, before, after)
    forward = forward_ms_per_stage(plan, results, entries)
    return tuple(
        StageFigures(
            **row,
            predicted_ms=s.stage_ms,
            predicted_compute_ms=s.compute_ms,
            predicted_transfer_ms=s.transfer_ms,
            predicted_overhead_ms=s.overhead_ms,
            predicted_codec_ms=s.codec_ms,
            measured_ms=m,
            forward_ms=f,
        )
        for row, s, m, f in zip(plan.rows(), plan.stages, measured, forward, strict=True)
    )
