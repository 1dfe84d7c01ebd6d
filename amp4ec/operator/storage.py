"""Pure: how a Pod gets the model file of a ``storageUri`` (shard Pods and profiler Pods alike).

A Pod with a storage URI gets the storage initializer as an init container (``fetch.py``, the
operator image, KServe's pattern): it fetches the file into an ``emptyDir`` at ``MODEL_DIR``,
named by its digest, and checks the SHA-256 before the agent starts; the agent mounts that
directory read-only. A ``pvc://claim/path`` mounts the claim read-only at ``PVC_MOUNT`` in the
initializer only (the agent never sees the claim).

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
from amp4ec.operator.fetch import EXIT_PERMANENT, EXIT_TRANSIENT
from amp4ec.operator.spec import DeploymentSpec

__all__ = [
    "EXIT_PERMANENT",
    "EXIT_TRANSIENT",
    "INITIALIZER",
    "MODEL_DIR",
    "PVC_MOUNT",
    "PodStorage",
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
        # Its last lines (the cause) become the status message the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    mounts = [{"name": "model-store", "mountPath": MODEL_DIR, "readOnly": True}]
    if spec.model.archive:
        return PodStorage(volumes, [init], mounts, model=path)
    return PodStorage(volumes, [init], mounts, model=spec.model.name or "", weights=path)
