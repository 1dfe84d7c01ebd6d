"""Pure: which nodes of a plan cannot serve it now, and why (from Nodes, shard Pods and metrics).

The operator asks this on every reconciliation, and a reconciliation runs on every change of a
shard Pod or a Node (``watch.py``), so a fault is seen when Kubernetes reports it, not at the
next re-plan check. A node is *lost* when its Node is gone or not Ready, when one of its shard
Pods failed (evicted) or crash-loops, or when its shards are not ready and its capacity metrics
went stale (a dead node whose Node object still says Ready). A shard that just restarted once is
*restarting*: the deployment is degraded but the node is kept (the kubelet brings it back).
A shard whose storage initializer fails (the store went away or changed after profiling, a
Secret was deleted) is a fault of the store, not of the node: named (``InvalidStorage``,
``StorageUnavailable``) but never lost, since planning around the node would meet the same store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amp4ec.operator.storage import INITIALIZER, initializer_failure

__all__ = [
    "ExclusionBackoff",
    "Fault",
    "LostNodes",
    "node_faults",
    "node_ready",
    "pod_node",
    "pod_ready",
    "shard_state",
]


@dataclass(frozen=True)
class Fault:
    """Why a node cannot serve its stages; ``lost`` means re-plan without it."""

    node: str
    reason: str
    """A condition reason: NodeDeleted, NodeNotReady, ShardFailed, ShardCrashLooping, NodeLost,
    ShardRestarting, InvalidStorage, StorageUnavailable."""
    message: str
    lost: bool


def pod_node(pod: Mapping[str, Any]) -> str:
    """The node a shard Pod is pinned to (``kubernetes.io/hostname``), else where it was bound."""
    spec = pod.get("spec") or {}
    return str((spec.get("nodeSelector") or {}).get("kubernetes.io/hostname") or spec.get("nodeName") or "")


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for c in (pod.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def shard_state(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the Pod's shard is failing, None when it runs or starts normally."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = meta.get("name", "?")
    if status.get("phase") == "Failed":
        why = status.get("reason") or "Failed"
        return "ShardFailed", f"shard Pod {name} {why}: {status.get('message') or 'phase Failed'}"
    storage = initializer_failure(dict(pod))
    if storage is not None:
        reason, cause = storage
        return reason, f"spec.model.storageUri: {cause} (shard Pod {name}, {INITIALIZER})"
    for cs in status.get("containerStatuses") or ():
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            return (
                "ShardCrashLooping",
                f"shard Pod {name} in CrashLoopBackOff ({cs.get('restartCount', 0)} restarts)",
            )
        last = (cs.get("lastState") or {}).get("terminated") or (cs.get("state") or {}).get("terminated")
        if last and not cs.get("ready"):
            code = last.get("exitCode", "?")
            return (
                "ShardRestarting",
                f"shard Pod {name} exited (code {code}), restart {cs.get('restartCount', 0)}",
            )
    return None


def node_ready(node: Mapping[str, Any]) -> bool:
    for c in (node.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return True  # no conditions reported (yet): do not exclude


def node_faults(
    plan_nodes: Iterable[str],
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    stale: Mapping[str, str] | None = None,
) -> dict[str, Fault]:
    """The faults of ``plan_nodes``: ``nodes`` are the cluster's Node objects (any selector),
    ``pods`` the plan's shard Pods, ``stale`` node → why its capacity metrics are missing."""
    by_name = {str((n.get("metadata") or {}).get("name")): n for n in nodes}
    by_node: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        by_node.setdefault(pod_node(pod), []).append(pod)
    faults: dict[str, Fault] = {}
    for node in dict.fromkeys(plan_nodes):
        obj = by_name.get(node)
        if obj is None:
            faults[node] = Fault(node, "NodeDeleted", f"node {node} was deleted", lost=True)
            continue
        if not node_ready(obj):
            faults[node] = Fault(node, "NodeNotReady", f"node {node} is not Ready", lost=True)
            continue
        states = [s for s in (shard_state(p) for p in by_node.get(node, ())) if s is not None]
        hard = [s for s in states if s[0] in ("ShardFailed", "ShardCrashLooping")]
        if hard:
            faults[node] = Fault(node, hard[0][0], f"node {node}: {hard[0][1]}", lost=True)
            continue
        down = [p for p in by_node.get(node, ()) if not pod_ready(p)]
        if stale and node in stale and down:
            message = f"node {node}: {len(down)} shard(s) not ready and {stale[node]}"
            faults[node] = Fault(node, "NodeLost", message, lost=True)
        elif states:
            faults[node] = Fault(node, states[0][0], f"node {node}: {states[0][1]}", lost=False)
    return faults


@dataclass
class ExclusionBackoff:
    """Nodes left out of planning while their shards keep failing: 30 s the first time, doubling
    up to 10 min each time the node is found failing again; forgiven after it stays out of
    trouble for twice its last exclusion."""

    initial_s: float = 30.0
    max_s: float = 600.0

    def __post_init__(self) -> None:
        self._until: dict[str, float] = {}
        self._length: dict[str, float] = {}

    def fail(self, node: str, now: float) -> float:
        """Exclude ``node`` (again); returns until when."""
        if node in self._until and now < self._until[node]:
            return self._until[node]  # the same fault seen again: no new round
        last = self._length.get(node, 0.0)
        if last and now > self._until.get(node, 0.0) + 2 * last:
            last = 0.0  # behaved long enough: start over
        length = min(self.max_s, 2 * last if last else self.initial_s)
        self._length[node] = length
        self._until[node] = now + length
        return self._until[node]

    def excluded(self, now: float) -> set[str]:
        return {n for n, until in self._until.items() if now < until}


class LostNodes:
    """Per deployment, the nodes found lost by their stale metrics (``NodeLost``), named until
    its plans no longer use them or they are back. Only a re-plan check queries Prometheus;
    the reconciliations in between would see just a restarting shard there and name that."""

    def __init__(self) -> None:
        self._lost: dict[str, dict[str, Fault]] = {}

    def remember(self, deployment: str, faults: Iterable[Fault]) -> None:
        found = {f.node: f for f in faults if f.reason == "NodeLost"}
        if found:
            self._lost.setdefault(deployment, {}).update(found)

    def recall(
        self, deployment: str, faults: dict[str, Fault], in_use: Iterable[str], down: Iterable[str]
    ) -> None:
        """Put the remembered faults of nodes still ``in_use`` and ``down`` into ``faults`` (a
        lost fault seen now wins); forget the others."""
        remembered = self._lost.get(deployment, {})
        keep = set(in_use) & set(down)
        for node in list(remembered):
            if node not in keep:
                del remembered[node]
            elif not (node in faults and faults[node].lost):
                faults[node] = remembered[node]
        if not remembered:
            self._lost.pop(deployment, None)

    def forget(self, deployment: str) -> None:
        self._lost.pop(deployment, None)
