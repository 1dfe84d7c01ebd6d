"""``amp4ec run``: profile a model, plan it over local node agents, serve requests, report.

The same planner and data plane as in a cluster; only the nodes are local processes.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amp4ec.client import Client, Result
from amp4ec.compression import Compression
from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.loadgen import closed_loop
from amp4ec.local.cgroups import PERIOD_US
from amp4ec.local.cluster import CLIENT_IDENTITY, LocalCluster, NodeSpec
from amp4ec.local.supervisor import Failover, FaultSpec, Supervisor, endpoints, inject_faults
from amp4ec.nodes import check_node_count
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.types import Link, NodeCapacity, Plan, measured_node
from amp4ec.slicing import ModelSource
from amp4ec.slicing.compression import OutputError, fixed_inputs, output_error
from amp4ec.slicing.prepare import Prepared, compression_options, monolith_outputs, prepare
from amp4ec.slicing.sources import factory_module
from amp4ec.wire.stage import Batching
from amp4ec.wire.v1 import agent_pb2

__all__ = [
    "ERROR_INPUTS",
    "RunConfig",
    "RunReport",
    "client_of",
    "deploy",
    "forward_ms_per_stage",
    "measured_stage_ms",
    "node_capacities",
    "quantile",
    "run",
]

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total)."""

ERROR_INPUTS = 8
"""How many fixed inputs a compressed plan's output error is measured over."""


@dataclass(frozen=True)
class RunConfig:
    source: ModelSource
    nodes: tuple[NodeSpec, ...]
    requests: int = 200
    concurrency: int | None = None
    """Requests kept in flight; None = one per stage of the plan, enough to fill every pipeline."""
    strategy: str = "optimal"
    objective: str = "throughput"
    rate_rps: float | None = None
    """The arrival rate the ``p95`` objective plans for (requests/s; only with it)."""
    tiles: bool = True
    """Whether the optimal strategy may run leading blocks as row tiles (``planner.plan``)."""
    limit_mode: str = "auto"
    cfs_period_us: int = PERIOD_US
    """CFS period of the nodes' quotas (``--cfs-period``; see [Note: why a short CFS period])."""
    warmup: int | None = None
    """Unmeasured requests first; None = two per stage."""
    faults: tuple[FaultSpec, ...] = ()
    """Faults to inject during the measured requests (``--fault node1:kill@5s``)."""
    deadline_s: float | None = 30.0
    """Each request's deadline, retries included."""
    secure: bool = True
    """Mutual TLS on every hop (an ephemeral CA per run); False = plaintext, for comparison."""
    compression: Compression = field(default_factory=Compression)
    batching: Batching = field(default_factory=Batching)
    """Dynamic batching in every stage (``--batch``, ``--batch-delay-ms``)."""


