"""Pure: a plan as the cluster stores it (``status.plan``): placed stages, predictions, its id.

``PlanRecord.to_status``/``from_status`` are the one schema of ``status.plan``; the objects a
record needs are rendered in ``desired.py``. The id hashes what the shard Pods run, so two
plans' objects coexist during a make-before-break switch and the same plan names the same
objects twice (idempotent).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amp4ec.operator.spec import BatchingSpec, DeploymentSpec
from amp4ec.operator.tiles import TilePlacement, shard_label
from amp4ec.planner.types import Plan

__all__ = ["PlacedStage", "PlanRecord", "plan_id", "plan_record"]


@dataclass(frozen=True)
class PlacedStage:
    """One stage of a plan as the cluster sees it (also its ``status.plan.stages[]`` entry)."""

    pipeline: int
    stage: int
    node: str
    first_block: int
    last_block: int
    cpu: float
    """CPU cores of the node's share the planner counted on: the Pod's request and limit."""
    memory_bytes: int
    predicted_ms: float
    out_codec: str = "raw"
    """How the stage sends its outputs (the planner's choice for the cut after it)."""
    tiles: TilePlacement | None = None
    """Blocks run as row tiles with tile Pods on other nodes (``operator/tiles.py``); None: layer-wise."""

    @property
    def nodes(self) -> tuple[str, ...]:
        """Its own node, then its tile Pods' nodes."""
        return (self.node, *(self.tiles.nodes if self.tiles else ()))

    def holds(self) -> tuple[tuple[str, float, int], ...]:
        """(node, CPU cores, memory bytes) its Pods request: its own, then its tile Pods'."""
        own = ((self.node, self.cpu, self.memory_bytes),)
        if self.tiles is None:
            return own
        t = self.tiles
        return own + tuple((n, c, t.memory_bytes) for n, c in zip(t.nodes, t.cpu, strict=True))

    def to_status(self) -> dict[str, Any]:
        return {
            **({"tiles": self.tiles.to_status()} if self.tiles else {}),
            "outCodec": self.out_codec,
            "pipeline": self.pipeline,
            "stage": self.stage,
            "node": self.node,
            "firstBlock": self.first_block,
            "lastBlock": self.last_block,
            "cpu": self.cpu,
            "memoryBytes": self.memory_bytes,
            "predictedMs": round(self.predicted_ms, 3),
        }

    @classmethod
    def from_status(cls, d: Mapping[str, Any]) -> PlacedStage:
        return cls(
            pipeline=int(d["pipeline"]),
            stage=int(d["stage"]),
            node=str(d["node"]),
            first_block=int(d["firstBlock"]),
            last_block=int(d["lastBlock"]),
            cpu=float(d["cpu"]),
            memory_bytes=int(d["memoryBytes"]),
            predicted_ms=float(d["predictedMs"]),
            out_codec=str(d.get("outCodec", "raw")),
            tiles=TilePlacement.from_status(d.get("tiles")),
        )


@dataclass(frozen=True)
class PlanRecord:
    """A plan as stored in status and rendered into objects."""

    id: str
    objective: str
    strategy: str
    stages: tuple[PlacedStage, ...]
    throughput_rps: float
    latency_ms: float
    bottleneck_ms: float
    output_error: float = 0.0
    """The planner's estimate of the relative L2 error its codecs add to the final outputs."""
    batching: tuple[int, float] = (1, 0.0)
    """(max batch requests, max queue delay ms) every stage runs with."""

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n for s in self.stages for n in s.nodes)

    @property
    def shards(self) -> tuple[tuple[PlacedStage, int], ...]:
        """Every shard Pod as (its stage, tile): 0 is the stage's own Pod, k > 0 its k-th tile Pod."""
        return tuple((s, k) for s in self.stages for k in range(1 + (len(s.tiles.nodes) if s.tiles else 0)))

    def shard_keys(self) -> set[tuple[str, str]]:
        """The (pipeline, stage) labels of every shard Pod (``tiles.shard_label``)."""
        return {(str(s.pipeline), shard_label(s.stage, k)) for s, k in self.shards}

    def without(self, nodes: set[str]) -> PlanRecord | None:
        """The same plan (same id: its Pods and Services stay) less the pipelines through
        ``nodes``; None when none is left or none goes. Predictions are those of what is left."""
        gone = {s.pipeline for s in self.stages if set(s.nodes) & nodes}
        kept = tuple(s for s in self.stages if s.pipeline not in gone)
        if not gone or not kept:
            return None
        chains: dict[int, list[float]] = {}
        for s in kept:
            chains.setdefault(s.pipeline, []).append(s.predicted_ms)
        bottleneck = max(max(ms) for ms in chains.values())
        rate = sum(1000.0 / max(ms) if max(ms) > 0 else 0.0 for ms in chains.values())
        latency = max(self.latency_ms, min(sum(ms) for ms in chains.values()))
        return replace(self, stages=kept, throughput_rps=rate, bottleneck_ms=bottleneck, latency_ms=latency)

    def to_status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "objective": self.objective,
            "strategy": self.strategy,
            "stages": [s.to_status() for s in self.stages],
            "predicted": {
                "throughputRps": _finite(self.throughput_rps),
                "latencyMs": round(self.latency_ms, 3),
                "bottleneckMs": round(self.bottleneck_ms, 3),
                "outputError": self.output_error,
            },
            "batching": {"maxBatchRequests": self.batching[0], "maxQueueDelayMs": self.batching[1]},
        }

    @classmethod
    def from_status(cls, d: Mapping[str, Any] | None) -> PlanRecord | None:
        if not d or not d.get("stages"):
            return None
        p = d.get("predicted") or {}
        b = d.get("batching") or {}
        return cls(
            id=str(d["id"]),
            objective=str(d.get("objective", "throughput")),
            strategy=str(d.get("strategy", "optimal")),
            stages=tuple(PlacedStage.from_status(s) for s in d["stages"]),
            throughput_rps=float(p.get("throughputRps", 0.0)),
            latency_ms=float(p.get("latencyMs", 0.0)),
            bottleneck_ms=float(p.get("bottleneckMs", 0.0)),
            output_error=float(p.get("outputError", 0.0)),
            batching=(int(b.get("maxBatchRequests", 1)), float(b.get("maxQueueDelayMs", 0.0))),
        )


