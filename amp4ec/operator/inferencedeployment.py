"""Handlers of the InferenceDeployment kind: thin adapters from kopf to ``reconcile``.

create / update (spec) / resume run a reconciliation and retry it (TemporaryError) until
the plan serves; so does a reconcile request (``watch.py``: a shard Pod or a Node changed);
a timer re-plans at each deployment's interval with the planner's
hysteresis and refreshes ``status.measured`` (throughput, latency) from Prometheus;
delete only forgets metrics (owner references let Kubernetes collect the children).
Each change of a condition is also posted as an Event (``events.py``).
``Outcome`` maps to kopf's errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from amp4ec.operator import metrics
from amp4ec.operator.config import GROUP, PLURAL, VERSION
from amp4ec.operator.events import record_changes
from amp4ec.operator.k8s import KubeError
from amp4ec.operator.reconcile import Deps, Outcome, Target, measure, reconcile
from amp4ec.operator.watch import REQUEST_ANNOTATION

__all__ = ["deleted", "reconcile_deployment", "replan", "requested"]

log = logging.getLogger(__name__)

TIMER_INTERVAL_S = 5.0
"""How often the re-plan timer wakes; each deployment re-plans at its own spec.replan interval."""


_PROGRESS = {"ShardsStarting", "ShardsNotReady", "Serving"}
"""Outcomes that wait on progress (Pods starting, old shards draining): polled at their pace."""


def retry_delay(outcome: Outcome, retry: int, cap_s: float) -> float:
    """When to try again: progress is polled at its own pace; anything blocked (no nodes, no
    capacity, an infeasible plan, a refused object) backs off exponentially from its own delay,
    capped at ``cap_s`` (``OperatorConfig.retry_cap_s``), so a hundred stuck resources do not
    keep the API server busy."""
    base = outcome.retry_s or 0.0
    if outcome.reason in _PROGRESS:
        return base
    return min(cap_s, base * 2 ** min(retry, 16))


def _target(body: kopf.Body | Mapping[str, Any]) -> Target:
    meta = body["metadata"]
    spec, status = body.get("spec"), body.get("status")
    return Target(
        name=meta.get("name") or "",
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid") or "",
        generation=int(meta.get("generation") or 1),
        spec=dict(spec) if isinstance(spec, Mapping) else spec,  # anything else: parse_spec says so
        status=dict(status) if isinstance(status, Mapping) else {},
    )


async def _run(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, trigger: str) -> Outcome | None:
    deps: Deps = memo.deps
    t = _target(body)
    lock = memo.locks.setdefault(t.uid, asyncio.Lock())
    async with lock:
        # The status as last written, not as this event carried it: the timer, the handlers and
        # reconcile requests interleave, and a stale status (a rollout not seen) must not decide.
        # So status is read and written here, under the lock, not through kopf's patch.
        try:
            fresh = await deps.kube.get("InferenceDeployment", t.namespace, t.name)
        except KubeError as exc:
            log.warning("%s/%s: not re-read (%s); using the event's body", t.namespace, t.name, exc)
            fresh = None
        if fresh is not None and (fresh.get("metadata") or {}).get("uid") == t.uid:
            t = _target(fresh)
        outcome = await reconcile(deps, t, trigger=trigger, adopt=lambda obj: kopf.adopt(obj, owner=body))
        if outcome is not None:
            try:
                await deps.kube.patch_status("InferenceDeployment", t.namespace, t.name, outcome.status)
            except KubeError as exc:  # kopf's patch writes it after the handler instead
                log.warning("%s/%s: status not written under the lock: %s", t.namespace, t.name, exc)
                for key, value in outcome.status.items():
                    patch.status[key] = value
            conditions = outcome.status.get("conditions") or []
            await record_changes(
                deps.kube, t.namespace, t.name, t.uid, t.status.get("conditions"), conditions
            )
    return outcome


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_deployment(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    reason: str,
    retry: int,
    logger: logging.Logger,
    **_: Any,
) -> None:
    outcome = await _run(body, patch, memo, trigger=str(reason))
    if outcome is None:
        return
    if outcome.permanent is not None:
        raise kopf.PermanentError(f"{outcome.reason}: {outcome.permanent}")
    if outcome.retry_s is not None:
        raise kopf.TemporaryError(
            outcome.reason, delay=retry_delay(outcome, retry, memo.deps.config.retry_cap_s)
        )


@kopf.on.update(GROUP, VERSION, PLURAL, field=("metadata", "annotations", REQUEST_ANNOTATION), id="requested")
async def requested(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
    """A shard Pod or a Node changed (``watch.py``): reconcile now, retried until settled."""
    outcome = await _run(body, patch, memo, trigger="event")
    if outcome is not None and outcome.retry_s is not None and outcome.permanent is None:
        raise kopf.TemporaryError(
            outcome.reason, delay=retry_delay(outcome, retry, memo.deps.config.retry_cap_s)
        )


@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL_S, initial_delay=TIMER_INTERVAL_S)
async def replan(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    # A pending rollout or a not-yet-ready plan is continued at the next tick; no retries here.
    await _run(body, patch, memo, trigger="timer")
    # Measured throughput and latency: read-only (Prometheus), so outside the lock.
    measured = await measure(memo.deps, _target(body))
    if measured is not None:
        patch.status["measured"] = measured


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.metadata
    metrics.forget(meta.namespace or "default", meta.name or "")
    memo.deps.last_check.pop(meta.uid, None)
    memo.deps.last_measure.pop(meta.uid, None)
    memo.deps.issued.pop(meta.uid, None)
    memo.deps.lost.forget(meta.uid)
    memo.deps.assumed.pop(meta.uid, None)
    memo.locks.pop(meta.uid, None)
