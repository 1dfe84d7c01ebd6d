"""Pure: the Kubernetes objects a plan needs (shard Pods, per-stage Services, the entry Service).

Shard Pods are restricted (``podsecurity.harden``, the last step of rendering one), names are
unique per deployment (``names.py``), and one NetworkPolicy per deployment (``netpol.py``)
selects the shards of every plan.

Names carry the plan's id, so the objects of two plans coexist during a make-before-break
switch, and creating the same plan twice names the same objects (idempotent). The handler
adopts the results (owner references) and applies them through ``k8s.py``.

[Note: why a Service per (plan, stage)] A stage's next hop must serve exactly the next
block range of the *same* plan; a stable per-stage Service that switched plans would point
a new first stage at an old second stage for a moment. Only the entry Service is shared
across plans: its selector moves to the new plan once every new shard is ready.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from amp4ec import pki
from amp4ec.operator.certs import shard_secret_name, stage_secret_name
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.names import child_base, label_value
from amp4ec.operator.netpol import network_policy
from amp4ec.operator.podsecurity import harden, scheduling
from amp4ec.operator.spec import BatchingSpec, DeploymentSpec
from amp4ec.operator.storage import pod_storage
from amp4ec.operator.tiles import TilePlacement, shard_label
from amp4ec.planner.types import Plan
from amp4ec.wire.stage import StageConfig

__all__ = [
    "LABEL_DEPLOYMENT",
    "LABEL_PIPELINE",
    "LABEL_PLAN",
    "LABEL_ROLE",
    "LABEL_STAGE",
    "PlacedStage",
    "PlanRecord",
    "deployment_policy",
    "desired_objects",
    "entry_service",
    "plan_record",
    "stage_service_name",
]

LABEL_DEPLOYMENT = "amp4ec.io/deployment"
LABEL_PLAN = "amp4ec.io/plan"
LABEL_PIPELINE = "amp4ec.io/pipeline"
LABEL_STAGE = "amp4ec.io/stage"
LABEL_ROLE = "amp4ec.io/role"
_COMMON = {"app.kubernetes.io/name": "amp4ec-shard", "app.kubernetes.io/managed-by": "amp4ec-operator"}
MiB = 1024 * 1024
TLS_DIR = "/var/run/amp4ec/tls"
_TLS_FILES = (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))
"""Where the storage initializer puts a ``storageUri``'s weights for the shard."""


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


def stage_service_name(name: str, plan: str, pipeline: int, stage: int, tile: int = 0) -> str:
    # DNS-1035 labels (<= 63): a base of <= 40 (names.py), "-<plan>-p<i>s<j>[-t<k>]" after it.
    return f"{child_base(name)}-{plan}-p{pipeline}s{stage}" + (f"-t{tile}" if tile else "")


def _labels(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**_COMMON, LABEL_DEPLOYMENT: label_value(name), **(extra or {})}


FACTORY_ENV = "AMP4EC_ALLOW_FACTORIES"
"""The node agent's own allow-list of factory modules (it refuses any other ``module:factory``)."""


def _factory_env(config: OperatorConfig) -> dict[str, str]:
    """The cluster admin's factory modules, for the agent's check of its own (shards, monitor)."""
    return {FACTORY_ENV: ",".join(config.allowed_factory_modules)} if config.allowed_factory_modules else {}


def _quantity_cpu(cores: float) -> str:
    return f"{max(10, round(cores * 1000))}m"


def _quantity_mem(nbytes: int) -> str:
    return f"{max(1, -(-nbytes // MiB))}Mi"