def _finite(x: float) -> float:
    return round(x, 3) if x == x and x not in (float("inf"), float("-inf")) else 0.0


def plan_id(spec: DeploymentSpec, stages: Sequence[PlacedStage]) -> str:
    """Eight hex digits naming what the shard Pods run: the model and the placement, and how
    they are scheduled (a toleration added to a Pending deployment must roll out new Pods)."""
    key: dict[str, Any] = {
        "model": spec.model.model_dump(by_alias=True),
        "inputShape": list(spec.input_shape or ()),
        "stages": [(s.pipeline, s.stage, s.node, s.first_block, s.last_block, s.cpu) for s in stages],
    }
    tiles = [s.tiles.to_status() for s in stages if s.tiles]
    if tiles:  # absent when layer-wise: the ids of existing plans do not change
        key["tiles"] = tiles
    codecs = [s.out_codec for s in stages]
    if any(c != "raw" for c in codecs):  # absent when raw: the ids of existing plans do not change
        key["codecs"] = codecs
    pod = spec.model_dump(by_alias=True, include={"tolerations", "image_pull_secrets", "priority_class_name"})
    if any(pod.values()):  # absent when unset: the ids of existing plans do not change
        key["pod"] = pod
    if spec.batching != BatchingSpec():  # likewise: a batching change rolls out new Pods
        key["batching"] = spec.batching.model_dump(by_alias=True)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def plan_record(spec: DeploymentSpec, plan: Plan, node_cpu: Mapping[str, float]) -> PlanRecord:
    """A planner Plan plus the CPU share of each node → what status stores and Pods need."""
    stages = tuple(
        PlacedStage(
            pipeline=p,
            stage=i,
            node=s.node,
            first_block=s.first_block,
            last_block=s.last_block,
            cpu=float(node_cpu[s.node]),
            memory_bytes=int(s.memory_bytes),
            predicted_ms=float(s.stage_ms),
            out_codec=s.out_codec,
            tiles=TilePlacement.of(s, node_cpu),
        )
        for p, pipeline in enumerate(plan.pipelines)
        for i, s in enumerate(pipeline.stages)
    )
    return PlanRecord(
        id=plan_id(spec, stages),
        objective=plan.objective,
        strategy=plan.strategy,
        stages=stages,
        throughput_rps=plan.predicted.throughput_rps,
        latency_ms=plan.predicted.latency_ms,
        bottleneck_ms=plan.predicted.bottleneck_ms,
        output_error=plan.predicted.output_error,
        batching=(spec.batching.max_batch_requests, spec.batching.max_queue_delay_ms),
    )
