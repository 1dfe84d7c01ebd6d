"""Pure: what makes a shard Pod safe to run on a shared edge node, and where it may be scheduled.

``harden(pod_spec)`` gives every container the chart's own restricted settings (the Pod
Security Standard "restricted": non-root, read-only root filesystem, no privilege escalation,
every capability dropped, seccomp RuntimeDefault), a writable ``emptyDir`` at ``/tmp`` (the
only place the agent writes: ``HOME``, caches), and no service-account token (a shard never
calls the Kubernetes API). ``scheduling(spec, config, node)`` passes tolerations, image pull
secrets and priority class through from the chart's defaults and the resource; ``node_selector``
(the chart's and the resource's) is what planning selects nodes by.
"""

from __future__ import annotations

from typing import Any

from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.spec import DeploymentSpec

__all__ = ["SHARD_GID", "SHARD_UID", "TMP", "container_security_context", "harden", "scheduling"]

SHARD_UID = 65532
"""The images' user (``USER 65532:65532`` in docker/*.Dockerfile)."""
SHARD_GID = 65532
TMP = "/tmp"
_TMP_VOLUME = {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}
_WRITABLE_ENV = {"HOME": TMP, "XDG_CACHE_HOME": f"{TMP}/.cache", "TORCH_HOME": f"{TMP}/torch"}


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": SHARD_UID,
        "runAsGroup": SHARD_GID,
        "fsGroup": SHARD_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _with_tmp(container: dict[str, Any]) -> None:
    mounts = container.setdefault("volumeMounts", [])
    if not any(m["mountPath"] == TMP for m in mounts):
        mounts.append({"name": _TMP_VOLUME["name"], "mountPath": TMP})
    env = container.setdefault("env", [])
    have = {e["name"] for e in env}
    env.extend({"name": k, "value": v} for k, v in _WRITABLE_ENV.items() if k not in have)


def harden(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """``pod_spec`` (changed in place and returned) with the restricted security settings."""
    pod_spec["automountServiceAccountToken"] = False
    pod_spec["enableServiceLinks"] = False  # no env vars naming every Service of the namespace
    pod_spec["securityContext"] = pod_security_context()
    for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        container["securityContext"] = container_security_context()
        _with_tmp(container)
    volumes = pod_spec.setdefault("volumes", [])
    if not any(v["name"] == _TMP_VOLUME["name"] for v in volumes):
        volumes.append(dict(_TMP_VOLUME))
    return pod_spec


def node_selector(spec: DeploymentSpec, config: OperatorConfig) -> dict[str, str]:
    """Labels a shard's node must carry: the chart's defaults, then the resource's own."""
    return {**config.shard_node_selector, **spec.node_selector}


def scheduling(spec: DeploymentSpec, config: OperatorConfig, node: str) -> dict[str, Any]:
    """The Pod spec fields that place a shard: pinned to ``node``, tolerating what the chart and
    the resource say, pulling with their secrets, at their priority class. The node selectors
    (``node_selector``) chose the nodes the planner considered; ``node`` is one of them."""
    fields: dict[str, Any] = {"nodeSelector": {"kubernetes.io/hostname": node}}
    tolerations = [dict(t) for t in config.shard_tolerations] + [t.to_k8s() for t in spec.tolerations]
    if tolerations:
        fields["tolerations"] = tolerations
    secrets = list(
        dict.fromkeys([*config.shard_image_pull_secrets, *(s.name for s in spec.image_pull_secrets)])
    )
    if secrets:
        fields["imagePullSecrets"] = [{"name": s} for s in secrets]
    priority = spec.priority_class_name or config.shard_priority_class_name
    if priority:
        fields["priorityClassName"] = priority
    return fields
