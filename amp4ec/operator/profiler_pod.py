"""Pure: a deployment's short-lived profiler Pod, its NetworkPolicy, and what its status says.

The operator profiles a model it has not cached in a Pod in the deployment's namespace
(``profiles.py`` drives it): the agent image running ``python -m amp4ec.node_agent --profiler``
(``Monitor.Profile`` only, the operator's identity only), the shards' restricted security
settings (``podsecurity.harden``: non-root, read-only root, no token), the deployment's own
scheduling fields, a memory limit and ``activeDeadlineSeconds`` from the chart, the storage
initializer when the model comes from storage (``storage.py``), ``restartPolicy: Never``,
owned by the deployment. Its identity is ``profiler.<deployment>.<namespace>.amp4ec`` from
Secret ``<deployment>-profiler-tls``; never the monitors'.

``profiler_state(pod)`` reads a Pod's status as a kubelet reports it: starting, ready (with
its address), or failed, and why (the initializer's last lines, OOMKilled, the deadline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from amp4ec.operator.certs import profiler_secret_name
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.names import child_base, label_value
from amp4ec.operator.netpol import model_cache_egress
from amp4ec.operator.podsecurity import harden, scheduling
from amp4ec.operator.spec import DeploymentSpec
from amp4ec.operator.storage import INITIALIZER, initializer_failure, pod_storage

__all__ = [
    "LABEL_PROFILE",
    "ProfilerState",
    "profiler_network_policy",
    "profiler_pod",
    "profiler_pod_name",
    "profiler_state",
]

LABEL_PROFILE = "amp4ec.io/profile"
"""The profile key's digest: which (model, seed, shape, storage) a profiler Pod profiles."""
_LABEL_DEPLOYMENT = "amp4ec.io/deployment"
_LABEL_ROLE = "amp4ec.io/role"
_TLS_DIR = "/var/run/amp4ec/tls"
_NAMESPACE_NAME = "kubernetes.io/metadata.name"
_LINK_LOCAL = {"0.0.0.0/0": ["169.254.0.0/16"], "::/0": ["fe80::/10"]}


def profiler_pod_name(name: str, key_digest: str) -> str:
    """``<base>-profiler-<key digest (8)>``: one Pod per deployment and profile key (≤ 58 characters)."""
    return f"{child_base(name)}-profiler-{key_digest[:8]}"


def _labels(name: str, key_digest: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "amp4ec-profiler",
        "app.kubernetes.io/managed-by": "amp4ec-operator",
        _LABEL_DEPLOYMENT: label_value(name),
        _LABEL_ROLE: "profiler",
        LABEL_PROFILE: key_digest[:8],
    }


def profiler_pod(
    name: str, namespace: str, spec: DeploymentSpec, config: OperatorConfig, key_digest: str
) -> dict[str, Any]:
    """The profiler Pod of ``name`` for the profile key ``key_digest`` (mutual TLS only)."""
    leaf = {"name": "tls", "mountPath": _TLS_DIR, "readOnly": True}
    storage = pod_storage(spec, config, tls=leaf if config.tls else None)
    args = [
        "--profiler",
        "--model", storage.model,  # the one model it profiles: a request cannot name another
        "--seed", str(spec.model.seed),
        "--node", "profiler",
        "--host", "[::]",
        "--control-port", str(config.profiler_port),
        "--health-port", str(config.health_port),
    ]  # fmt: skip
    if spec.input_shape:
        args += ["--input-shape", ",".join(str(d) for d in spec.input_shape)]
    if storage.weights:
        args += ["--weights", storage.weights]
    volumes, mounts = [*storage.volumes], [*storage.mounts]
    if config.tls:
        args += [
            "--tls-ca",
            f"{_TLS_DIR}/ca.crt",
            "--tls-cert",
            f"{_TLS_DIR}/tls.crt",
            "--tls-key",
            f"{_TLS_DIR}/tls.key",
        ]
        secret = {"secretName": profiler_secret_name(name), "defaultMode": 0o440}
        volumes.insert(0, {"name": "tls", "secret": secret})
        mounts.insert(0, leaf)
    else:
        args.append("--insecure")
    env = {"AMP4EC_ALLOW_FACTORIES": ",".join(config.allowed_factory_modules), **config.shard_env}
    container: dict[str, Any] = {
        "name": "profiler",
        "image": config.agent_image,
        "command": ["python", "-m", "amp4ec.node_agent"],
        "args": args,
        "ports": [
            {"name": "grpc", "containerPort": config.profiler_port},
            {"name": "health", "containerPort": config.health_port},
        ],
        "resources": {
            "requests": {"cpu": config.profiler_cpu_request, "memory": config.profiler_memory_request},
            "limits": {"cpu": config.profiler_cpu, "memory": config.profiler_memory},
        },
        "readinessProbe": {
            "grpc": {"port": config.health_port, "service": "amp4ec.wire.v1.Monitor"},
            "periodSeconds": 1,
        },
        "volumeMounts": mounts,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items()) if v],
    }
    fields = scheduling(spec, config, "")
    fields.pop("nodeSelector")
    # Any node the chart allows shards on, not only the resource's own nodeSelector: planning,
    # which says "no node matches", needs the profile first (the resource's tolerations apply).
    selector = dict(config.shard_node_selector)
    pod_spec: dict[str, Any] = {
        **fields,
        **({"nodeSelector": selector} if selector else {}),
        "restartPolicy": "Never",
        "activeDeadlineSeconds": config.profiler_deadline_s,
        "terminationGracePeriodSeconds": 5,
        "containers": [container],
        "volumes": volumes,
    }
    if storage.init_containers:
        pod_spec["initContainers"] = storage.init_containers
    harden(pod_spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": profiler_pod_name(name, key_digest),
            "namespace": namespace,
            "labels": _labels(name, key_digest),
            "annotations": {"amp4ec.io/model": spec.model.display[:1000]},
        },
        "spec": pod_spec,
    }


