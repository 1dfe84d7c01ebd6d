"""Status of an InferenceDeployment: phase, conditions (KServe style) and the printer-column fields.

Pure functions over plain dicts; the handlers write the result with ``patch.status[...]``.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

__all__ = [
    "CONDITION_TYPES",
    "Phase",
    "condition",
    "get_condition",
    "merge_conditions",
    "now_iso",
    "with_ready",
]

CONDITION_TYPES = ("Planned", "ShardsReady", "Ready", "Degraded")
"""Planned: a plan exists for the current spec. ShardsReady: every shard Pod of the active plan
is ready. Ready: Planned and ShardsReady (the aggregate clients should wait on). Degraded: serving,
but something is off (capacity unknown or stale, a shard restarting); the plan is kept."""


class Phase(str, Enum):
    """The lifecycle a deployment moves through (``status.phase``, a CRD enum)."""

    PENDING = "Pending"
    PLANNING = "Planning"
    DEPLOYING = "Deploying"
    SERVING = "Serving"
    REPLANNING = "Replanning"
    FAILED = "Failed"


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    """One condition; ``status`` None means Unknown."""
    if kind not in CONDITION_TYPES:
        raise ValueError(f"condition type: expected one of {CONDITION_TYPES}, got {kind!r}")
    return {
        "type": kind,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message,
    }


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == kind:
            return c
    return None


def merge_conditions(
    old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]], now: str | None = None
) -> list[dict[str, Any]]:
    """Replace conditions by type, keeping ``lastTransitionTime`` where the status did not change.

    The result is ordered as ``CONDITION_TYPES`` so repeated writes are byte-identical.
    """
    now = now or now_iso()
    merged = {c["type"]: dict(c) for c in old or () if c.get("type") in CONDITION_TYPES}
    for c in new:
        previous = merged.get(c["type"])
        same = previous is not None and previous.get("status") == c["status"]
        merged[c["type"]] = {
            **c,
            "lastTransitionTime": previous.get("lastTransitionTime", now) if same and previous else now,
        }
    return [merged[t] for t in CONDITION_TYPES if t in merged]


def with_ready(
    conditions: list[dict[str, Any]], now: str | None = None, serving: int | None = None
) -> list[dict[str, Any]]:
    """Recompute the aggregate Ready from Planned and ShardsReady (KServe's rule); with
    ``serving`` (pipelines whose every shard is ready), Ready is True while one of them serves,
    even when another pipeline's shards are not ready: requests are answered."""
    planned = get_condition(conditions, "Planned")
    shards = get_condition(conditions, "ShardsReady")
    if planned and planned["status"] == "True" and shards and shards["status"] == "True":
        ready = condition("Ready", True, "Serving", "every stage of the active plan is ready")
    elif planned and planned["status"] == "True" and serving:
        message = f"{serving} pipeline(s) of the active plan serve; {shards['message'] if shards else ''}"
        ready = condition("Ready", True, "PartiallyServing", message)
    else:
        blocker = next(
            (c for c in (planned, shards) if c is not None and c["status"] != "True"),
            None,
        )
        if blocker is None:
            ready = condition("Ready", None, "Pending", "not planned yet")
        else:
            ready = condition("Ready", False, blocker["reason"], blocker["message"])
    return merge_conditions(conditions, [ready], now)