def _shard_pod(
    name: str,
    namespace: str,
    spec: DeploymentSpec,
    record: PlanRecord,
    s: PlacedStage,
    config: OperatorConfig,
    tile: int = 0,
) -> dict[str, Any]:
    """The Pod of stage ``s`` (tile 0), or of its tile ``tile`` on ``s.tiles.nodes[tile - 1]``."""
    pipeline = [t for t in record.stages if t.pipeline == s.pipeline]
    nxt = next((t for t in pipeline if t.stage == s.stage + 1), None)
    next_hop = (
        f"{stage_service_name(name, record.id, nxt.pipeline, nxt.stage)}.{namespace}.svc:{config.shard_port}"
        if nxt
        else ""
    )
    upstream = (
        pki.stage_identity(namespace, name, s.stage - 1) if s.stage else pki.client_identity(namespace, name)
    )
    storage = pod_storage(spec, config)
    stage = StageConfig(
        model=storage.model,
        first_block=s.first_block,
        last_block=s.last_block,
        stage=s.stage,
        seed=spec.model.seed,
        input_shape=tuple(spec.input_shape) if spec.input_shape else None,
        weights=storage.weights,
        next_hop=next_hop,
        # Who may call this stage and whom it calls are fixed here, by the operator (mutual
        # TLS): nothing on the network can re-target a shard (no control port).
        accept_from=(upstream,) if config.tls else (),
        next_hop_identity=pki.stage_identity(namespace, name, nxt.stage) if config.tls and nxt else "",
        output_codec=s.out_codec,
        max_batch_requests=spec.batching.max_batch_requests,
        max_queue_delay_ms=spec.batching.max_queue_delay_ms,
    )
    node, cpu, memory_bytes, blocks = s.node, s.cpu, s.memory_bytes, f"{s.first_block}-{s.last_block}"
    if s.tiles:
        stage, tile_stages = _tiled(name, namespace, record, s, stage, config)
        if tile:
            node, cpu = s.tiles.nodes[tile - 1], s.tiles.cpu[tile - 1]
            stage, memory_bytes = tile_stages[node], s.tiles.memory_bytes
            blocks = f"{stage.first_block}-{stage.last_block}"
    args = [
        "--node", node,
        "--host", "[::]",
        "--port", str(config.shard_port),
        "--metrics-port", str(config.metrics_port),
        "--cpu-limit", f"{cpu:g}",
        *stage.to_args(),
    ]  # fmt: skip
    entry_v2 = s.stage == 0 and not tile and bool(config.v2_rest_port)
    if entry_v2:  # the v2 front door lives in the entry stage's agent (node_agent/entry.py)
        args += ["--v2-http-port", str(config.v2_rest_port), "--v2-grpc-port", str(config.v2_grpc_port)]
        args += ["--v2-model-name", name]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    probe_port = config.shard_port
    if config.tls:
        args += [
            arg for part, file in _TLS_FILES for arg in (f"--tls-{part}", f"{TLS_DIR}/{file}")
        ]  # its leaf
        args += ["--health-port", str(config.health_port)]
        probe_port = config.health_port
        volumes.append(_tls_volume(name, s.stage, cert_manager=bool(config.cert_issuer)))
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    else:
        args.append("--insecure")
    init = storage.init_containers
    volumes += storage.volumes
    mounts += storage.mounts
    memory = memory_bytes + config.memory_overhead_bytes
    container: dict[str, Any] = {
        "name": "shard",
        "image": config.agent_image,
        "command": ["python", "-m", "amp4ec.node_agent"],
        "args": args,
        "ports": [
            {"name": "grpc", "containerPort": config.shard_port},
            {"name": "metrics", "containerPort": config.metrics_port},
        ],
        "resources": {
            "requests": {"cpu": _quantity_cpu(cpu), "memory": _quantity_mem(memory)},
            "limits": {"cpu": _quantity_cpu(cpu), "memory": _quantity_mem(2 * memory)},
        },
        "readinessProbe": {
            "grpc": {"port": probe_port, "service": "amp4ec.wire.v1.Shard"},
            "periodSeconds": 2,
        },
        "livenessProbe": {"grpc": {"port": probe_port}, "periodSeconds": 10, "failureThreshold": 6},
        "env": [
            {"name": k, "value": v} for k, v in sorted({**config.shard_env, **_factory_env(config)}.items())
        ],
    }
    if config.tls:
        container["ports"].append({"name": "health", "containerPort": config.health_port})
    if entry_v2:
        container["ports"] += [
            {"name": "v2-rest", "containerPort": config.v2_rest_port},
            {"name": "v2-grpc", "containerPort": config.v2_grpc_port},
        ]
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict[str, Any] = {
        **scheduling(spec, config, node),
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 10,
        "containers": [container],
    }
    if init:
        pod_spec["initContainers"] = init
    if volumes:
        pod_spec["volumes"] = volumes
    harden(pod_spec)
    labels = _labels(
        name,
        {
            LABEL_PLAN: record.id,
            LABEL_PIPELINE: str(s.pipeline),
            LABEL_STAGE: shard_label(s.stage, tile),
            LABEL_ROLE: "shard",
        },
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{stage_service_name(name, record.id, s.pipeline, s.stage, tile)}",
            "namespace": namespace,
            "labels": labels,
            "annotations": {
                "amp4ec.io/blocks": blocks,
                "amp4ec.io/predicted-ms": f"{s.predicted_ms:.3f}",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(config.metrics_port),
            },
        },
        "spec": pod_spec,
    }