def profiler_network_policy(
    name: str, namespace: str, spec: DeploymentSpec, config: OperatorConfig
) -> dict[str, Any]:
    """Ingress to a deployment's profiler Pods only from the operator; egress only DNS and, with
    an ``https://`` or ``s3://`` storageUri, the initializer's download (never link-local), and
    the node's model cache when the initializer asks it."""
    operator: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {_NAMESPACE_NAME: config.operator_namespace}},
        "podSelector": {"matchLabels": dict(config.operator_pod_labels)},
    }
    egress: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    ]
    url = spec.model.remote_url  # an https URI, or an s3 store's endpoint
    if url is not None:
        blocks = [{"ipBlock": {"cidr": cidr, "except": out}} for cidr, out in _LINK_LOCAL.items()]
        egress.append({"to": blocks, "ports": [{"protocol": "TCP", "port": urlsplit(url).port or 443}]})
    egress += model_cache_egress(spec, config)
    selector = {"matchLabels": {_LABEL_DEPLOYMENT: label_value(name), _LABEL_ROLE: "profiler"}}
    labels = {
        "app.kubernetes.io/managed-by": "amp4ec-operator",
        _LABEL_DEPLOYMENT: label_value(name),
        _LABEL_ROLE: "policy",
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        # A dot: no deployment's own policy (``child_base``, a DNS label) can have this name.
        "metadata": {"name": f"{child_base(name)}.profiler", "namespace": namespace, "labels": labels},
        "spec": {
            "podSelector": selector,
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [operator], "ports": [{"protocol": "TCP", "port": config.profiler_port}]}],
            "egress": egress,
        },
    }


@dataclass(frozen=True)
class ProfilerState:
    """What a profiler Pod's status says."""

    kind: Literal["starting", "ready", "failed", "ending"]
    message: str = ""
    reason: str = ""
    """For ``failed``: ``InvalidStorage`` (the spec must change), ``StorageUnavailable`` (retried)
    or ``ProfilerFailed`` (the Pod's own resources: memory, deadline; retried)."""
    address: str = ""
    """For ``ready``: the Pod's IP (bracketed when IPv6)."""

    @property
    def permanent(self) -> bool:
        return self.reason == "InvalidStorage"


def _terminated(statuses: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        (str(cs.get("name", "")), cs["state"]["terminated"])
        for cs in statuses or ()
        if isinstance(cs, dict) and "terminated" in (cs.get("state") or {})
    ]


def profiler_state(pod: dict[str, Any], config: OperatorConfig) -> ProfilerState:
    meta = pod.get("metadata") or {}
    name = meta.get("name", "")
    if meta.get("deletionTimestamp"):
        return ProfilerState("ending", f"profiler Pod {name} is ending")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    storage = initializer_failure(pod)  # a missing Secret or ConfigMap is StorageUnavailable: retried
    if storage is not None:
        reason, cause = storage
        return ProfilerState("failed", f"{cause} (profiler Pod {name}, {INITIALIZER})", reason)
    if phase in ("Failed", "Succeeded"):
        if status.get("reason") == "DeadlineExceeded":
            message = (
                f"profiler Pod {name} exceeded its deadline of {config.profiler_deadline_s} s "
                "(chart value profiler.activeDeadlineSeconds)"
            )
            return ProfilerState("failed", message, "ProfilerFailed")
        for _, term in _terminated(status.get("containerStatuses")):
            why = term.get("reason") or "Error"
            if why == "OOMKilled":
                message = (
                    f"profiler Pod {name} ran out of memory (OOMKilled at its limit of "
                    f"{config.profiler_memory}; chart value profiler.memory)"
                )
            else:
                message = f"profiler Pod {name} exited with code {term.get('exitCode')} ({why})"
            return ProfilerState("failed", message, "ProfilerFailed")
        return ProfilerState("failed", f"profiler Pod {name} ended ({phase})", "ProfilerFailed")
    for c in status.get("conditions") or ():
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            message = str(c.get("message") or c.get("reason") or "not scheduled")
            if "persistentvolumeclaim" in message.lower():
                return ProfilerState("failed", f"{message} (profiler Pod {name})", "StorageUnavailable")
            return ProfilerState("starting", f"profiler Pod {name} not scheduled yet: {message}")
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ()
    )
    ip = str(status.get("podIP") or "")
    if phase == "Running" and ready and ip:
        return ProfilerState("ready", address=f"[{ip}]" if ":" in ip else ip)
    waiting = [
        (cs.get("state") or {}).get("waiting", {}).get("reason")
        for cs in [*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())]
    ]
    detail = next((w for w in waiting if w), phase)
    return ProfilerState("starting", f"profiler Pod {name}: {detail}")
