"""Kubernetes Events on an InferenceDeployment: the history ``kubectl describe`` shows.

Conditions say how a deployment is now; an Event records each time one of them changed (a node
lost, a re-plan, serving again), so a fault that lasted one rollout stays on record after the
conditions moved on. One Event per change of a condition's status or reason, not per
reconciliation: a message that only updates a count (restarts) posts nothing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from amp4ec.operator.config import GROUP, VERSION
from amp4ec.operator.k8s import Kube, KubeError
from amp4ec.operator.status import get_condition, now_iso

__all__ = ["COMPONENT", "Change", "changes", "event_object", "record_changes"]

log = logging.getLogger(__name__)

COMPONENT = "amp4ec-operator"
_PROGRESS = {"ShardsStarting", "Pending", "Profiling"}
"""False for now but on its way: a Normal event, not a Warning."""
_MESSAGE_MAX = 1024


@dataclass(frozen=True)
class Change:
    type: str
    """``Warning`` (something went wrong) or ``Normal``."""
    reason: str
    message: str


def changes(old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]]) -> list[Change]:
    """The conditions of ``new`` whose status or reason differs from ``old``'s, as Events."""
    out = []
    for c in new:
        before = get_condition(old, c["type"])
        if before is not None and (before.get("status"), before.get("reason")) == (c["status"], c["reason"]):
            continue
        if before is None and c["status"] != "True" and c["type"] == "Degraded":
            continue  # the first status says "not degraded": nothing happened
        bad = c["status"] == "True" if c["type"] == "Degraded" else c["status"] == "False"
        kind = "Warning" if bad and c["reason"] not in _PROGRESS else "Normal"
        out.append(Change(kind, c["reason"], f"{c['type']}={c['status']}: {c.get('message') or c['reason']}"))
    return out


def event_object(namespace: str, name: str, uid: str, change: Change) -> dict[str, Any]:
    """A core/v1 Event about the InferenceDeployment ``namespace/name``."""
    stamp = now_iso()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name[:200]}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InferenceDeployment",
            "name": name,
            "namespace": namespace,
            "uid": uid,
        },
        "type": change.type,
        "reason": change.reason,
        "message": change.message[:_MESSAGE_MAX],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


async def record_changes(
    kube: Kube,
    namespace: str,
    name: str,
    uid: str,
    old: Iterable[Mapping[str, Any]] | None,
    new: Iterable[Mapping[str, Any]],
) -> None:
    """Post an Event per changed condition; a refused post is logged, never fatal (history only)."""
    for change in changes(old, new):
        try:
            await kube.create(event_object(namespace, name, uid, change))
        except KubeError as exc:
            log.warning("%s/%s: event %s not recorded: %s", namespace, name, change.reason, exc)
