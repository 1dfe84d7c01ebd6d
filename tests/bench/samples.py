"""Typed bench results with made-up figures, for the report and JSON tests (no cluster)."""

from __future__ import annotations

from dataclasses import replace

from amp4ec.bench.results import (
    BatchingPredictions,
    BatchingResult,
    BenchResults,
    Comparison,
    ErrorFigures,
    FailedScenario,
    FailoverResult,
    FailoverScenario,
    Ideal,
    LatencyOpenLoop,
    LatencyPlan,
    LatencyResult,
    LinkRow,
    LinkShapeRow,
    Machine,
    MeanBatch,
    MeasuredPlan,
    MultiTenantResult,
    NodeRow,
    NodeShare,
    NotRun,
    OpenLoop,
    Overhead,
    P95Plan,
    PlannerPrediction,
    PlanRow,
    Predicted,
    Quantiles,
    Saturation,
    StageFigures,
    StandardResult,
    TenantRow,
    TiledStageRow,
    TileGroupRow,
    TransportFigures,
    TransportRow,
    Unmeasured,
    WireBytes,
)
from amp4ec.wire.stage import Batching

MACHINE = Machine(cpu="x", cores=2, memory_gb=1.0, kernel="k", python="3", torch="t", amp4ec="0")
ROW = PlanRow(pipeline=0, stage=0, node="a", first_block=0, last_block=3)


def measured_plan(
    rps: float = 10.0, single_ms: float = 100.0, error: ErrorFigures | None = None
) -> MeasuredPlan:
    """One measured plan on node ``a``: ``rps`` at saturation, ``single_ms`` at p50 alone."""
    return MeasuredPlan(
        batching=Batching(),
        mean_batch=MeanBatch(1.0, 1.0),
        plan=(ROW,),
        notes=("a note",),
        max_abs_diff=1e-6,
        param_mb=(14.0,),
        single_ms=Quantiles(single_ms, 1.5 * single_ms, single_ms, 2 * single_ms),
        saturation=Saturation(rps=rps, concurrency=2, requests=40, by_concurrency={"2": rps}),
        open_loop=OpenLoop(9.0, 20, 20, 0, 1, 8.9, 110.0, 150.0, 115.0, 160.0, (100.0, 110.0, 160.0)),
        overhead=Overhead(agent_cpu_ms=50.0, forward_cpu_ms=45.0, overhead_cpu_ms=5.0, overhead_fraction=0.1),
        bytes_per_request=WireBytes(client=1e5, inter_stage=0.0, total=1e5),
        stages=(StageFigures(0, 0, "a", 0, 3, None, 95.0, 90.0, 0.5, 4.0, 0.0, 97.0, 88.0),),
        predicted=Predicted(bottleneck_ms=95.0, latency_ms=96.0, throughput_rps=10.5, output_error=0.0),
        output_error=error,
    )


