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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amp4ec import pki
from amp4ec.operator.certs import shard_secret_name, stage_secret_name
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.names import child_base, label_value
from amp4ec.operator.netpol import network_policy
from amp4ec.operator.planstatus import PlacedStage, PlanRecord
from amp4ec.operator.podsecurity import harden, scheduling
from amp4ec.operator.spec import DeploymentSpec
from amp4ec.operator.storage import PodStorage, pod_storage
from amp4ec.operator.tiles import shard_label
from amp4ec.wire.stage import StageConfig

__all__ = [
    "LABEL_DEPLOYMENT",
    "LABEL_PIPELINE",
    "LABEL_PLAN",
    "LABEL_ROLE",
    "LABEL_STAGE",
    "deployment_policy",
    "desired_objects",
    "entry_service",
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


def _next_stage(record: PlanRecord, s: PlacedStage) -> PlacedStage | None:
    """The stage after ``s`` in its pipeline, or None for the last one."""
    return next((t for t in record.stages if t.pipeline == s.pipeline and t.stage == s.stage + 1), None)


def _stage_config(
    name: str,
    namespace: str,
    spec: DeploymentSpec,
    record: PlanRecord,
    s: PlacedStage,
    config: OperatorConfig,
    storage: PodStorage,
) -> StageConfig:
    """What the agent of ``s`` runs: its blocks, its weights and its next hop."""
    nxt = _next_stage(record, s)
    next_hop = (
        f"{stage_service_name(name, record.id, nxt.pipeline, nxt.stage)}.{namespace}.svc:{config.shard_port}"
        if nxt
        else ""
    )
    upstream = (
        pki.stage_identity(namespace, name, s.stage - 1) if s.stage else pki.client_identity(namespace, name)
    )
    return StageConfig(
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


@dataclass(frozen=True)
class _Shard:
    """One shard Pod of a stage: the stage's own (tile 0) or its tile Pod ``tile``."""

    placed: PlacedStage
    tile: int
    node: str
    cpu: float
    memory_bytes: int
    stage: StageConfig
    """What its agent runs."""

    @property
    def blocks(self) -> str:
        """The blocks it computes (a tile Pod: the blocks of its tile phases)."""
        span = self.stage if self.tile else self.placed
        return f"{span.first_block}-{span.last_block}"


def _shard(
    name: str,
    namespace: str,
    spec: DeploymentSpec,
    record: PlanRecord,
    s: PlacedStage,
    config: OperatorConfig,
    storage: PodStorage,
    tile: int,
) -> _Shard:
    """Where the Pod runs and what it serves: a tiled stage's own Pod scatters its tile phases to
    its tile Pods; tile Pod ``tile`` computes its rows on ``s.tiles.nodes[tile - 1]``."""
    stage = _stage_config(name, namespace, spec, record, s, config, storage)
    if not s.tiles:
        return _Shard(s, 0, s.node, s.cpu, s.memory_bytes, stage)
    stage, tile_stages = _tiled(name, namespace, record, s, stage, config)
    if not tile:
        return _Shard(s, 0, s.node, s.cpu, s.memory_bytes, stage)
    node = s.tiles.nodes[tile - 1]
    return _Shard(s, tile, node, s.tiles.cpu[tile - 1], s.tiles.memory_bytes, tile_stages[node])


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


def _serves_v2(shard: _Shard, config: OperatorConfig) -> bool:
    """The v2 front door lives in the entry stage's own agent (node_agent/entry.py)."""
    return shard.placed.stage == 0 and not shard.tile and bool(config.v2_rest_port)


def _agent_args(name: str, shard: _Shard, config: OperatorConfig) -> list[str]:
    """The node agent's command line: where it listens, its stage, its front door and its TLS."""
    args = [
        "--node", shard.node,
        "--host", "[::]",
        "--port", str(config.shard_port),
        "--metrics-port", str(config.metrics_port),
        "--cpu-limit", f"{shard.cpu:g}",
        *shard.stage.to_args(),
    ]  # fmt: skip
    if _serves_v2(shard, config):
        args += ["--v2-http-port", str(config.v2_rest_port), "--v2-grpc-port", str(config.v2_grpc_port)]
        args += ["--v2-model-name", name]
    if config.tls:
        args += [
            arg for part, file in _TLS_FILES for arg in (f"--tls-{part}", f"{TLS_DIR}/{file}")
        ]  # its leaf
        args += ["--health-port", str(config.health_port)]
    else:
        args.append("--insecure")
    return args


def _container_ports(shard: _Shard, config: OperatorConfig) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = [
        {"name": "grpc", "containerPort": config.shard_port},
        {"name": "metrics", "containerPort": config.metrics_port},
    ]
    if config.tls:
        ports.append({"name": "health", "containerPort": config.health_port})
    if _serves_v2(shard, config):
        ports += [
            {"name": "v2-rest", "containerPort": config.v2_rest_port},
            {"name": "v2-grpc", "containerPort": config.v2_grpc_port},
        ]
    return ports


def _resources(shard: _Shard, config: OperatorConfig) -> dict[str, Any]:
    """CPU: the planner's share, request = limit. Memory: the shard's bytes plus the agent's
    overhead requested, twice that as the limit."""
    memory = shard.memory_bytes + config.memory_overhead_bytes
    return {
        "requests": {"cpu": _quantity_cpu(shard.cpu), "memory": _quantity_mem(memory)},
        "limits": {"cpu": _quantity_cpu(shard.cpu), "memory": _quantity_mem(2 * memory)},
    }


def _probes(config: OperatorConfig) -> dict[str, Any]:
    """gRPC health probes: on the plaintext health port under TLS, else on the shard port."""
    probe_port = config.health_port if config.tls else config.shard_port
    return {
        "readinessProbe": {
            "grpc": {"port": probe_port, "service": "amp4ec.wire.v1.Shard"},
            "periodSeconds": 2,
        },
        "livenessProbe": {"grpc": {"port": probe_port}, "periodSeconds": 10, "failureThreshold": 6},
    }


def _shard_container(
    name: str, shard: _Shard, config: OperatorConfig, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "shard",
        "image": config.agent_image,
        "command": ["python", "-m", "amp4ec.node_agent"],
        "args": _agent_args(name, shard, config),
        "ports": _container_ports(shard, config),
        "resources": _resources(shard, config),
        **_probes(config),
        "env": [
            {"name": k, "value": v} for k, v in sorted({**config.shard_env, **_factory_env(config)}.items())
        ],
    }
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _shard_metadata(
    name: str, namespace: str, record: PlanRecord, shard: _Shard, config: OperatorConfig
) -> dict[str, Any]:
    s = shard.placed
    labels = _labels(
        name,
        {
            LABEL_PLAN: record.id,
            LABEL_PIPELINE: str(s.pipeline),
            LABEL_STAGE: shard_label(s.stage, shard.tile),
            LABEL_ROLE: "shard",
        },
    )
    return {
        "name": f"{stage_service_name(name, record.id, s.pipeline, s.stage, shard.tile)}",
        "namespace": namespace,
        "labels": labels,
        "annotations": {
            "amp4ec.io/blocks": shard.blocks,
            "amp4ec.io/predicted-ms": f"{s.predicted_ms:.3f}",
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(config.metrics_port),
        },
    }


def _shard_pod(
    name: str,
    namespace: str,
    spec: DeploymentSpec,
    record: PlanRecord,
    s: PlacedStage,
    config: OperatorConfig,
    tile: int = 0,
) -> dict[str, Any]:
    """The Pod of stage ``s`` (tile 0), or of its tile ``tile`` on ``s.tiles.nodes[tile - 1]``:
    its agent, pinned to its node, its TLS leaf and weights mounted, hardened."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if config.tls:
        volumes.append(_tls_volume(name, s.stage, cert_manager=bool(config.cert_issuer)))
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    storage = pod_storage(spec, config, tls=mounts[0] if mounts else None)
    shard = _shard(name, namespace, spec, record, s, config, storage, tile)
    volumes += storage.volumes
    mounts += storage.mounts
    pod_spec: dict[str, Any] = {
        **scheduling(spec, config, shard.node),
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 10,
        "containers": [_shard_container(name, shard, config, mounts)],
    }
    if storage.init_containers:
        pod_spec["initContainers"] = storage.init_containers
    if volumes:
        pod_spec["volumes"] = volumes
    harden(pod_spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _shard_metadata(name, namespace, record, shard, config),
        "spec": pod_spec,
    }


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
