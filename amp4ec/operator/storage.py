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

[Note: a per-Pod cache, not a per-node one] Every Pod fetches its own copy: the ``emptyDir``
lives as long as the Pod, so a shard restarted in place does not fetch again, but two shards
(or the profiler and a shard) on one node each fetch once. A cache shared by a node's Pods
would be a ``hostPath``, which the Pod Security Standard "restricted" forbids, which the kubelet
creates root-owned (the initializer runs as UID 65532) and which, shared across namespaces,
would let one namespace's Pods read another's models. Models of a few hundred MB on an edge
link make this a real cost; a node-local cache belongs to a node-level component (see
docs/operator.md, "Not done yet").
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
    "initializer_blocked",
    "initializer_failure",
    "pod_storage",
]

MODEL_DIR = "/mnt/models"
PVC_MOUNT = "/mnt/pvc"
INITIALIZER = "storage-initializer"


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


def pod_storage(spec: DeploymentSpec, config: OperatorConfig) -> PodStorage:
    """The storage parts of a Pod for ``spec`` (nothing but ``--model NAME`` without a storageUri)."""
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
