"""The benchmark's results as typed values: what each configuration measured, and its JSON form.

Every measuring module returns one of these frozen dataclasses; ``report``, ``markdown``,
``plots`` and the CLI read their fields, never string keys. A field's name is its JSON key, so
``results.json`` (under ``--out``) is ``json_form``'s generic walk over the fields.

[Note: results.json format] ``schema`` 1, the same keys as before these types: a field that is
``None`` and marked ``OMIT`` is left out (it was absent: no compressed cut, no shaped links…);
any other ``None`` is written ``null``, and non-finite floats too (``report.write_json``).
``from_json`` reads a ``null`` float as NaN and a missing ``OMIT`` field as None. It reads what
``write_json`` writes; files from before plan rows carried ``stage`` (the committed
``docs/bench/results.json`` among them) stop at the first missing field, which it names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from amp4ec.bench.json_form import OMIT, from_json, to_json
from amp4ec.wire.stage import Batching

__all__ = [
    "SCHEMA",
    "BatchingPredictions",
    "BatchingResult",
    "BenchResults",
    "Comparison",
    "ConfigurationResult",
    "ErrorFigures",
    "FailedScenario",
    "FailoverResult",
    "FailoverScenario",
    "Ideal",
    "LatencyOpenLoop",
    "LatencyPlan",
    "LatencyResult",
    "LinkRow",
    "LinkShapeRow",
    "Machine",
    "MeanBatch",
    "MeasuredPlan",
    "MultiTenantResult",
    "NodeRow",
    "NodeShare",
    "NotRun",
    "OpenLoop",
    "Overhead",
    "P95Plan",
    "PlanRow",
    "PlannerPrediction",
    "Predicted",
    "Quantiles",
    "Recovery",
    "Saturation",
    "ScenarioResult",
    "StageFigures",
    "StandardResult",
    "StrategyResult",
    "TenantRow",
    "TileGroupRow",
    "TiledStageRow",
    "TransportFigures",
    "TransportRow",
    "Unmeasured",
    "WireBytes",
    "plan_rows",
]

SCHEMA = 1


class _Ok:
    """A result that was measured: its JSON has ``status: ok`` (and, for a configuration, its
    ``kind``; the standard configuration has none)."""

    KIND: ClassVar[str | None] = None

    @classmethod
    def accepts(cls, data: Mapping[str, Any]) -> bool:
        return data.get("status") == "ok" and data.get("kind") == cls.KIND


class _NotOk:
    @classmethod
    def accepts(cls, data: Mapping[str, Any]) -> bool:
        return data.get("status") != "ok"


# --- one measured plan ------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantiles:
    p50: float
    p95: float
    mean: float
    max: float


@dataclass(frozen=True)
class PlanRow:
    """One stage of a plan (``Plan.rows()``): where it runs and which blocks."""

    pipeline: int
    stage: int
    node: str
    first_block: int
    last_block: int
    out_codec: str | None = field(default=None, metadata=OMIT)
    """How it sends its outputs; absent when raw."""

    def blocks(self) -> str:
        return f"{self.node}[{self.first_block}–{self.last_block}]"


def plan_rows(rows: list[dict[str, Any]]) -> tuple[PlanRow, ...]:
    """``Plan.rows()`` (or a failover record's ``plan_after``) as typed rows."""
    return tuple(PlanRow(**row) for row in rows)


@dataclass(frozen=True)
class MeanBatch:
    """Mean requests per forward the answers met (None: no answer)."""

    saturation: float | None
    open_loop: float | None


@dataclass(frozen=True)
class ErrorFigures:
    """A compressed plan's answers against the monolith's (``slicing.compression.OutputError``)."""

    inputs: int
    rel_l2_max: float
    rel_l2_mean: float
    top1_agreement: float


@dataclass(frozen=True)
class Saturation:
    rps: float
    """The best closed-loop throughput over the concurrency levels tried."""
    concurrency: int
    requests: int
    by_concurrency: dict[str, float]


@dataclass(frozen=True)
class OpenLoop:
    """Poisson arrivals at ``rate_rps``; latencies counted from the scheduled arrival."""

    rate_rps: float
    sent: int
    completed: int
    dropped: int
    late: int
    achieved_rps: float
    p50_ms: float
    p95_ms: float
    mean_ms: float
    max_ms: float
    latencies_ms: tuple[float, ...]


@dataclass(frozen=True)
class Overhead:
    """Agents' CPU per request, and how much of it is beyond the forward passes."""

    agent_cpu_ms: float
    forward_cpu_ms: float
    overhead_cpu_ms: float
    overhead_fraction: float


@dataclass(frozen=True)
class WireBytes:
    """Bytes per request: client frames, inter-stage activations and relayed answers."""

    client: float
    inter_stage: float
    total: float


@dataclass(frozen=True)
class StageFigures:
    """One stage: its plan row, its predicted times and what was measured (None: no request)."""

    pipeline: int
    stage: int
    node: str
    first_block: int
    last_block: int
    out_codec: str | None = field(default=None, metadata=OMIT)
    predicted_ms: float = 0.0
    predicted_compute_ms: float = 0.0
    predicted_transfer_ms: float = 0.0
    predicted_overhead_ms: float = 0.0
    predicted_codec_ms: float = 0.0
    measured_ms: float | None = None
    forward_ms: float | None = None

    @property
    def predicted_cpu_ms(self) -> float:
        """The CPU part of the predicted stage time: its blocks and its agent's per-request overhead."""
        return self.predicted_compute_ms + self.predicted_overhead_ms

    @property
    def error(self) -> float | None:
        """(measured − predicted) / predicted for the CPU part, or None when missing.

        Measured is CPU per request over the CPU limit, so the predicted inbound transfer is left
        out: on a shaped link it is wall time the stage spends waiting, not computing."""
        pred, meas = self.predicted_cpu_ms, self.measured_ms
        if not pred or meas is None or meas != meas:
            return None
        return (meas - pred) / pred


@dataclass(frozen=True)
class Predicted:
    bottleneck_ms: float
    latency_ms: float
    throughput_rps: float
    output_error: float


@dataclass(frozen=True)
class Comparison:
    """result / base: below 1 is better for latencies, above 1 better for throughput."""

    single_latency: float | None
    open_p95: float | None
    throughput: float | None


@dataclass(frozen=True)
class MeasuredPlan(_Ok):
    """One deployed plan's figures (``measure.measure_plan``), and what the configuration adds."""

    batching: Batching
    mean_batch: MeanBatch
    plan: tuple[PlanRow, ...]
    notes: tuple[str, ...]
    max_abs_diff: float
    param_mb: tuple[float, ...]
    single_ms: Quantiles
    saturation: Saturation
    open_loop: OpenLoop
    overhead: Overhead
    bytes_per_request: WireBytes
    stages: tuple[StageFigures, ...]
    predicted: Predicted
    output_error: ErrorFigures | None = field(default=None, metadata=OMIT)
    """Only for a plan that compresses a cut."""
    planning_ms: float | None = field(default=None, metadata=OMIT)
    """Median wall time of its planning calls."""
    tuning: str | None = field(default=None, metadata=OMIT)
    """The resource-matched monolith's tuning (threads × workers)."""
    threads: int | None = field(default=None, metadata=OMIT)
    workers: int | None = field(default=None, metadata=OMIT)
    tunings_rps: dict[str, float | None] | None = field(default=None, metadata=OMIT)
    """The matched monolith: every tuning's saturation; the best one is this result."""
    same_plan_as: str | None = field(default=None, metadata=OMIT)
    """A strategy before made the very same plan: these are its figures."""
    fraction_of_ideal: float | None = None
    vs_matched_monolith: Comparison | None = None
    vs_monolith: Comparison | None = None
    status: str = "ok"


@dataclass(frozen=True)
class Unmeasured(_NotOk):
    """A strategy or row that was not measured: ``infeasible`` (no plan) or ``failed``."""

    status: str
    reason: str


StrategyResult = MeasuredPlan | Unmeasured


# --- the standard configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeRow:
    name: str
    cpu: float
    memory_mb: float | None
    paper_cpu: float | None = field(default=None, metadata=OMIT)
    """The paper's share before scaling (absent for the matched monolith)."""
    offered_to_shards_mb: float | None = field(default=None, metadata=OMIT)
    """Memory the planner may fill (absent for the matched monolith)."""


@dataclass(frozen=True)
class NodeShare:
    """A node as the other configurations list it: its name and CPU share."""

    name: str
    cpu: float


@dataclass(frozen=True)
class LinkShapeRow:
    rate_mbit: float
    delay_ms: float


@dataclass(frozen=True)
class LinkRow:
    src: str
    dst: str
    rtt_ms: float
    mbit_s: float


@dataclass(frozen=True)
class Ideal:
    """The sum of each node's standalone throughput with the whole model."""

    rps: float
    per_node_rps: dict[str, float]
    measured: str
    """How: which limits, alone or all at once."""


@dataclass(frozen=True)
class TransportFigures:
    rps: float
    single_p50_ms: float
    agent_cpu_ms: float


@dataclass(frozen=True)
class TransportRow:
    """Mutual TLS against the same plan run ``--insecure``."""

    hops: int
    mtls: TransportFigures
    insecure: TransportFigures
    throughput_loss_pct: float
    added_ms_per_hop: float
    cpu_loss_pct: float
    added_cpu_ms: float


@dataclass(frozen=True)
class StandardResult(_Ok):
    """The paper's comparison on one cluster: every strategy, both monoliths and the ideal."""

    name: str
    title: str
    model: str
    input_shape: tuple[int, ...]
    blocks: int
    model_mb: float
    note: str
    scale_factor: float
    nodes: tuple[NodeRow, ...]
    matched: NodeRow
    strategies: dict[str, StrategyResult]
    cpu_limits: str
    links_measured: tuple[LinkRow, ...]
    open_loop_rate_rps: float | None
    ideal: Ideal
    links: LinkShapeRow | None = field(default=None, metadata=OMIT)
    transport: dict[str, TransportRow] | None = field(default=None, metadata=OMIT)
    status: str = "ok"

    def ok_strategies(self) -> dict[str, MeasuredPlan]:
        return {k: v for k, v in self.strategies.items() if isinstance(v, MeasuredPlan)}


# --- failover ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """From the answer times of a failover run (``failover.recovery``)."""

    rps_before: float | None
    p99_before_ms: float | None
    rps_after: float | None = None
    to_full_s: float | None = None
    p99_window_ms: float | None = None
    max_window_ms: float | None = None


@dataclass(frozen=True)
class FailoverScenario(_Ok):
    strategy: str
    fault: str
    node: str
    requests: int
    answered: int
    lost: int
    errors: tuple[str, ...]
    retried: int
    concurrency: int
    fault_s: float
    detected_after_s: float
    serving_after_s: float
    replanned: bool
    target_s: float | None
    met: bool
    plan_before: tuple[PlanRow, ...]
    plan_after: tuple[PlanRow, ...]
    rps_before: float | None
    p99_before_ms: float | None
    rps_after: float | None
    to_full_s: float | None
    p99_window_ms: float | None
    max_window_ms: float | None
    status: str = "ok"


@dataclass(frozen=True)
class FailedScenario(_NotOk):
    strategy: str
    fault: str
    status: str
    reason: str


ScenarioResult = FailoverScenario | FailedScenario


@dataclass(frozen=True)
class FailoverResult(_Ok):
    name: str
    title: str
    model: str
    scale_factor: float
    nodes: tuple[NodeShare, ...]
    requests: int
    scenarios: tuple[ScenarioResult, ...]
    cpu_limits: str
    note: str = ""
    kind: str = "failover"
    status: str = "ok"

    KIND: ClassVar[str | None] = "failover"


# --- multi-tenant -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantRow:
    name: str
    plan: tuple[PlanRow, ...]
    cpu: float
    fair_cpu: float
    rps: float
    predicted_rps: float
    share: float | None
    fair_share: float


@dataclass(frozen=True)
class MultiTenantResult(_Ok):
    name: str
    title: str
    model: str
    scale_factor: float
    nodes: tuple[NodeShare, ...]
    tenants: tuple[TenantRow, ...]
    note: str
    cpu_limits: str
    ideal: Ideal | None
    """None when some node cannot hold the model."""
    aggregate_rps: float
    fraction_of_ideal: float | None
    requests_per_tenant: int
    kind: str = "multi-tenant"
    status: str = "ok"

    KIND: ClassVar[str | None] = "multi-tenant"


# --- latency ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileGroupRow:
    first_block: int
    last_block: int
    nodes: tuple[str, ...]
    rows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TiledStageRow:
    node: str
    first_block: int
    last_block: int
    tiles: tuple[TileGroupRow, ...]


@dataclass(frozen=True)
class LatencyOpenLoop:
    rate_rps: float
    completed: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    max_ms: float


@dataclass(frozen=True)
class LatencyPlan:
    """One plan's single-request latency, each request paired with the fastest node alone."""

    plan: tuple[TiledStageRow, ...]
    tiled: bool
    notes: tuple[str, ...]
    max_abs_diff: float
    predicted_latency_ms: float
    single_ms: Quantiles
    single_p50_ms: float
    alone_single_p50_ms: float
    ratio_vs_alone: float
    single_samples_ms: tuple[float, ...]
    alone_samples_ms: tuple[float, ...]
    saturation_rps: float
    open_loop: LatencyOpenLoop


@dataclass(frozen=True)
class LatencyResult(_Ok):
    name: str
    title: str
    model: str
    input_shape: tuple[int, ...]
    scale_factor: float
    nodes: tuple[NodeShare, ...]
    target: float
    plans: dict[str, LatencyPlan]
    cpu_limits: str
    ratio: float
    """The latency-objective plan's ``ratio_vs_alone``."""
    note: str = ""
    links: LinkShapeRow | None = field(default=None, metadata=OMIT)
    """Shaped links between the nodes (``latency-100mbit``); absent on loopback."""
    kind: str = "latency"
    status: str = "ok"

    KIND: ClassVar[str | None] = "latency"


# --- batching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerPrediction:
    """What the planner expects of a plan: its saturation and, at the open-loop rate (when there
    is one), its latency and each stage's batch (``amp4ec.planner.load`` and ``.batching``)."""

    saturation_rps: float
    rate_rps: float | None = field(default=None, metadata=OMIT)
    p50_ms: float | None = field(default=None, metadata=OMIT)
    p95_ms: float | None = field(default=None, metadata=OMIT)
    mean_batch: float | None = field(default=None, metadata=OMIT)
    expected_batches: tuple[float, ...] | None = field(default=None, metadata=OMIT)
    """Per stage, in ``plan.stages`` order."""


@dataclass(frozen=True)
class BatchingPredictions:
    unbatched: PlannerPrediction
    batched: PlannerPrediction
    """The same placement, its stages priced at the blocks' batch times."""
    p95_objective: PlannerPrediction | None = field(default=None, metadata=OMIT)
    """The ``p95`` objective's plan for the open-loop rate (none without a rate)."""


@dataclass(frozen=True)
class P95Plan:
    """The ``p95`` objective's plan for the open-loop rate (``amp4ec.planner.tail``)."""

    rows: tuple[PlanRow, ...]
    same_as_optimal: bool
    notes: tuple[str, ...]
    """The planner's verdict: the p95 it chose, or that no plan sustains the rate."""


@dataclass(frozen=True)
class BatchingResult(_Ok):
    name: str
    title: str
    model: str
    scale_factor: float
    nodes: tuple[NodeShare, ...]
    matched_cpu: float
    batching: Batching
    targets: dict[str, float]
    rows: dict[str, StrategyResult]
    cpu_limits: str
    open_loop_rate_rps: float | None
    ideal: Ideal | None
    ratios: dict[str, float | None]
    predicted: BatchingPredictions
    p95_plan: P95Plan | None = field(default=None, metadata=OMIT)
    kind: str = "batching"
    status: str = "ok"

    KIND: ClassVar[str | None] = "batching"


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NotRun(_NotOk):
    """A configuration ``skipped`` (slow links unavailable) or ``failed``."""

    name: str
    status: str
    reason: str


ConfigurationResult = (
    StandardResult | FailoverResult | MultiTenantResult | LatencyResult | BatchingResult | NotRun
)


@dataclass(frozen=True)
class Machine:
    """The machine the figures came from."""

    cpu: str
    cores: int
    memory_gb: float
    kernel: str
    python: str
    torch: str
    amp4ec: str


@dataclass(frozen=True)
class BenchResults:
    """One ``amp4ec bench`` run: ``results.json``."""

    command: str
    started: str
    quick: bool
    transport: str
    """``mutual TLS`` or ``insecure``: what every hop ran."""
    machine: Machine
    cpu_budget: float
    configurations: tuple[ConfigurationResult, ...]
    wall_s: float = 0.0
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = to_json(self)
        return out

    @classmethod
    def from_json(cls, data: Any) -> BenchResults:
        return from_json(cls, data)
