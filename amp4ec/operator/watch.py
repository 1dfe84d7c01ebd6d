"""Shard Pod and Node events → a reconciliation of the deployments they concern, at once.

kopf watches the operator's shard Pods and every Node. When a shard's health changes (ready,
phase, a crash, CrashLoopBackOff, deleted) or a Node turns NotReady, comes back or goes, the
owning deployments get a reconcile request (``nudge.py``: the annotation
``reconcile.amp4ec.io/requested``, which fires their update handler through kopf's queue).

The re-plan timer stays as a safety net (capacity drift, a missed event).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from amp4ec.operator import nudge
from amp4ec.operator.faults import node_ready, pod_ready, shard_state
from amp4ec.operator.k8s import KubeError
from amp4ec.operator.nudge import REQUEST_ANNOTATION
from amp4ec.operator.reconcile import Deps

__all__ = ["REQUEST_ANNOTATION", "node_changed", "shard_changed"]

MANAGED = {"app.kubernetes.io/managed-by": "amp4ec-operator"}
log = logging.getLogger(__name__)


async def request(deps: Deps, namespace: str, name: str, why: str) -> None:
    await nudge.request(deps.kube, namespace, name, why)


def _owner(meta: Mapping[str, Any]) -> str | None:
    for ref in meta.get("ownerReferences") or ():
        if ref.get("kind") == "InferenceDeployment":
            return str(ref.get("name"))
    return None


def _health(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    state = shard_state(pod)
    restarts = sum(
        int(cs.get("restartCount", 0)) for cs in (pod.get("status") or {}).get("containerStatuses") or ()
    )
    deleting = bool((pod.get("metadata") or {}).get("deletionTimestamp"))
    return (pod_ready(pod), (pod.get("status") or {}).get("phase"), state and state[0], restarts, deleting)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def shard_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.metadata
    owner = _owner(meta)
    if owner is None or not hasattr(memo, "deps"):
        return
    key = (meta.namespace or "", meta.name or "")
    seen: dict[tuple[str, str], tuple[Any, ...]] = memo.shard_health
    if event.get("type") == "DELETED":
        seen.pop(key, None)
        await request(memo.deps, key[0], owner, f"Pod {key[1]} deleted")
        return
    health = _health(body)
    before = seen.get(key)
    seen[key] = health
    if event.get("type") is None or before == health:
        return  # the initial listing (resume reconciles), or nothing that matters changed
    ready, phase, trouble, restarts, _ = health
    await request(memo.deps, key[0], owner, f"Pod {key[1]} ready={ready} {phase} {trouble or ''} {restarts}")


def _uses(obj: Mapping[str, Any], node: str) -> bool:
    status = obj.get("status") or {}
    stages = [
        *((status.get("plan") or {}).get("stages") or ()),
        *((status.get("rollout") or {}).get("stages") or ()),
    ]
    return any(s.get("node") == node for s in stages)


@kopf.on.event("", "v1", "nodes")
async def node_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if not hasattr(memo, "deps"):
        return
    name = body.metadata.name or ""
    seen: dict[str, bool] = memo.node_ready
    ok = event.get("type") != "DELETED" and node_ready(body)
    before = seen.get(name)
    if event.get("type") == "DELETED":
        seen.pop(name, None)
    else:
        seen[name] = ok
    if event.get("type") is None or before == ok or (before is None and ok):
        return
    deps: Deps = memo.deps
    try:
        deployments = await deps.kube.list("InferenceDeployment", None)
    except KubeError as exc:
        log.warning("node %s changed, deployments not listed: %s", name, exc)
        return
    why = f"Node {name} {'Ready' if ok else 'deleted' if event.get('type') == 'DELETED' else 'NotReady'}"
    for obj in deployments:
        ready = next(
            (c for c in (obj.get("status") or {}).get("conditions") or () if c.get("type") == "Ready"), {}
        )
        # A lost node concerns those placed on it; a node back may unblock those not serving.
        if _uses(obj, name) or (ok and ready.get("status") != "True"):
            meta = obj["metadata"]
            await request(deps, meta["namespace"], meta["name"], why)
