"""Pure: how a Pod gets the model file of a ``storageUri`` (shard Pods and profiler Pods alike).

A Pod with a storage URI gets the storage initializer as an init container (``fetch.py``, the
operator image, KServe's pattern): it fetches the file into an ``emptyDir`` at ``MODEL_DIR``,
named by its digest, and checks the SHA-256 before the agent starts; the agent mounts that
directory read-only. A ``pvc://claim/path`` mounts the claim read-only at ``PVC_MOUNT`` in the
initializer only (the agent never sees the claim). An ``s3://`` URI's credentials reach the
initializer only, as environment from ``secretKeyRef`` on the Secret ``spec.model.s3.secretName``
names, and a private store's CA as environment from ``configMapKeyRef``: the operator never
reads either (no RBAC on Secrets' contents is needed for it), and a missing Secret, key or
ConfigMap shows in the Pod's status as ``CreateContainerConfigError`` with the kubelet's message
(``initializer_blocked``), where a missing volume would show only in Events.

[Note: the node's cache, then the Pod's] With the chart's model cache on
(``config.model_cache_address``) and mutual TLS, the initializer first asks its node's monitor
(``node_cache.py``; the monitor keeps the only hostPath, ``node_agent/model_cache.py``) with the
Pod's own leaf, mounted into the initializer too; the monitor keys entries by that leaf's
namespace. The file still lands in the Pod's ``emptyDir`` and is verified there, so the agent
never sees a hostPath and a shard restarted in place does not fetch again; without a cache (or
when the monitor cannot serve) every Pod fetches its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.fetch import EXIT_PERMANENT, EXIT_TRANSIENT, STORE_CA_ENV
from amp4ec.operator.s3 import SECRET_KEYS, SESSION_TOKEN_ENV
from amp4ec.operator.spec import DeploymentSpec

__all__ = [
    "EXIT_PERMANENT",
    "EXIT_TRANSIENT",
    "INITIALIZER",
    "MODEL_DIR",
    "PVC_MOUNT",
    "PodStorage",
    "cache_port",
    "initializer_blocked",
    "initializer_failure",
    "pod_storage",
]

MODEL_DIR = "/mnt/models"
PVC_MOUNT = "/mnt/pvc"
INITIALIZER = "storage-initializer"
_TLS_FILES = (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key"))


@dataclass(frozen=True)
class PodStorage:
    """What a Pod adds for its model file: volumes, the init container, the agent's mount and flags."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    init_containers: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    """The agent container's mounts (the fetched file's directory, read-only)."""
    model: str = ""
    """The agent's ``--model``: the archive's path in the Pod, or the spec's name."""
    weights: str | None = None
    """The agent's ``--weights``: the state_dict's path in the Pod (None: seeded, or an archive)."""


def _file(spec: DeploymentSpec) -> str:
    m = spec.model
    return f"{MODEL_DIR}/{m.sha256 or 'model'}.pt2" if m.archive else f"{MODEL_DIR}/weights.pt"


def cache_port(spec: DeploymentSpec, config: OperatorConfig) -> int | None:
    """The monitors' cache port when ``spec``'s Pods ask their node's model cache (a file from
    storage named by its digest, the chart's cache on, mutual TLS), else None."""
    address = config.model_cache_address
    if not (address and config.tls and spec.model.storage_uri and spec.model.sha256):
        return None
    return int(address.rpartition(":")[2])


def _cache_args(spec: DeploymentSpec, config: OperatorConfig, tls: dict[str, Any] | None) -> list[str]:
    """The initializer's way to its node's model cache: the chart's node-local address, and the
    Pod's own leaf (the monitor keys entries by its namespace)."""
    if cache_port(spec, config) is None or tls is None:
        return []
    leaf = tls["mountPath"]
    return ["--cache", config.model_cache_address] + [
        arg for part, file in _TLS_FILES for arg in (f"--tls-{part}", f"{leaf}/{file}")
    ]


def pod_storage(
    spec: DeploymentSpec, config: OperatorConfig, tls: dict[str, Any] | None = None
) -> PodStorage:
    """The storage parts of a Pod for ``spec`` (nothing but ``--model NAME`` without a storageUri).
    ``tls``: the volume mount of the Pod's own leaf, which its initializer presents to the node's
    model cache (``node_cache.py``); None: no cache."""
    uri = spec.model.storage_uri
    if not uri:
        return PodStorage(model=spec.model.name or "")
    path = _file(spec)
    volumes: list[dict[str, Any]] = [{"name": "model-store", "emptyDir": {}}]
    args = ["--uri", uri, "--out", path, "--pvc-mount", PVC_MOUNT]
    if spec.model.sha256:
        args += ["--sha256", spec.model.sha256]
    for cidr in config.storage_allowed_networks:  # the chart's exemptions (tests)
        args += ["--allow-network", cidr]
    cache = _cache_args(spec, config, tls)
    args += cache
    env: list[dict[str, Any]] = []
    if uri.startswith("s3://"):
        s3 = spec.model.s3_options
        args += ["--s3-region", s3.region, "--s3-addressing", s3.addressing]
        if s3.endpoint:
            args += ["--s3-endpoint", s3.endpoint]
        if s3.secret:
            args += ["--s3-secret", s3.secret]
            for var, key in SECRET_KEYS.items():
                ref = {
                    "name": s3.secret,
                    "key": key,
                    **({"optional": True} if var == SESSION_TOKEN_ENV else {}),
                }
                env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    ca = spec.model.ca_bundle
    if ca is not None:
        ref = {"name": ca.config_map_name, "key": ca.key}
        env.append({"name": STORE_CA_ENV, "valueFrom": {"configMapKeyRef": ref}})
    init_mounts = [{"name": "model-store", "mountPath": MODEL_DIR}]
    if cache and tls is not None:
        init_mounts.append(dict(tls))
    pvc = spec.model.pvc
    if pvc is not None:
        volumes.append(
            {"name": "model-pvc", "persistentVolumeClaim": {"claimName": pvc[0], "readOnly": True}}
        )
        init_mounts.append({"name": "model-pvc", "mountPath": PVC_MOUNT, "readOnly": True})
    init = {
        "name": INITIALIZER,
        "image": config.initializer_image,
        "command": ["python", "-m", "amp4ec.operator.fetch"],
        "args": args,
        "volumeMounts": init_mounts,
        **({"env": env} if env else {}),
        # Its last lines (the cause) become the status message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    mounts = [{"name": "model-store", "mountPath": MODEL_DIR, "readOnly": True}]
    if spec.model.archive:
        return PodStorage(volumes, [init], mounts, model=path)
    return PodStorage(volumes, [init], mounts, model=spec.model.name or "", weights=path)


def initializer_blocked(pod: dict[str, Any]) -> str | None:
    """The kubelet's message, and the field at fault, when the storage initializer cannot be
    created because a Secret, a key of it or a ConfigMap it names is missing
    (``CreateContainerConfigError``), else None."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or ():
        waiting = ((cs or {}).get("state") or {}).get("waiting") or {}
        if cs.get("name") == INITIALIZER and waiting.get("reason") == "CreateContainerConfigError":
            message = str(waiting.get("message") or "CreateContainerConfigError")
            field = "spec.model.caBundle" if "configmap" in message.lower() else "spec.model.s3.secretName"
            return f"{message} ({field})"
    return None


def _cause(term: dict[str, Any]) -> str:
    """The cause a terminated initializer gave: its last line (FallbackToLogsOnError), or its exit."""
    code = term.get("exitCode", 1)
    if term.get("reason") == "OOMKilled":
        return "out of memory (OOMKilled)"
    lines = [ln.strip() for ln in str(term.get("message") or "").splitlines() if ln.strip()]
    return lines[-1].removeprefix("storage initializer: ") if lines else f"exited with code {code}"


def initializer_failure(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, cause) when the Pod's storage initializer failed or cannot start: ``InvalidStorage``
    for its permanent exit code (only the spec can fix it), else ``StorageUnavailable`` (a store
    that is down, a missing Secret or ConfigMap). Reads the current state, then the last one (a
    restarting Pod's initializer waits in back-off with the failure in ``lastState``)."""
    blocked = initializer_blocked(pod)
    if blocked is not None:
        return "StorageUnavailable", blocked
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or ():
        if not isinstance(cs, dict) or cs.get("name") != INITIALIZER:
            continue
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        if "running" in state or ("terminated" in state and state["terminated"].get("exitCode") == 0):
            return None  # fetching again, or done
        term = state.get("terminated") or last.get("terminated")
        if term and int(term.get("exitCode", 0)) != 0:
            code = int(term.get("exitCode", 1))
            reason = "InvalidStorage" if code == EXIT_PERMANENT else "StorageUnavailable"
            return reason, _cause(term)
    return None