def every_kind() -> BenchResults:
    """A run with one configuration of each kind, and every optional part filled somewhere."""
    optimal = replace(
        measured_plan(12.0),
        planning_ms=0.4,
        fraction_of_ideal=0.8,
        vs_matched_monolith=Comparison(0.9, None, 1.2),
        vs_monolith=None,
    )
    matched = replace(
        measured_plan(10.0),
        planning_ms=0.1,
        tuning="1 thread(s) x 1 worker(s)",
        threads=1,
        workers=1,
        tunings_rps={"1 thread(s) x 1 worker(s)": 10.0, "2 thread(s) x 1 worker(s)": None},
    )
    compressed = replace(
        measured_plan(15.0, error=ErrorFigures(8, 2e-4, 1e-4, 1.0)),
        plan=(replace(ROW, out_codec="fp16"),),
        same_plan_as="optimal",
    )
    figures = TransportFigures(rps=12.0, single_p50_ms=100.0, agent_cpu_ms=50.0)
    standard = StandardResult(
        name="standard",
        title="three nodes",
        model="mobilenet_v2",
        input_shape=(1, 3, 64, 64),
        blocks=21,
        model_mb=14.0,
        note="",
        scale_factor=0.8,
        nodes=(NodeRow("a", 0.8, 512.0, paper_cpu=1.0, offered_to_shards_mb=300.0),),
        matched=NodeRow("matched", 0.8, None),
        strategies={
            "matched_monolith": matched,
            "optimal": optimal,
            "optimal_fp16": compressed,
            "paper": Unmeasured("infeasible", "no node holds block 3"),
        },
        cpu_limits="cgroup",
        links_measured=(LinkRow("client", "a", 0.1, 900.0),),
        open_loop_rate_rps=9.0,
        ideal=Ideal(15.0, {"a": 15.0}, "each node alone"),
        links=LinkShapeRow(20.0, 10.0),
        transport={"optimal": TransportRow(1, figures, replace(figures, rps=12.5), 4.0, 0.2, 3.0, 1.5)},
    )
    scenario = FailoverScenario(
        strategy="optimal",
        fault="kill",
        node="node1",
        requests=400,
        answered=400,
        lost=0,
        errors=(),
        retried=3,
        concurrency=3,
        fault_s=4.0,
        detected_after_s=0.1,
        serving_after_s=0.2,
        replanned=False,
        target_s=3.0,
        met=True,
        plan_before=(ROW, replace(ROW, pipeline=1, node="b")),
        plan_after=(ROW,),
        rps_before=30.0,
        p99_before_ms=90.0,
        rps_after=20.0,
        to_full_s=0.5,
        p99_window_ms=300.0,
        max_window_ms=400.0,
    )
    failover = FailoverResult(
        name="failover",
        title="node1 fails",
        model="mobilenet_v2",
        scale_factor=0.8,
        nodes=(NodeShare("node0", 0.8),),
        requests=400,
        scenarios=(scenario, FailedScenario("equal", "hang", "failed", "no survivors")),
        cpu_limits="cgroup",
        note="replicas",
    )
    tenants = MultiTenantResult(
        name="multi-tenant",
        title="t",
        model="m",
        scale_factor=0.8,
        nodes=(NodeShare("a", 0.8),),
        tenants=(TenantRow("t0", (ROW,), 0.2, 0.2, 7.5, 8.0, 0.5, 0.5),),
        note="",
        cpu_limits="cgroup",
        ideal=None,
        aggregate_rps=15.0,
        fraction_of_ideal=None,
        requests_per_tenant=3,
    )
    group = TileGroupRow(0, 3, ("node0", "node1"), ((0, 5), (5, 10)))
    latency_plan = LatencyPlan(
        plan=(TiledStageRow("node0", 0, 20, (group,)),),
        tiled=True,
        notes=(),
        max_abs_diff=1e-6,
        predicted_latency_ms=60.0,
        single_ms=Quantiles(60.0, 70.0, 61.0, 80.0),
        single_p50_ms=60.0,
        alone_single_p50_ms=100.0,
        ratio_vs_alone=0.6,
        single_samples_ms=(60.0, 61.0),
        alone_samples_ms=(100.0, 99.0),
        saturation_rps=10.0,
        open_loop=LatencyOpenLoop(5.0, 20, 61.0, 75.0, 62.0, 90.0),
    )
    latency = LatencyResult(
        name="latency",
        title="tiles",
        model="mobilenet_v2",
        input_shape=(1, 3, 224, 224),
        scale_factor=0.8,
        nodes=(NodeShare("node0", 0.8),),
        target=0.7,
        plans={"latency_objective": latency_plan},
        cpu_limits="cgroup",
        ratio=0.6,
    )
    batching = BatchingResult(
        name="batching",
        title="b",
        model="mobilenet_v2",
        scale_factor=0.8,
        nodes=(NodeShare("node0", 0.8),),
        matched_cpu=1.6,
        batching=Batching(4, 0.0),
        targets={"p95_vs_matched": 1.1},
        rows={"matched": replace(matched, workers=2), "optimal": Unmeasured("failed", "agent died")},
        cpu_limits="cgroup",
        open_loop_rate_rps=9.0,
        ideal=Ideal(15.0, {"node0": 15.0}, "each node alone"),
        ratios={"p95_vs_matched": None, "batched_vs_ideal": 1.2},
        predicted=BatchingPredictions(
            unbatched=PlannerPrediction(95.0, 9.0, 100.0, 140.0, 1.0, (1.0, 1.0)),
            batched=PlannerPrediction(120.0),
            p95_objective=PlannerPrediction(90.0, 9.0, 80.0, 120.0, 1.0, (1.0,)),
        ),
        p95_plan=P95Plan((ROW,), same_as_optimal=False, notes=("p95 120.0 ms predicted at 9 req/s",)),
    )
    return BenchResults(
        command="amp4ec bench",
        started="2026-01-01T00:00:00+00:00",
        quick=True,
        transport="mutual TLS",
        machine=MACHINE,
        cpu_budget=1.6,
        configurations=(
            standard,
            failover,
            tenants,
            latency,
            batching,
            NotRun("slow-links", "skipped", "needs root"),
        ),
        wall_s=90.0,
    )