def _tiled(
    name: str, namespace: str, record: PlanRecord, s: PlacedStage, stage: StageConfig, config: OperatorConfig
) -> tuple[StageConfig, dict[str, StageConfig]]:
    """Stage ``s`` scattering its tile phases to its tile Pods (each through its own Service),
    and each tile Pod's stage by node; every tile presents the stage's identity."""
    assert s.tiles is not None
    tiles = s.tiles

    def address(node: str) -> str:
        service = stage_service_name(name, record.id, s.pipeline, s.stage, tiles.nodes.index(node) + 1)
        return f"{service}.{namespace}.svc:{config.shard_port}"

    def identity(_node: str) -> str:
        return pki.stage_identity(namespace, name, s.stage) if config.tls else ""

    return stage.tiled(s.node, tiles.spans(), address, identity)


def _tls_volume(name: str, stage: int, *, cert_manager: bool = False) -> dict[str, Any]:
    """The shard Secret, projected down to this stage's pair: 0440, group the Pod's fsGroup
    (``podsecurity.SHARD_GID``), so only the agent reads its key. Under cert-manager, the
    stage's own Secret (``certmanager.py``), mounted at the same paths."""
    stem = "tls" if cert_manager else f"stage-{stage}"
    items = [
        {"key": "ca.crt", "path": "ca.crt"},
        {"key": f"{stem}.crt", "path": "tls.crt"},
        {"key": f"{stem}.key", "path": "tls.key"},
    ]
    secret_name = stage_secret_name(name, stage) if cert_manager else shard_secret_name(name)
    secret = {"secretName": secret_name, "items": items, "defaultMode": 0o440}
    return {"name": "tls", "secret": secret}


def _stage_service(
    name: str, namespace: str, record: PlanRecord, s: PlacedStage, config: OperatorConfig, tile: int = 0
) -> dict:
    selector = {
        LABEL_DEPLOYMENT: label_value(name),
        LABEL_PLAN: record.id,
        LABEL_PIPELINE: str(s.pipeline),
        LABEL_STAGE: shard_label(s.stage, tile),
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": stage_service_name(name, record.id, s.pipeline, s.stage, tile),
            "namespace": namespace,
            "labels": _labels(name, {LABEL_PLAN: record.id, LABEL_ROLE: "stage"}),
        },
        "spec": {
            "selector": selector,
            "ports": [{"name": "grpc", "port": config.shard_port, "targetPort": "grpc"}],
        },
    }


def desired_objects(
    name: str, namespace: str, spec: DeploymentSpec, record: PlanRecord, config: OperatorConfig
) -> list[dict[str, Any]]:
    """Every Service and shard Pod of one plan (a tiled stage's tile Pods and their Services
    included): Services first, so next hops resolve when Pods start."""
    services = [_stage_service(name, namespace, record, s, config, k) for s, k in record.shards]
    pods = [_shard_pod(name, namespace, spec, record, s, config, k) for s, k in record.shards]
    return services + pods


def entry_service(name: str, namespace: str, plan: str, config: OperatorConfig) -> dict[str, Any]:
    """The one Service clients use; it selects the first stage of every pipeline of ``plan``:
    amp4ec's own protocol on ``grpc``, the Open Inference Protocol on ``v2-rest`` and ``v2-grpc``."""
    ports = [{"name": "grpc", "port": config.shard_port, "targetPort": "grpc"}]
    if config.v2_rest_port:
        ports += [
            {"name": "v2-rest", "port": config.v2_rest_port, "targetPort": "v2-rest"},
            {"name": "v2-grpc", "port": config.v2_grpc_port, "targetPort": "v2-grpc"},
        ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_base(name),
            "namespace": namespace,
            "labels": _labels(name, {LABEL_ROLE: "entry"}),
        },
        "spec": {
            "selector": {LABEL_DEPLOYMENT: label_value(name), LABEL_PLAN: plan, LABEL_STAGE: "0"},
            "ports": ports,
        },
    }


def deployment_policy(
    name: str, namespace: str, spec: DeploymentSpec, config: OperatorConfig
) -> dict[str, Any] | None:
    """The deployment's NetworkPolicy (one for every plan), or None when the chart turned them off."""
    if not config.network_policy:
        return None
    return network_policy(name, namespace, spec, config, _labels(name, {LABEL_ROLE: "policy"}))


def as_dict(record: PlanRecord) -> dict[str, Any]:
    """Plain-dict form for logs and tests."""
    return asdict(record)