@dataclass
class RunReport:
    model: str
    plan: Plan
    nodes: tuple[NodeSpec, ...]
    limits: str
    concurrency: int
    requests: int
    latencies_ms: list[float]
    wall_s: float
    max_abs_diff: float
    planning_ms: float
    measured_stage_ms: list[float]
    """Per stage: the agent's CPU seconds per request divided by its CPU limit, i.e. the wall
    time one request occupies the node at the rate its quota sustains (comparable with the
    predicted stage time; a CFS quota lets a single forward burst faster than that)."""
    forward_ms: list[float]
    """Per stage: median wall time of decode + forward + encode, from the answers' timings."""
    stage_param_bytes: list[int]
    bytes_per_request: float
    transport: str = "mutual TLS"
    """"mutual TLS" (an ephemeral CA for the run) or "insecure" (plaintext, --insecure)."""
    batching: Batching = field(default_factory=Batching)
    capacities: dict[str, dict[str, float]] = field(default_factory=dict)
    output_error: OutputError | None = None
    """With compression on: the answers' error against the monolith over fixed inputs."""
    compression: Compression = field(default_factory=Compression)
    warnings: list[str] = field(default_factory=list)
    retried: int = 0
    """Answered requests that needed more than one attempt."""
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    """The distinct errors of failed requests (at most 10)."""
    failovers: list[Failover] = field(default_factory=list)
    final_plan: Plan | None = None
    """The plan serving at the end, when a failover changed it."""
    interrupted: bool = False
    """Ctrl-C ended the run early: the figures cover what was answered by then."""

    @property
    def answered(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput_rps(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return quantile(self.latencies_ms, q)

    def to_json(self) -> dict[str, Any]:
        stages = self.plan.stages
        return {
            "model": self.model,
            "strategy": self.plan.strategy,
            "objective": self.plan.objective,
            "cpu_limits": self.limits,
            "transport": self.transport,
            "batching": {
                "max_requests": self.batching.max_requests,
                "max_queue_delay_ms": self.batching.max_queue_delay_ms,
            },
            "plan": [
                {**row, "param_mb": round(b / 1e6, 3)}
                for row, b in zip(self.plan.rows(), self.stage_param_bytes, strict=True)
            ],
            "latency_ms": {"p50": self.latency_ms(0.5), "p95": self.latency_ms(0.95)},
            "throughput_rps": self.throughput_rps,
            "max_abs_diff": self.max_abs_diff,
            "compression": {
                "mode": self.compression.mode,
                "max_output_error": self.compression.max_error,
                "estimated_output_error": self.plan.predicted.output_error,
                "measured": self.output_error.to_json() if self.output_error else None,
            },
            "requests": self.requests,
            "answered": self.answered,
            "retried": self.retried,
            "failed": self.failed,
            "errors": self.errors,
            "interrupted": self.interrupted,
            "failovers": [f.to_json() for f in self.failovers],
            "final_plan": (self.final_plan or self.plan).rows(),
            "concurrency": self.concurrency,
            "planning_ms": self.planning_ms,
            "bytes_per_request": self.bytes_per_request,
            "stages": [
                {"node": s.node, "predicted_ms": s.stage_ms, "measured_ms": m, "forward_ms": f}
                for s, m, f in zip(stages, self.measured_stage_ms, self.forward_ms, strict=True)
            ],
            "predicted": {
                "stage_ms": list(self.plan.predicted.stage_ms),
                "bottleneck_ms": self.plan.predicted.bottleneck_ms,
                "latency_ms": self.plan.predicted.latency_ms,
                "throughput_rps": self.plan.predicted.throughput_rps,
            },
            "capacities": self.capacities,
            "warnings": self.warnings,
        }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def check_run_config(config: RunConfig) -> None:
    """The counts a run needs, refused before the model is loaded (the CLI checks them earlier still)."""
    if config.requests < 1:
        raise InvalidSpec(f"--requests: expected at least 1, got {config.requests}")
    if config.concurrency is not None and config.concurrency < 1:
        raise InvalidSpec(f"--concurrency: expected at least 1, got {config.concurrency}")


def oversubscription_warnings(nodes: tuple[NodeSpec, ...]) -> list[str]:
    """Say so when the emulated nodes claim the whole machine: the client then competes with them."""
    cores = len(os.sched_getaffinity(0))
    total = sum(n.cpu for n in nodes)
    if total <= cores - 0.25:
        return []
    return [
        f"the nodes' CPU shares add up to {total:g} of this machine's {cores} cores, leaving none for "
        "the load generator: measured throughput falls short of what these nodes would do alone"
    ]


async def measure_output_error(
    client: Client, prepared: Prepared, count: int = ERROR_INPUTS, deadline_s: float | None = 30.0
) -> OutputError:
    """The deployment's answers against the monolith's over ``count`` fixed inputs."""
    sets = fixed_inputs(prepared.loaded.example_inputs, count)
    references = [monolith_outputs(prepared.loaded, inputs) for inputs in sets]
    answers = [(await client.infer(inputs, deadline_s=deadline_s)).outputs for inputs in sets]
    return output_error(answers, references)


def node_capacities(capacities: dict[str, agent_pb2.Capacity], reference_ms: float) -> list[NodeCapacity]:
    """Agents' measurements → planner input; speed is relative to the profiling process."""
    return [
        measured_node(
            name,
            cpu=c.cpu_limit,
            memory_bytes=c.memory_available_bytes,
            workload_ms=c.workload_ms,
            reference_ms=reference_ms,
            overhead_cpu_ms=c.request_overhead_ms,
            load=c.load,
        )
        for name, c in capacities.items()
    ]


async def deploy(
    cluster: LocalCluster,
    plan: Plan,
    source: ModelSource,
    hop: Callable[[str], str] | None = None,
    batching: Batching | None = None,
) -> list[int]:
    """Load every stage of every pipeline on its node; returns each stage's parameter bytes.

    ``hop`` gives the address an upstream stage sends to for a node (default: its agent; the
    benchmark's shaped links put a delaying proxy in between); ``batching`` applies to every stage."""
    address = hop or cluster.address
    loads = []
    tiles: list[Awaitable[Any]] = []
    for pipeline in plan.pipelines:
        for i, stage in enumerate(pipeline.stages):
            nxt = pipeline.stages[i + 1].node if i + 1 < len(pipeline.stages) else None
            config = source.stage(
                stage.first_block,
                stage.last_block,
                output_codec=stage.out_codec,
                next_hop=address(nxt) if nxt else "",
                next_node=nxt or "",
                stage=i,
                # Who may send this stage frames, and whom it may forward to (mutual TLS).
                next_hop_identity=cluster.identity(nxt) if nxt else "",
                accept_from=(cluster.identity(pipeline.stages[i - 1].node) if i else CLIENT_IDENTITY,),
                **(batching or Batching()).stage_fields(),
            )
            if stage.tiles:
                spans = [(g.first_block, g.last_block, g.nodes, g.rows) for g in stage.tiles]
                config, others = config.tiled(stage.node, spans, address, cluster.identity)
                tiles.extend(cluster.load(n, c.to_message()) for n, c in others.items())
            loads.append(cluster.load(stage.node, config.to_message()))
    infos, _ = await asyncio.gather(asyncio.gather(*loads), asyncio.gather(*tiles))
    return [info.param_bytes for info in infos]


def client_of(cluster: LocalCluster, plan: Plan) -> Client:
    """A client of the plan's entry stages, as the cluster's authorised client identity."""
    return Client(endpoints(plan, cluster.address), cluster.client_security)


async def run(config: RunConfig, progress: Progress | None = None) -> RunReport:
    report = progress or (lambda phase, done, total: None)
    check_run_config(config)
    report("profiling the model", 0, 1)
    prepared = await asyncio.to_thread(
        prepare, config.source, config.compression.enabled, config.batching.profile_sizes()
    )
    check_node_count(len(config.nodes), len(prepared.chain), config.source.spec)
    warnings = oversubscription_warnings(config.nodes)
    report("starting node agents", 0, len(config.nodes))
    allowed = [m for m in (factory_module(config.source.spec),) if m]  # what the user named
    async with LocalCluster(
        config.nodes,
        config.limit_mode,
        allow_factories=allowed,
        secure=config.secure,
        cfs_period_us=config.cfs_period_us,
    ) as cluster:
        report("measuring node capacity", 0, len(config.nodes))
        capacities = await cluster.capacities()
        nodes = node_capacities(capacities, prepared.reference_ms)
        links = await measure_links(cluster)
        plan, planning_ms = timed_plan(
            prepared.profiles,
            nodes,
            objective=config.objective,
            rate_rps=config.rate_rps,
            strategy=config.strategy,
            tiles=config.tiles,
            input_bytes=prepared.chain.input_bytes,
            links=links,
            **compression_options(config.compression, prepared),
        )
        report("loading stages", 0, len(plan.stages))
        param_bytes = await deploy(cluster, plan, config.source, batching=config.batching)
        entries = [cluster.address(p.stages[0].node) for p in plan.pipelines]

        def replan(alive: Sequence[str]) -> Plan:
            survivors = [n for n in nodes if n.name in alive]
            kept = [link for link in links if {link.src, link.dst} <= {"client", *alive}]
            return timed_plan(
                prepared.profiles,
                survivors,
                objective=config.objective,
                rate_rps=config.rate_rps,
                strategy=config.strategy,
                tiles=config.tiles,
                input_bytes=prepared.chain.input_bytes,
                links=kept,
                **compression_options(config.compression, prepared),
            )[0]

        async with (
            Client(endpoints(plan, cluster.address), cluster.client_security) as client,
            Supervisor(
                cluster,
                client,
                plan,
                replan,
                lambda p: deploy(cluster, p, config.source, batching=config.batching),
            ) as supervisor,
        ):
            inputs = prepared.loaded.example_inputs
            first = await client.infer(inputs, deadline_s=config.deadline_s)
            diff = prepared.max_abs_diff(first.outputs)
            measured_error = None
            if config.compression.enabled:
                report("measuring the output error", 0, 1)
                measured_error = await measure_output_error(client, prepared, deadline_s=config.deadline_s)
            concurrency = config.concurrency or max(len(p.stages) for p in plan.pipelines) * len(
                plan.pipelines
            )
            warmup = config.warmup if config.warmup is not None else 2 * len(plan.stages)
            await closed_loop(client, inputs, warmup, concurrency, deadline_s=config.deadline_s)
            before = await cluster.capacities()
            results: list[Result] = []
            done_at: list[float] = []
            errors: list[str] = []

            def done(result: Result) -> None:
                results.append(result)
                done_at.append(supervisor.now())
                report("requests", len(results) + len(errors), config.requests)

            def failed(error: Amp4ecError) -> None:
                errors.append(str(error))
                report("requests", len(results) + len(errors), config.requests)

            supervisor.start = time.monotonic()
            interrupted = False
            wall_start = time.perf_counter()
            try:
                async with inject_faults(cluster, config.faults, supervisor):
                    await closed_loop(
                        client, inputs, config.requests, concurrency, done, failed, config.deadline_s
                    )
            except asyncio.CancelledError:  # Ctrl-C: report what was answered so far
                interrupted = True
            wall = time.perf_counter() - wall_start
            failovers = list(supervisor.failovers)
            final_plan = supervisor.plan
            alive = [n for n in cluster.agents if n not in supervisor.dead]
            faulted = supervisor.dead or supervisor.injected
            after = None if interrupted or faulted else await cluster.capacities(alive)
    warnings += [
        f"--fault {f} was not injected: the run ended at {wall:.1f} s (ask for more --requests)"
        for f in config.faults
        if f.node not in supervisor.injected and not interrupted
    ]
    # Per-stage figures of the first plan: from the answers before any fault, CPU only without one.
    first_fault = min((f.fault_s or f.detected_s for f in failovers), default=float("inf"))
    steady = [r for r, t in zip(results, done_at, strict=True) if t < first_fault and r.entry in entries]
    return RunReport(
        model=config.source.spec,
        plan=plan,
        nodes=config.nodes,
        limits=cluster.limit_description,
        transport="mutual TLS" if config.secure else "insecure",
        batching=config.batching,
        concurrency=concurrency,
        requests=config.requests,
        latencies_ms=[r.latency_s * 1000 for r in results],
        retried=sum(r.attempts > 1 for r in results),
        failed=len(errors),
        errors=sorted(set(errors))[:10],
        failovers=failovers,
        final_plan=final_plan if failovers else None,
        interrupted=interrupted,
        wall_s=wall,
        max_abs_diff=diff,
        output_error=measured_error,
        compression=config.compression,
        planning_ms=planning_ms,
        measured_stage_ms=(
            measured_stage_ms(plan, results, entries, before, after)
            if after is not None
            else [float("nan")] * len(plan.stages)
        ),
        forward_ms=forward_ms_per_stage(plan, steady, entries),
        stage_param_bytes=param_bytes,
        bytes_per_request=statistics.fmean(r.request_bytes + r.response_bytes for r in results)
        if results
        else float("nan"),
        warnings=warnings,
        capacities={
            n: {
                "cpu_limit": c.cpu_limit,
                "workload_ms": c.workload_ms,
                "speed": nc.speed,
                "request_overhead_cpu_ms": c.request_overhead_ms,
            }
            for (n, c), nc in zip(capacities.items(), nodes, strict=True)
        },
    )


async def measure_links(cluster: LocalCluster) -> list[Link]:
    """Links into each node, measured from this process: every sender here is on loopback."""
    links = []
    for node in cluster.agents:
        rtt_ms, bandwidth = await cluster.probe_link(node)
        links += [Link(src, node, rtt_ms, bandwidth) for src in ["client", *cluster.agents] if src != node]
    return links


def _requests_per_pipeline(plan: Plan, results: list[Result], entries: list[str]) -> list[int]:
    counts = [0] * len(plan.pipelines)
    pipeline_of = {entry: i for i, entry in enumerate(entries)}
    for r in results:
        counts[pipeline_of[r.entry]] += 1
    return counts


def measured_stage_ms(
    plan: Plan,
    results: list[Result],
    entries: list[str],
    before: dict[str, agent_pb2.Capacity],
    after: dict[str, agent_pb2.Capacity],
) -> list[float]:
    """Each stage's CPU time per request (all its threads: gRPC and torch) over its CPU limit."""
    counts = _requests_per_pipeline(plan, results, entries)
    out = []
    for pipeline, count in zip(plan.pipelines, counts, strict=True):
        for s in pipeline.stages:
            cpu_s = after[s.node].cpu_seconds - before[s.node].cpu_seconds
            cpu_limit = after[s.node].cpu_limit
            limit = min(cpu_limit, max(1.0, math.floor(cpu_limit)))  # cores its threads can use
            out.append(1000 * cpu_s / count / limit if count else float("nan"))
    return out


def forward_ms_per_stage(plan: Plan, results: list[Result], entries: list[str]) -> list[float]:
    """Median decode+forward+encode wall time per stage, from the timings each answer carries."""
    pipeline_of = {entry: i for i, entry in enumerate(entries)}
    samples: list[list[list[float]]] = [[[] for _ in p.stages] for p in plan.pipelines]
    for r in results:
        stages = samples[pipeline_of[r.entry]]
        for t in r.timings:
            stages[t.stage].append((t.decode_us + t.forward_us + t.encode_us) / 1000)
    return [statistics.median(s) if s else float("nan") for stages in samples for s in stages]
