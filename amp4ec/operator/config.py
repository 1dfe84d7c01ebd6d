"""OperatorConfig: the operator's one typed settings object, built once at start-up from the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from amp4ec.operator.certmanager import Issuer
from amp4ec.operator.measured import valid_window
from amp4ec.operator.spec import SpecPolicy
from amp4ec.operator.storage_hosts import parse_networks

__all__ = ["GROUP", "PLURAL", "VERSION", "OperatorConfig"]

GROUP = "amp4ec.io"
VERSION = "v1alpha1"
PLURAL = "inferencedeployments"

MiB = 1024 * 1024


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator reaches its dependencies and shapes shard Pods.

    Every field can be set from the environment as ``AMP4EC_<FIELD NAME IN CAPITALS>``
    (see ``from_env``); the defaults fit the manifests in ``manifests/``.
    """

    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Base URL of the Prometheus HTTP API that scrapes the monitor DaemonSet."""
    tls: bool = True
    """Mutual TLS on every hop, under the CA this operator runs (``operator/certs.py``);
    false = plaintext everywhere (``--insecure``), for comparison only."""
    namespace: str = "amp4ec-system"
    """The operator's own namespace: where the CA Secret and the monitors' Secret live."""
    cert_issuer: str = ""
    """cert-manager signs the leaves instead of this operator's CA (``certmanager.py``): the
    issuer as ``<Kind>/<name>`` (``ClusterIssuer/amp4ec-ca``) or ``<Kind>.<group>/<name>``;
    "" = the built-in CA (Secret ``amp4ec-ca``)."""
    cert_duration: str = "720h"
    """Lifetime cert-manager is asked for (a Go duration; with ``cert_issuer`` only)."""
    cert_renew_before: str = "240h"
    """cert-manager renews a leaf this long before it expires (with ``cert_issuer`` only)."""
    tls_dir: str = ""
    """With ``cert_issuer``: the folder of this operator's own leaf (``ca.crt``, ``tls.crt``,
    ``tls.key`` of ``operator.amp4ec``; the chart mounts its Certificate's Secret there),
    re-read when renewed. The built-in CA issues that leaf in memory instead."""
    health_port: int = 50053
    """Container port of a shard's plaintext health-only server: the kubelet's probes cannot
    present a certificate (mutual TLS only; insecure shards are probed on ``shard_port``)."""
    agent_image: str = "ghcr.io/amp4ec/node-agent:0.1.0"
    """Image of shard Pods (the node agent, torch side)."""
    initializer_image: str = "ghcr.io/amp4ec/operator:0.1.0"
    """Image of the storage initializer (fetches and verifies model files before a shard loads them)."""
    shard_port: int = 50051
    """Container port of a shard's gRPC server, also the port of every Service the operator makes."""
    metrics_port: int = 9090
    """Container port of a shard's Prometheus /metrics."""
    v2_rest_port: int = 8000
    """Port of the Open Inference Protocol's REST front door at each deployment's entry (the
    entry Service's and the stage-0 containers'); 0 serves no v2 (then ``v2_grpc_port`` is unused)."""
    v2_grpc_port: int = 8001
    """Port of the v2 gRPC front door (``inference.GRPCInferenceService``) at each entry."""
    operator_metrics_port: int = 8080
    """Port of the operator's own /metrics (0 = any free port, written to ``metrics_port_file``)."""
    metrics_port_file: str = ""
    """Where to write the operator's bound metrics port ("" = nowhere); for tests and sidecars."""
    memory_overhead_bytes: int = 256 * MiB
    """Added to a stage's predicted memory for its Pod's request: the Python and torch runtime."""
    capacity_max_age_s: float = 120.0
    """Node metrics older than this are stale: the node is left out (or the plan kept)."""
    ready_poll_s: float = 2.0
    """Delay between checks while shard Pods start (the handler's TemporaryError delay)."""
    infeasible_retry_s: float = 30.0
    """Delay before planning again when no placement fits (capacity may grow)."""
    retry_cap_s: float = 300.0
    """The longest wait between two retries of a blocked deployment: its own delay doubles at
    each retry up to this (``inferencedeployment.retry_delay``); a Pod or Node event reconciles
    at once anyway, a Secret or ConfigMap created later only at the next retry."""
    min_shard_cpu: float = 0.1
    """Least CPU share (cores) worth a shard: a node offering a deployment less is left out of
    its plan (placement.py)."""
    unschedulable_wait_s: float = 60.0
    """How long a shard Pod may stay Unschedulable before the operator re-plans around its node."""
    prometheus_timeout_s: float = 5.0
    """Timeout of one PromQL query."""
    measure_window: str = "2m"
    """PromQL range of ``status.measured`` (rates and quantiles over it): at least two scrapes
    of the shard Pods, better four (Grafana's rule for ``$__rate_interval``)."""
    measure_interval_s: float = 15.0
    """Seconds between two ``status.measured`` updates of one deployment (the re-plan timer
    wakes every 5 s; a shorter interval means every tick)."""
    profile_timeout_s: float = 120.0
    """Timeout of one ``Monitor.Profile`` call to a profiler Pod (loading and timing a model)."""
    # Profiler Pods (docs/operator.md, "Profiling in the deployment's namespace").
    profiler_port: int = 50052
    """Container port of a profiler Pod's Monitor.Profile (mutual TLS, the operator only)."""
    profiler_memory: str = "2Gi"
    """Memory limit of a profiler Pod (a Kubernetes quantity): the whole model, its
    activations at the input shape and the runtime. Past it the Pod is OOM-killed and the
    deployment says ``ProfilerFailed``."""
    profiler_cpu: str = "1"
    """CPU limit of a profiler Pod (one core: blocks are timed on one thread)."""
    profiler_cpu_request: str = "0"
    """CPU request of a profiler Pod. Zero by default: it runs for seconds, bounded by its limits,
    and must schedule on a node whose room the shards already requested (planning needs the
    profile before it can make room: a profiler that waited for room would wait for ever)."""
    profiler_memory_request: str = "0"
    """Memory request of a profiler Pod (its limit is ``profiler_memory``); zero as the CPU's."""
    profiler_deadline_s: int = 600
    """``activeDeadlineSeconds`` of a profiler Pod: fetching the model, starting, profiling."""
    shard_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of shard containers (``AMP4EC_SHARD_ENV`` as ``K=V,K2=V2``)."""
    # Hardening (docs/operator.md, "Kubernetes hardening"); set by the chart's values.
    allowed_factory_modules: tuple[str, ...] = ()
    """Modules whose ``module:factory`` an InferenceDeployment may name (comma-separated; a
    factory is code execution in the profiler and every shard). Default: none."""
    model_cache_address: str = ""
    """``host:port`` of the node-wide model cache as a storage initializer reaches it: the chart's
    Service of the monitors' cache port with ``internalTrafficPolicy: Local`` (each node's
    kube-proxy forwards only to that node's monitor); "" = no cache, every Pod fetches its own
    copy. Used under mutual TLS only (the monitor keys entries by the caller's namespace)."""
    storage_allowed_networks: tuple[str, ...] = ()
    """CIDRs a storageUri may reach although loopback or link-local (comma-separated; tests only)."""
    shard_tolerations: tuple[Mapping[str, Any], ...] = ()
    """Tolerations of every shard Pod, before the resource's own (a JSON list)."""
    shard_node_selector: Mapping[str, str] = field(default_factory=dict)
    """Labels every shard node must carry, beside the resource's ``spec.nodeSelector`` (``K=V,…``)."""
    shard_image_pull_secrets: tuple[str, ...] = ()
    """Secret names for pulling the agent image, in every shard Pod (comma-separated)."""
    shard_priority_class_name: str = ""
    """Priority class of shard Pods whose resource names none."""
    network_policy: bool = True
    """Create a NetworkPolicy per deployment (its shards reachable only from its own stages,
    its clients, the operator and Prometheus)."""
    operator_namespace: str = "amp4ec-system"
    """Namespace of the operator's Pod (NetworkPolicies let it reach shards)."""
    operator_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "amp4ec-operator",
            "app.kubernetes.io/component": "operator",
        }
    )
    """Labels of the operator's Pod (``K=V,…``)."""
    monitor_pod_labels: Mapping[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "amp4ec-monitor",
            "app.kubernetes.io/component": "monitor",
        }
    )
    """Labels of the monitor Pods (``K=V,…``): shard and profiler Pods may reach their cache port."""
    prometheus_namespace_labels: Mapping[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"}
    )
    """Labels of the namespace Prometheus runs in: only it may scrape shard metrics (``K=V,…``)."""
    prometheus_pod_labels: Mapping[str, str] = field(default_factory=dict)
    """Labels of the Prometheus Pods there (``K=V,…``; empty: any Pod of that namespace)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read ``AMP4EC_*`` variables; unknown ones are ignored, malformed ones raise ValueError."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"AMP4EC_{f.name.upper()}")
            if raw is None:
                continue
            if f.type == "Mapping[str, str]":
                values[f.name] = dict(kv.split("=", 1) for kv in raw.split(",") if "=" in kv)
            elif f.type == "tuple[str, ...]":
                values[f.name] = tuple(v.strip() for v in raw.split(",") if v.strip())
            elif f.type == "tuple[Mapping[str, Any], ...]":
                values[f.name] = tuple(_json_objects(f.name, raw))
            elif f.type == "bool":
                word = raw.strip().lower()
                if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(f"AMP4EC_{f.name.upper()}: expected true or false, got {raw!r}")
                values[f.name] = word in ("1", "true", "yes", "on")
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if not self.retry_cap_s > 0:
            raise ValueError(f"AMP4EC_RETRY_CAP_S: expected seconds > 0, got {self.retry_cap_s!r}")
        if not valid_window(self.measure_window):
            raise ValueError(
                "AMP4EC_MEASURE_WINDOW: expected a PromQL duration like 2m or 30s,"
                f" got {self.measure_window!r}"
            )
        if self.tls and self.cert_issuer:
            self.issuer()  # a malformed issuer or duration fails at start-up, naming its variable
            if not self.tls_dir:
                raise ValueError("AMP4EC_TLS_DIR: required with AMP4EC_CERT_ISSUER (the operator's own leaf)")
        host, _, port = self.model_cache_address.rpartition(":")
        if self.model_cache_address and not (host and port.isdigit()):
            raise ValueError(
                f"AMP4EC_MODEL_CACHE_ADDRESS: expected host:port, got {self.model_cache_address!r}"
            )
        try:
            parse_networks(self.storage_allowed_networks)
        except ValueError as exc:
            raise ValueError(f"AMP4EC_STORAGE_ALLOWED_NETWORKS: expected CIDRs, {exc}") from None

    def issuer(self) -> Issuer | None:
        """cert-manager's issuer of deployment leaves; None = the built-in CA (or no TLS)."""
        if not (self.tls and self.cert_issuer):
            return None
        return Issuer.parse(self.cert_issuer, self.cert_duration, self.cert_renew_before)

    def spec_policy(self) -> SpecPolicy:
        """What the cluster admin allows in a resource's spec beyond the CRD schema."""
        return SpecPolicy(
            allowed_factory_modules=self.allowed_factory_modules,
            storage_allowed_networks=parse_networks(self.storage_allowed_networks),
        )


def _json_objects(name: str, raw: str) -> list[Mapping[str, Any]]:
    value = json.loads(raw or "[]")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"AMP4EC_{name.upper()}: expected a JSON list of objects, got {raw!r}")
    return value
