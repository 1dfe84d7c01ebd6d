"""One reconciliation of an InferenceDeployment: spec → profile → capacity → plan → objects → status.

Kopf-free on purpose: the handlers call ``reconcile`` and map its ``Outcome`` to
``kopf.TemporaryError``/``PermanentError`` in one place. Everything it decides is stored in
``status`` (the active plan, and a plan being rolled out), so an operator restarted at any
point continues where the last one stopped; objects are named by plan id, so doing a step
twice creates nothing twice.

Reading order: Deps, Outcome → reconcile (decide) → _propose (plan) → _roll_out and
_settle (make-before-break, then keep the active plan's objects present).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from amp4ec import pki
from amp4ec.errors import InvalidSpec, PlanInfeasible
from amp4ec.operator import certmanager, certs, metrics, nudge, profilestatus
from amp4ec.operator.capacity import CapacityUnavailable, Prometheus
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.decide import Blocked, Keep, Rollout, choose
from amp4ec.operator.desired import (
    LABEL_DEPLOYMENT,
    LABEL_PIPELINE,
    LABEL_PLAN,
    LABEL_ROLE,
    LABEL_STAGE,
    deployment_policy,
    desired_objects,
    entry_service,
)
from amp4ec.operator.faults import (
    ExclusionBackoff,
    Fault,
    LostNodes,
    node_faults,
    node_ready,
    pod_node,
    pod_ready,
)
from amp4ec.operator.k8s import Conflict, Kube, KubeError, KubeUnavailable, matches
from amp4ec.operator.measured import measured_queries, measured_status, scalar
from amp4ec.operator.names import label_value, owned_by, owner_names
from amp4ec.operator.placement import (
    Held,
    Pending,
    Resources,
    Tenant,
    budgets,
    holdings,
    narrow,
    node_allocatable,
    pressure,
    shortage,
    tenants_of,
    unschedulable,
)
from amp4ec.operator.planstatus import PlanRecord, plan_record
from amp4ec.operator.podsecurity import node_selector
from amp4ec.operator.profiles import ProfileKey, Profiler, ProfilerFailed, ProfilerUnavailable, Profiling
from amp4ec.operator.spec import DeploymentSpec, parse_spec
from amp4ec.operator.status import Phase, condition, merge_conditions, now_iso, with_ready
from amp4ec.operator.storage import INITIALIZER, initializer_failure
from amp4ec.operator.storage_hosts import HostRefused, HostUnresolved, resolve_checked_async
from amp4ec.plan_timer import timed_plan
from amp4ec.planner.shares import scaled
from amp4ec.planner.types import NodeCapacity, Pin

__all__ = ["Deps", "Outcome", "Target", "measure", "reconcile"]

log = logging.getLogger(__name__)


@dataclass
class Deps:
    """What a reconciliation talks to; built once in the startup hook and kept in memo."""

    kube: Kube
    prometheus: Prometheus
    profiler: Profiler
    config: OperatorConfig
    last_check: dict[str, float] = field(default_factory=dict)
    """Deployment uid → monotonic time of its last capacity check (re-plan interval)."""
    last_measure: dict[str, float] = field(default_factory=dict)
    """Deployment uid → monotonic time of its last ``status.measured`` query."""
    ca: pki.CertificateAuthority | None = None
    """The cluster CA (``config.tls``): shard and client leaves are issued from it."""
    issued: dict[str, certs.Issued] = field(default_factory=dict)
    """Deployment uid → what its Secrets hold (certs.py, [Note: write-only Secrets])."""
    excluded: ExclusionBackoff = field(default_factory=ExclusionBackoff)
    """Nodes whose shards keep failing, left out of planning for a while (back-off)."""
    lost: LostNodes = field(default_factory=LostNodes)
    """Nodes found lost by stale metrics, named in Degraded until the plans leave them."""
    placing: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a deployment reads what the nodes hold and plans (one at a time, as the scheduler)."""
    assumed: dict[str, tuple[float, list[tuple[str, Held]]]] = field(default_factory=dict)
    """Deployment uid → (until, [(node, requests)]) of a plan decided but whose Pods are not
    created yet: counted as held by the others' budgets (kube-scheduler's "assumed" Pods)."""


@dataclass(frozen=True)
class Target:
    """The resource being reconciled, as read from its body."""

    name: str
    namespace: str
    uid: str
    generation: int
    spec: Any
    status: Mapping[str, Any]


@dataclass
class Outcome:
    """What to write to status and how the handler should end."""

    status: dict[str, Any]
    retry_s: float | None = None
    """Not done yet: run again after this many seconds (kopf.TemporaryError)."""
    permanent: str | None = None
    """The spec cannot work as written (kopf.PermanentError)."""
    reason: str = ""


class _Stop(Exception):
    """Ends a reconciliation early with an Outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def _finish(
    t: Target, phase: Phase, conds: list[dict[str, Any]], serving: int | None = None, **fields: Any
) -> dict[str, Any]:
    merged = with_ready(merge_conditions(t.status.get("conditions"), conds), serving=serving)
    ready = next(c for c in merged if c["type"] == "Ready")
    failure = ready["reason"] if ready["status"] != "True" else None
    return {"phase": phase.value, "conditions": merged, "failureReason": failure, **fields}


async def reconcile(
    deps: Deps, t: Target, *, trigger: str, adopt: Callable[[dict[str, Any]], None]
) -> Outcome | None:
    """Reconcile once; None means "nothing to do" (a timer tick before the re-plan interval)."""
    try:
        return await _reconcile(deps, t, trigger=trigger, adopt=adopt)
    except _Stop as stop:
        return stop.outcome
    except KubeUnavailable as exc:
        log.warning("%s/%s: Kubernetes API unavailable: %s", t.namespace, t.name, exc)
        metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "KubernetesUnavailable").inc()
        status = _finish(t, Phase(t.status.get("phase") or "Pending"), [])
        return Outcome(status, retry_s=deps.config.ready_poll_s * 5, reason="KubernetesUnavailable")
    except Conflict as exc:  # an object changed under us (another writer): read again soon
        log.info("%s/%s: conflict, retrying: %s", t.namespace, t.name, exc)
        status = _finish(t, Phase(t.status.get("phase") or "Pending"), [])
        return Outcome(status, retry_s=deps.config.ready_poll_s, reason="Conflict")
    except KubeError as exc:  # a 4xx on an object derived from the resource (a name, a label)
        log.warning("%s/%s: Kubernetes API refused a request: %s", t.namespace, t.name, exc)
        metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "KubernetesRefused").inc()
        message = f"the Kubernetes API refused an object this deployment needs: {exc}"
        conds = [condition("ShardsReady", False, "KubernetesRefused", message)]
        status = _finish(t, Phase(t.status.get("phase") or "Pending"), conds)
        return Outcome(status, retry_s=deps.config.infeasible_retry_s, reason="KubernetesRefused")


async def _reconcile(
    deps: Deps, t: Target, *, trigger: str, adopt: Callable[[dict[str, Any]], None]
) -> Outcome | None:
    current = PlanRecord.from_status(t.status.get("plan"))
    rollout = PlanRecord.from_status(t.status.get("rollout"))
    try:
        spec = parse_spec(t.spec, deps.config.spec_policy())
    except InvalidSpec as exc:
        if trigger == "timer":
            return None  # already reported by the handler that saw this generation
        metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "InvalidSpec").inc()
        conds = [condition("Planned", False, "InvalidSpec", str(exc))]
        status = _finish(t, Phase.FAILED, conds, observedGeneration=t.generation)
        return Outcome(status, permanent=str(exc), reason="InvalidSpec")

    key = ProfileKey.of(spec, t.namespace)
    if deps.profiler.cached(spec, t.namespace) is None:  # a restarted operator: plan at once
        stored = profilestatus.decode(t.status.get("profile"), key)
        if stored is not None:
            deps.profiler.remember(spec, t.namespace, stored)
    spec_changed = t.status.get("observedGeneration") != t.generation
    now = time.monotonic()
    due = now - deps.last_check.get(t.uid, -1e18) >= spec.replan.interval_seconds
    # Faults of the nodes in use, from the Node objects and the shard Pods (cheap: two lists).
    in_use = [*(current.nodes if current else ()), *(rollout.nodes if rollout else ())]
    nodes = await deps.kube.list("Node", None)
    pods = await _owned(deps, t, "Pod", {LABEL_DEPLOYMENT: label_value(t.name)}) if in_use else []
    faults = node_faults(in_use, nodes, _of_plans(pods, current, rollout))
    down = {pod_node(p) for p in _of_plans(pods, current) if not pod_ready(p)} | set(faults)
    deps.lost.recall(t.uid, faults, in_use, down)
    trouble = current is not None and (bool(faults) or not _all_ready(pods, current))
    if trigger == "timer" and not spec_changed and rollout is None and not due and not trouble:
        return None  # between re-plan checks, nothing wrong: nothing to do
    if trigger == "timer" and current is None and rollout is None:
        return None  # first deployments belong to the create/resume handlers (they retry)
    # Shard Pods the scheduler could not place for too long: re-plan around their nodes.
    stuck = _stuck(deps, _of_plans(pods, current, rollout))
    # A higher-priority deployment waits for a node where this one holds more than its fair share.
    pressed = (
        await _pressure(deps, t, spec, nodes, current) if current and (due or trigger == "event") else {}
    )

    degraded: dict[str, Any] = condition("Degraded", False, "AsPlanned", "capacity is fresh for every node")
    new_plan = False
    lost_rollout = rollout is not None and any(faults[n].lost for n in rollout.nodes if n in faults)
    superseded = rollout
    if (
        (current is None and rollout is None)
        or spec_changed
        or (due and rollout is None)
        or lost_rollout
        or (rollout is None and any(f.lost for f in faults.values()))
        or (rollout is None and trouble)
        or bool(stuck)
        or (rollout is None and bool(pressed))
    ):
        deps.last_check[t.uid] = now
        decision = await _propose(
            deps,
            t,
            spec,
            current,
            nodes,
            pods,
            faults,
            adopt,
            hysteresis=not spec_changed and not pressed,
            avoid=stuck,
            forced=f"room is asked for on {', '.join(sorted(pressed))}" if pressed else "the spec changed",
        )
        if isinstance(decision, Keep):
            rollout = None
            if decision.degraded is not None:
                degraded = decision.degraded
        else:
            assert isinstance(decision, Rollout)
            await _make_room(deps, t, decision)
            if current is not None and decision.plan.id == current.id and decision.plan != current:
                current, rollout = decision.plan, None  # pipelines through lost nodes dropped in place
                log.info("%s/%s: %s", t.namespace, t.name, decision.reason)
            elif current is None or decision.plan.id != current.id:
                if current is None and rollout is None:
                    await _drop_unrecorded(deps, t, decision.plan)
                rollout, new_plan = decision.plan, True
                log.info("%s/%s: re-plan: %s", t.namespace, t.name, decision.reason)
            else:
                rollout = None
        if pressed:
            degraded = _preempted(pressed, decision)
    fault = _worst(faults)
    if fault is not None:  # a fault named from the moment it is seen, over any capacity note
        degraded = condition("Degraded", True, fault.reason, fault.message)
    if superseded is not None and superseded.id not in {r.id for r in (rollout, current) if r is not None}:
        await _drop_plan(deps, t, superseded)  # a rollout replaced before it served: nothing to drain

    if rollout is not None and (current is None or rollout.id != current.id):
        if new_plan:
            metrics.REPLANS.labels(t.namespace, t.name, trigger).inc()
        current = await _roll_out(deps, t, spec, current, rollout, adopt, degraded, pods)
        rollout = None
    assert current is not None
    lost = {n for n, f in faults.items() if f.lost}
    outcome = await _settle(deps, t, spec, current, adopt, degraded, lost)
    costs = deps.profiler.cached(spec, t.namespace)
    if costs is not None and (t.status.get("profile") or {}).get("key") != key.digest():
        stored = profilestatus.encode(key, costs)
        if stored is not None:
            outcome.status["profile"] = stored
    return outcome


def _worst(faults: Mapping[str, Fault]) -> Fault | None:
    """The fault to name in Degraded: a lost node before a restarting shard, then by name."""
    ranked = sorted(faults.values(), key=lambda f: (not f.lost, f.node))
    return ranked[0] if ranked else None


def _of_plans(pods: list[dict[str, Any]], *records: PlanRecord | None) -> list[dict[str, Any]]:
    ids = {r.id for r in records if r is not None}
    return [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_PLAN) in ids]


def _all_ready(pods: list[dict[str, Any]], record: PlanRecord) -> bool:
    mine = _of_plans(pods, record)
    return len(mine) == len(record.shards) and all(pod_ready(p) for p in mine)


async def _propose(
    deps: Deps,
    t: Target,
    spec: DeploymentSpec,
    current: PlanRecord | None,
    node_objs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    faults: dict[str, Fault],
    adopt: Callable[[dict[str, Any]], None],
    *,
    hysteresis: bool,
    avoid: Mapping[str, str] | None = None,
    forced: str = "the spec changed",
) -> Keep | Rollout:
    """Plan on the healthy nodes and decide (``decide.choose``); a ``Blocked`` decision ends the
    reconciliation here with its condition."""
    with contextlib.suppress(Exception):  # profiled outside the placing lock (errors: in _decide)
        await deps.profiler.costs(t.name, t.namespace, t.uid, spec, adopt)
    async with deps.placing:
        decision = await _decide(
            deps,
            t,
            spec,
            current,
            node_objs,
            pods,
            faults,
            adopt,
            hysteresis=hysteresis,
            avoid=avoid or {},
            forced=forced,
        )
        if isinstance(decision, Rollout) and (current is None or decision.plan.id != current.id):
            _assume(deps, t, decision.plan)
    if not isinstance(decision, Blocked):
        return decision
    metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, decision.reason).inc()
    waiting = Phase.PLANNING if current is None else Phase(t.status.get("phase") or "Serving")
    conds = [condition("Planned", False, decision.reason, decision.message)]
    phase = Phase.FAILED if decision.permanent else waiting
    extra = {"observedGeneration": t.generation} if decision.permanent else {}
    raise _Stop(
        Outcome(
            _finish(t, phase, conds, **extra),
            retry_s=None if decision.permanent else decision.retry_s,
            permanent=decision.message if decision.permanent else None,
            reason=decision.reason,
        )
    )


async def _decide(
    deps: Deps,
    t: Target,
    spec: DeploymentSpec,
    current: PlanRecord | None,
    node_objs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    faults: dict[str, Fault],
    adopt: Callable[[dict[str, Any]], None],
    *,
    hysteresis: bool,
    avoid: Mapping[str, str],
    forced: str,
) -> Keep | Rollout | Blocked:
    cfg = deps.config
    try:
        await _check_storage_host(spec, cfg)
    except HostRefused as exc:
        return Blocked("InvalidSpec", f"spec.model.storageUri: refused: {exc}", permanent=True)
    try:
        costs = await deps.profiler.costs(t.name, t.namespace, t.uid, spec, adopt)
    except InvalidSpec as exc:
        return Blocked("InvalidModel", str(exc), permanent=True)
    except Profiling as exc:
        if current is not None and hysteresis and not any(f.lost for f in faults.values()):
            return Keep(None)  # same spec, plan serving: a re-plan waits for the profile (operator restarted)
        return Blocked("Profiling", str(exc), retry_s=cfg.ready_poll_s)
    except ProfilerFailed as exc:
        retry = None if exc.permanent else cfg.infeasible_retry_s
        return Blocked(exc.reason, str(exc), retry_s=retry, permanent=exc.permanent)
    except ProfilerUnavailable as exc:
        return Blocked("ProfilerUnavailable", str(exc), retry_s=cfg.ready_poll_s * 5)
    now = time.monotonic()
    for f in faults.values():
        if f.reason in ("ShardCrashLooping", "ShardFailed"):
            deps.excluded.fail(f.node, now)  # its shards keep failing: out for a while
    left_out = deps.excluded.excluded(now) | {n for n, f in faults.items() if f.lost}
    wanted = node_selector(spec, cfg)
    nodes = [
        n["metadata"]["name"]
        for n in node_objs
        if matches(n, wanted) and node_ready(n) and n["metadata"]["name"] not in left_out
    ]
    if not nodes:
        selector = ",".join(f"{k}={v}" for k, v in wanted.items()) or "(any)"
        out = f" (left out while failing: {', '.join(sorted(left_out))})" if left_out else ""
        return Blocked(
            "NoNodes", f"no ready node matches nodeSelector {selector}{out}", cfg.infeasible_retry_s
        )
    lost_now = {n for n, f in faults.items() if f.lost}
    shrunk = current.without(lost_now) if current is not None and lost_now else None
    if shrunk is not None:  # the other pipelines serve on: no new Pods, nothing to make room for
        why = "; ".join(faults[n].message for n in sorted(lost_now) if n in current.nodes)  # type: ignore[union-attr]
        return Rollout(shrunk, f"pipelines through lost nodes dropped, the others serve on: {why}")
    keep_ok = current is not None and hysteresis and not any(f.lost for f in faults.values())
    try:
        cap = await deps.prometheus.capacity(nodes, costs.reference_ms, cfg.capacity_max_age_s)
    except CapacityUnavailable as exc:
        if keep_ok:
            metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "CapacityUnavailable").inc()
            return Keep(
                condition("Degraded", True, "CapacityUnavailable", f"keeping the current plan: {exc}")
            )
        return Blocked("CapacityUnavailable", str(exc), retry_s=cfg.ready_poll_s * 5)
    if current is not None:
        stale = {n: why for n, why in cap.missing.items() if n in current.nodes}
        # A node whose shards died and whose metrics went stale is lost, Ready or not.
        lost = {
            n: f
            for n, f in node_faults(current.nodes, node_objs, _of_plans(pods, current), stale).items()
            if f.lost
        }
        faults.update(lost)
        deps.lost.remember(t.uid, lost.values())
        if stale and keep_ok and not any(f.lost for f in faults.values()):
            metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "CapacityStale").inc()
            detail = "; ".join(f"{n}: {why}" for n, why in sorted(stale.items()))
            return Keep(condition("Degraded", True, "CapacityStale", f"keeping the current plan: {detail}"))
    measured = {n: c for n, c in cap.nodes.items() if not (n in faults and faults[n].lost)}
    if not measured:
        detail = "; ".join(f"{n}: {why}" for n, why in sorted(cap.missing.items())) or "all lost"
        return Blocked("NoCapacity", f"no node has fresh capacity metrics ({detail})", cfg.infeasible_retry_s)
    usable, left, victims = await _within_budget(deps, t, spec, node_objs, measured, avoid, current)
    if not usable:
        if current is not None and not lost_now:
            return Keep()  # nothing better fits now; the plan serves on
        need = min(b.param_bytes + b.act_bytes for b in costs.blocks) + cfg.memory_overhead_bytes
        return Blocked(
            "InsufficientCapacity", shortage(left, cfg.min_shard_cpu, need), cfg.infeasible_retry_s
        )
    selected = {n["metadata"]["name"] for n in node_objs if matches(n, wanted)}
    for i, pin in enumerate(spec.placement):
        if pin.node in selected and pin.node not in usable:
            # A node of the cluster that cannot take a shard now (stale metrics, no room): the
            # user's pin is right, the moment is wrong; retry (a node the selector does not admit, or
            # none of that name, is theirs to fix: the planner's InvalidPlacement).
            if current is not None and not lost_now:
                return Keep()
            why = left.get(pin.node) or cap.missing.get(pin.node) or "no fresh capacity metrics"
            message = f"spec.placement[{i}].node: {pin.node!r} cannot take a shard now: {why}"
            return Blocked("PinnedNodeUnavailable", message, retry_s=cfg.infeasible_retry_s)
    pins = [Pin(p.first_block, p.last_block, p.node) for p in spec.placement]
    squeeze: dict[str, Any] = (
        {"codecs": costs.codecs, "max_error": spec.compression.max_output_error}
        if spec.compression.enabled
        else {}
    )
    try:
        plan, _ = timed_plan(
            costs.blocks,
            list(usable.values()),
            namespace=t.namespace,
            deployment=t.name,
            links=[link for link in cap.links if link.src in usable and link.dst in usable],
            objective=spec.objective,
            rate_rps=spec.target_rate,
            strategy=spec.strategy,
            tiles=spec.tiles,
            input_bytes=costs.input_bytes,
            max_stages=spec.max_stages,
            pinned=pins,
            **squeeze,
        )
    except PlanInfeasible as exc:
        if current is not None and not lost_now and left:
            return Keep()  # nothing better fits beside the current plan; it serves on
        detail = f" (left out: {'; '.join(f'{n}: {w}' for n, w in sorted(left.items()))})" if left else ""
        return Blocked("PlanInfeasible", f"{exc}{detail}", retry_s=cfg.infeasible_retry_s)
    except InvalidSpec as exc:  # a pin the model or the nodes cannot honour: the user's to fix
        return Blocked("InvalidPlacement", str(exc), permanent=True)
    proposal = plan_record(spec, plan, {n: c.cpu for n, c in usable.items()})
    decision = choose(
        current,
        proposal,
        plan,
        threshold=spec.replan.gain_threshold,
        hysteresis=hysteresis,
        forced=forced,
        faults=faults,
        blocks=costs.blocks,
        nodes=list({**usable, **_held_capacity(current, measured)}.values()),
        links=list(cap.links),
        input_bytes=costs.input_bytes,
        rate_rps=spec.target_rate,
        **squeeze,
    )
    if isinstance(decision, Rollout):
        asked = {n for n in proposal.nodes if n in victims}
        decision = replace(decision, victims=tuple(sorted({v for n in asked for v in victims[n]})))
    return decision


def _held_capacity(
    current: PlanRecord | None, measured: Mapping[str, NodeCapacity]
) -> dict[str, NodeCapacity]:
    """The nodes of the current plan as it holds them (its Pods' CPU share): what it is re-priced
    on, since its own Pods count as held in the budgets a new plan gets."""
    if current is None:
        return {}
    return {n: scaled(measured[n], cpu) for s in current.stages for n, cpu, _ in s.holds() if n in measured}


async def _within_budget(
    deps: Deps,
    t: Target,
    spec: DeploymentSpec,
    node_objs: list[dict[str, Any]],
    measured: dict[str, NodeCapacity],
    avoid: Mapping[str, str],
    current: PlanRecord | None,
) -> tuple[dict[str, NodeCapacity], dict[str, str], dict[str, tuple[tuple[str, str], ...]]]:
    """Measured capacity cut to what this deployment may take on each node (placement.py): the
    nodes kept, those left out (node → why), and per node the lower-priority deployments whose
    excess over their fair share the budget counted on."""
    cfg = deps.config
    me, tenants, nodes, held = await _placed(deps, t, spec, node_objs)
    preempt = spec.preemption_policy == "PreemptLowerPriority"
    budget = budgets(me, tenants, nodes, held, preempt=preempt, current_plan=current.id if current else None)
    usable, left = narrow(
        measured, budget, min_cpu=cfg.min_shard_cpu, overhead_bytes=cfg.memory_overhead_bytes
    )
    for node, why in avoid.items():
        if usable.pop(node, None) is not None:
            left[node] = why
    victims = {n: b.victims for n, b in budget.items() if b.victims and b.cpu > b.free_cpu + 1e-9}
    return usable, left, victims


async def _placed(
    deps: Deps, t: Target, spec: DeploymentSpec, node_objs: list[dict[str, Any]]
) -> tuple[Tenant, list[Tenant], dict[str, Any], dict[str, Any]]:
    """This deployment and its competitors, the nodes' allocatable and labels, and what every
    Pod holds where (all namespaces: other workloads count too)."""
    cfg = deps.config
    others = tenants_of(await deps.kube.list("InferenceDeployment", None), cfg.shard_node_selector)
    others = [o for o in others if (o.namespace, o.name) != (t.namespace, t.name)]
    me = Tenant(t.namespace, t.name, spec.priority, node_selector(spec, cfg))
    nodes = {
        n["metadata"]["name"]: (alloc, n["metadata"].get("labels") or {})
        for n in node_objs
        if (alloc := node_allocatable(n)) is not None
    }
    held = holdings(await deps.kube.list("Pod", None))
    now = time.monotonic()
    for uid, (until, assumed) in list(deps.assumed.items()):
        if until < now:
            del deps.assumed[uid]
        elif uid != t.uid:
            for node, h in assumed:
                held.setdefault(node, []).append(h)
    return me, others, nodes, held


async def _pressure(
    deps: Deps, t: Target, spec: DeploymentSpec, node_objs: list[dict[str, Any]], current: PlanRecord
) -> dict[str, str]:
    """Nodes this deployment should move off for a higher-priority one (placement.pressure)."""
    me, tenants, nodes, held = await _placed(deps, t, spec, node_objs)
    return pressure(me, tenants, nodes, held, current.id)


ASSUME_S = 60.0
"""How long a decided plan counts as held before its Pods exist (a reconciliation that failed
between deciding and creating them leaves nothing behind for long)."""


def _assume(deps: Deps, t: Target, record: PlanRecord) -> None:
    """Count ``record``'s requests as held until its Pods exist (``_roll_out`` forgets them)."""
    owner = (t.namespace, label_value(t.name))
    overhead = deps.config.memory_overhead_bytes
    held = [
        (node, Held(owner, record.id, Resources(cpu, memory + overhead), bound=False))
        for s in record.stages
        for node, cpu, memory in s.holds()
    ]
    deps.assumed[t.uid] = (time.monotonic() + ASSUME_S, held)


async def _make_room(deps: Deps, t: Target, decision: Rollout) -> None:
    """Ask the lower-priority deployments this plan counts on moving to re-plan now."""
    for namespace, name in decision.victims:
        log.info("%s/%s: asking %s/%s to make room", t.namespace, t.name, namespace, name)
        await nudge.request(deps.kube, namespace, name, f"make room for {t.namespace}/{t.name}")


def _preempted(pressed: Mapping[str, str], decision: Keep | Rollout) -> dict[str, Any]:
    detail = "; ".join(pressed[n] for n in sorted(pressed))
    if isinstance(decision, Rollout):
        return condition("Degraded", True, "Preempted", f"re-planning off: {detail}")
    return condition("Degraded", True, "Preempted", f"no room elsewhere yet, keeping the plan: {detail}")


def _stuck(deps: Deps, pods: list[dict[str, Any]]) -> dict[str, str]:
    """Nodes of shard Pods Unschedulable for longer than ``unschedulable_wait_s``: node → why."""
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    wait = deps.config.unschedulable_wait_s
    return {
        p.node: f"unschedulable for {wait:g} s: {p.message}"
        for p in unschedulable(pods)
        if p.waited_s(now) > wait
    }


async def _drop_unrecorded(deps: Deps, t: Target, chosen: PlanRecord) -> None:
    """Before a deployment's first recorded plan: delete its Pods of any other plan. Only an
    operator stopped between creating a plan's Pods and recording it leaves them; they never
    served, and they hold room on nodes the chosen plan may need (a restarted operator may
    choose otherwise, from a fresh profile). Pods of the chosen plan stay: they are adopted."""
    pods = await _owned(deps, t, "Pod", {LABEL_DEPLOYMENT: label_value(t.name)})
    stray = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_PLAN) != chosen.id]
    if stray:
        log.info("%s/%s: deleting %d Pod(s) of a plan never recorded", t.namespace, t.name, len(stray))
        await deps.kube.delete_all("Pod", stray)


async def _drop_plan(deps: Deps, t: Target, record: PlanRecord) -> None:
    """Delete a plan's Pods and Services that never served (a rollout replaced by another)."""
    labels = {LABEL_DEPLOYMENT: label_value(t.name), LABEL_PLAN: record.id}
    for kind in ("Pod", "Service"):
        await deps.kube.delete_all(kind, await _owned(deps, t, kind, labels))


async def _check_storage_host(spec: DeploymentSpec, cfg: OperatorConfig) -> None:
    """An https or s3 storage host must not resolve to a loopback, link-local or metadata address.
    A name that does not resolve here is left to the initializer (which checks again anyway)."""
    url = spec.model.remote_url
    if url is None:
        return
    parts = urlsplit(url)
    try:
        await resolve_checked_async(
            parts.hostname or "", parts.port or 443, cfg.spec_policy().storage_allowed_networks
        )
    except HostUnresolved as exc:
        log.info("storageUri host not resolved by the operator (the initializer checks it): %s", exc)


def _foreign(deps: Deps, t: Target, obj: Mapping[str, Any]) -> _Stop:
    """Refuse to touch an object of our name that another owner holds (never take it over)."""
    meta = obj.get("metadata") or {}
    kind = obj.get("kind") or "object"
    message = (
        f"{kind} {t.namespace}/{meta.get('name')} already exists and belongs to "
        f"{owner_names(obj)}, not to this InferenceDeployment: refusing to change or delete it; "
        "rename this deployment or remove that object"
    )
    metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "NameConflict").inc()
    conds = [condition("ShardsReady", False, "NameConflict", message)]
    phase = Phase(t.status.get("phase") or "Pending")
    return _Stop(
        Outcome(_finish(t, phase, conds), retry_s=deps.config.infeasible_retry_s, reason="NameConflict")
    )


async def _existing(deps: Deps, t: Target, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The live object of ``obj``'s name, if it is ours; None if absent; refuses someone else's."""
    meta = obj["metadata"]
    live = await deps.kube.get(obj["kind"], meta["namespace"], meta["name"])
    if live is not None and not owned_by(live, t.uid):
        raise _foreign(deps, t, {**live, "kind": obj["kind"]})
    return live


async def _apply(
    deps: Deps, t: Target, objs: list[dict[str, Any]], adopt: Callable[[dict[str, Any]], None]
) -> None:
    """Create what is missing; an existing object of the same name is the same object (named by
    plan id) when this deployment owns it, and a refusal when it does not."""
    for obj in objs:
        adopt(obj)
        if await _existing(deps, t, obj) is None:
            with contextlib.suppress(Conflict):  # created meanwhile (a restarted operator, a retry)
                await deps.kube.create(obj)


async def _apply_policy(
    deps: Deps, t: Target, spec: DeploymentSpec, adopt: Callable[[dict[str, Any]], None]
) -> None:
    """The deployment's NetworkPolicy exists, as the spec and the chart say now (before any Pod)."""
    policy = deployment_policy(t.name, t.namespace, spec, deps.config)
    if policy is None:
        return
    adopt(policy)
    live = await _existing(deps, t, policy)
    if live is None:
        with contextlib.suppress(Conflict):
            await deps.kube.create(policy)
    elif live.get("spec") != policy["spec"]:
        meta = policy["metadata"]
        await deps.kube.patch("NetworkPolicy", t.namespace, meta["name"], {"spec": policy["spec"]})


async def _owned(deps: Deps, t: Target, kind: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Objects of ``kind`` with ``labels`` that this deployment owns (a label can be copied)."""
    return [o for o in await deps.kube.list(kind, t.namespace, labels) if owned_by(o, t.uid)]


@dataclass(frozen=True)
class Waiting:
    """Shards cannot start yet for want of their certificates: a ShardsReady reason and message."""

    reason: str
    message: str


async def _certificates(
    deps: Deps, t: Target, record: PlanRecord, adopt: Callable[[dict[str, Any]], None]
) -> Waiting | None:
    """A leaf per stage index of ``record`` and the client leaf, issued or renewed (mutual TLS).
    None when they are there; else what the shards wait for (cert-manager has not issued yet)."""
    stages = max(s.stage for s in record.stages) + 1
    issuer = deps.config.issuer()
    if issuer is not None:
        return await _cert_manager(deps, t, stages, issuer, adopt)
    if deps.ca is None:
        return None
    labels = {LABEL_DEPLOYMENT: t.name, "app.kubernetes.io/managed-by": "amp4ec-operator"}
    await certs.ensure_monitors(deps.kube, deps.ca, deps.config.namespace)  # renewed here too
    try:
        deps.issued[t.uid] = await certs.ensure_deployment(
            deps.kube, deps.ca, t.name, t.namespace, stages, labels, adopt, deps.issued.get(t.uid)
        )
    except InvalidSpec as exc:  # a name too long for an identity
        status = _finish(t, Phase.FAILED, [condition("Planned", False, "InvalidSpec", str(exc))])
        raise _Stop(Outcome(status, permanent=str(exc), reason="InvalidSpec")) from None
    return None


async def _cert_manager(
    deps: Deps, t: Target, stages: int, issuer: certmanager.Issuer, adopt: Callable[[dict[str, Any]], None]
) -> Waiting | None:
    """The deployment's Certificates exist and ask for what they should (a changed one is
    replaced); the names of those cert-manager has not issued yet (certmanager.py)."""
    labels = {LABEL_DEPLOYMENT: label_value(t.name), "app.kubernetes.io/managed-by": "amp4ec-operator"}
    try:
        wanted = certmanager.certificates(t.name, t.namespace, stages, issuer, labels, LABEL_STAGE)
    except InvalidSpec as exc:  # a name too long for an identity
        status = _finish(t, Phase.FAILED, [condition("Planned", False, "InvalidSpec", str(exc))])
        raise _Stop(Outcome(status, permanent=str(exc), reason="InvalidSpec")) from None
    waiting = []
    for obj in wanted:
        adopt(obj)
        name = obj["metadata"]["name"]
        live = await _existing(deps, t, obj)
        if live is not None and not certmanager.same_request(live, obj):
            await deps.kube.delete("Certificate", t.namespace, name)  # e.g. another issuer: ask again
            live = None
        if live is None:
            try:
                live = await deps.kube.create(obj)
            except Conflict:
                live = await deps.kube.get("Certificate", t.namespace, name)
            if live is None:  # 404 on create: the API server does not know the kind
                metrics.RECONCILE_ERRORS.labels(t.namespace, t.name, "CertManagerMissing").inc()
                return Waiting(
                    "CertManagerMissing",
                    f"the Certificate kind ({certmanager.API_VERSION}) is not installed: install"
                    " cert-manager, or set the chart's tls.issuer.kind to builtin",
                )
        why = certmanager.not_ready(live)
        if why is not None:
            waiting.append(f"{name} ({why})")
    if not waiting:
        return None
    ref = f"{issuer.kind} {issuer.name}"
    return Waiting(
        "CertificatesPending",
        f"waiting for cert-manager ({ref}) to issue Certificate {', '.join(waiting)} in {t.namespace}",
    )


async def _retire_certificates(deps: Deps, t: Target, record: PlanRecord) -> None:
    """Under cert-manager, delete the Certificates of stage indices the active plan no longer has
    (once older plans' shards are gone); the rest go with the deployment."""
    if deps.config.issuer() is None:
        return
    stages = max(s.stage for s in record.stages) + 1
    live = await _owned(deps, t, "Certificate", {LABEL_DEPLOYMENT: label_value(t.name)})
    stale = [c for c in live if int((c["metadata"].get("labels") or {}).get(LABEL_STAGE, -1)) >= stages]
    await deps.kube.delete_all("Certificate", stale)


async def _shards_ready(deps: Deps, t: Target, record: PlanRecord) -> tuple[int, int, list[Pending]]:
    """Ready shards of ``record``, its stage count, and its shards the scheduler cannot place."""
    pods = await _owned(deps, t, "Pod", {LABEL_DEPLOYMENT: label_value(t.name), LABEL_PLAN: record.id})
    return sum(pod_ready(p) for p in pods), len(record.shards), unschedulable(pods)


def _unschedulable_condition(ready: int, total: int, pending: list[Pending], wait_s: float) -> dict[str, Any]:
    """ShardsReady=False naming each shard the scheduler cannot place: stage, node, its reason."""
    detail = "; ".join(p.describe() for p in pending)
    message = f"{ready}/{total} shards ready; unschedulable: {detail} (re-planned around after {wait_s:g} s)"
    return condition("ShardsReady", False, "Unschedulable", message)


def _plan_fields(t: Target, record: PlanRecord, cfg: OperatorConfig) -> dict[str, Any]:
    entry = entry_service(t.name, t.namespace, record.id, cfg)["metadata"]["name"]
    return {
        "plan": record.to_status(),
        "stages": len(record.stages),
        "nodes": ",".join(dict.fromkeys(record.nodes)),
        "predicted": record.to_status()["predicted"],
        "endpoint": f"{entry}.{t.namespace}.svc:{cfg.shard_port}",
        **(
            {
                "v2": {
                    "rest": f"{'https' if cfg.tls else 'http'}://{entry}.{t.namespace}.svc:"
                    f"{cfg.v2_rest_port}/v2/models/{t.name}",
                    "grpc": f"{entry}.{t.namespace}.svc:{cfg.v2_grpc_port}",
                }
            }
            if cfg.v2_rest_port
            else {}
        ),
        "observedGeneration": t.generation,
    }


async def _roll_out(
    deps: Deps,
    t: Target,
    spec: DeploymentSpec,
    current: PlanRecord | None,
    target: PlanRecord,
    adopt: Callable[[dict[str, Any]], None],
    degraded: dict[str, Any],
    pods: list[dict[str, Any]],
) -> PlanRecord:
    """Make before break: the new plan's objects, its shards ready, then the entry switches."""
    cfg = deps.config
    await _apply_policy(deps, t, spec, adopt)
    waiting = await _certificates(deps, t, target, adopt)
    ready, total, pending = 0, len(target.shards), []
    if waiting is None:  # a shard Pod without its Secret would not start: create none yet
        await _apply(deps, t, desired_objects(t.name, t.namespace, spec, target, cfg), adopt)
        deps.assumed.pop(t.uid, None)  # its Pods exist now: they count for themselves
        ready, total, pending = await _shards_ready(deps, t, target)
    if ready < total:
        message = waiting.message if waiting else f"{ready}/{total} shards of plan {target.id} ready"
        reason = waiting.reason if waiting else "ShardsStarting"
        storage = None if waiting else _storage_trouble(_of_plans(pods, target))
        if storage is not None:  # a shard cannot fetch its model: say why, not only "starting"
            reason, message = storage[0], f"{message}; {storage[1]}"
        planned = f"plan {target.id}: {len(target.stages)} stages on {','.join(target.nodes)}"
        if waiting and current is not None:
            planned += f"; rollout waits: {message}"
        conds = [condition("Planned", True, "Planned", planned), degraded]
        if current is None:
            conds.append(
                _unschedulable_condition(ready, total, pending, cfg.unschedulable_wait_s)
                if pending
                else condition("ShardsReady", False, reason, message)
            )
            fields = {**_plan_fields(t, target, cfg), "plan": None, "rollout": target.to_status()}
            phase = Phase.DEPLOYING
        else:
            # What serves meanwhile is the current plan: say how much of it does (and why the
            # new one waits, if the scheduler cannot place it).
            conds.append(_shards_condition(_of_plans(pods, current), current))
            if pending:
                why = _unschedulable_condition(ready, total, pending, cfg.unschedulable_wait_s)["message"]
                conds.append(condition("Degraded", True, "RolloutUnschedulable", f"plan {target.id}: {why}"))
            fields = {"rollout": target.to_status(), "observedGeneration": t.generation}
            phase = Phase.REPLANNING
        serving = _serving(_of_plans(pods, current), current) if current is not None else 0
        status = _finish(t, phase, conds, serving=serving, **fields)
        raise _Stop(Outcome(status, retry_s=cfg.ready_poll_s, reason=reason))
    entry = entry_service(t.name, t.namespace, target.id, cfg)
    adopt(entry)
    meta = entry["metadata"]
    existing = await _existing(deps, t, entry)
    if existing is None:
        try:
            await deps.kube.create(entry)
        except Conflict:
            existing = await _existing(deps, t, entry)
    if existing is not None and (existing.get("spec") or {}).get("selector") != entry["spec"]["selector"]:
        await deps.kube.patch(
            "Service", t.namespace, meta["name"], {"spec": {"selector": entry["spec"]["selector"]}}
        )
    log.info(
        "%s/%s: plan %s serving (was %s)", t.namespace, t.name, target.id, current.id if current else "-"
    )
    return target


def _past_grace(pod: Mapping[str, Any], margin_s: float = 5.0) -> bool:
    """Whether a deleted Pod's grace period (and a margin) is over."""
    meta = pod.get("metadata") or {}
    stamp = meta.get("deletionTimestamp")
    if not stamp:
        return False
    try:
        since = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return True
    grace = float(meta.get("deletionGracePeriodSeconds") or 30)
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    return (now - since).total_seconds() > grace + margin_s


def _serving(pods: list[dict[str, Any]], record: PlanRecord) -> int:
    """Pipelines of ``record`` whose every shard is ready: what can answer requests now."""
    ready = {
        (labels.get(LABEL_PIPELINE), labels.get(LABEL_STAGE))
        for p in pods
        if pod_ready(p) and (labels := p["metadata"].get("labels") or {}).get(LABEL_PLAN) == record.id
    }
    keys = record.shard_keys()
    return sum(all(k in ready for k in keys if k[0] == str(p)) for p in {s.pipeline for s in record.stages})


def _shards_condition(
    pods: list[dict[str, Any]], record: PlanRecord, wait_s: float | None = None
) -> dict[str, Any]:
    total = len(record.shards)
    ready = [p for p in pods if pod_ready(p) and matches(p, {LABEL_PLAN: record.id})]
    if len(ready) == total:
        return condition("ShardsReady", True, "ShardsReady", f"{total}/{total} shards ready")
    pending = [p for p in unschedulable(pods) if p.plan == record.id]
    if pending and wait_s is not None:
        return _unschedulable_condition(len(ready), total, pending, wait_s)
    down = sorted(
        set(record.nodes) - {pod_node(p) for p in ready} or {pod_node(p) for p in pods if not pod_ready(p)}
    )
    where = f" (not ready on {', '.join(down)})" if down else ""
    message = f"{len(ready)}/{total} shards ready{where}"
    storage = _storage_trouble(pods)
    if storage is not None:  # the store, not the node: the shards of every node would fail alike
        return condition("ShardsReady", False, storage[0], f"{message}; {storage[1]}")
    return condition("ShardsReady", False, "ShardsNotReady", message)


def _storage_trouble(pods: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) of the first shard Pod whose storage initializer fails, else None."""
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        failure = initializer_failure(pod) if not pod_ready(pod) else None
        if failure is not None:
            name = (pod.get("metadata") or {}).get("name", "?")
            return failure[0], f"spec.model.storageUri: {failure[1]} (shard Pod {name}, {INITIALIZER})"
    return None


async def _settle(
    deps: Deps,
    t: Target,
    spec: DeploymentSpec,
    current: PlanRecord,
    adopt: Callable[[dict[str, Any]], None],
    degraded: dict[str, Any],
    lost: set[str],
) -> Outcome:
    """The active plan's objects exist, older plans' are gone; status says how ready it is."""
    cfg = deps.config
    await _apply_policy(deps, t, spec, adopt)
    waiting = await _certificates(deps, t, current, adopt)  # renewed here, before they expire
    await _apply(deps, t, desired_objects(t.name, t.namespace, spec, current, cfg), adopt)
    entry = entry_service(t.name, t.namespace, current.id, cfg)
    await _apply(deps, t, [entry], adopt)
    pods = await _owned(deps, t, "Pod", {LABEL_DEPLOYMENT: label_value(t.name)})
    draining = await _retire_old(deps, t, current, entry["metadata"]["name"], pods, lost)
    if not draining:
        await _retire_certificates(deps, t, current)
    # A Pod that failed for good (evicted) is not restarted by its kubelet: replace it.
    failed = [p for p in _of_plans(pods, current) if (p.get("status") or {}).get("phase") == "Failed"]
    await deps.kube.delete_all("Pod", failed)
    failed += await _drop_dropped(deps, t, current, pods)
    mine = [p for p in _of_plans(pods, current) if p not in failed]
    ready, total = sum(pod_ready(p) for p in mine), len(current.shards)
    planned = condition(
        "Planned",
        True,
        "Planned",
        f"plan {current.id}: {len(current.stages)} stages on {','.join(current.nodes)}",
    )
    fields = {**_plan_fields(t, current, cfg), "rollout": None}
    previous = (t.status.get("plan") or {}).get("id")
    if previous != current.id:
        fields["lastPlanTime"] = now_iso()
    retry = cfg.ready_poll_s if draining else None
    shards = _shards_condition(mine, current, cfg.unschedulable_wait_s)
    if waiting is not None and ready < total:  # e.g. a shard re-created while cert-manager re-issues
        shards = condition("ShardsReady", False, waiting.reason, f"{shards['message']}; {waiting.message}")
    if ready == total:
        status = _finish(t, Phase.SERVING, [planned, shards, degraded], **fields)
        _phase_metric(t, Phase.SERVING)
        return Outcome(status, retry_s=retry, reason="Serving")
    if degraded["status"] != "True":  # a named fault or a capacity note stays; else say which shards
        degraded = condition("Degraded", True, "ShardsNotReady", shards["message"])
    serving = _serving(mine, current)
    phase = Phase.SERVING if serving else Phase.DEPLOYING
    status = _finish(t, phase, [planned, shards, degraded], serving=serving, **fields)
    _phase_metric(t, phase)
    return Outcome(status, retry_s=cfg.ready_poll_s, reason="ShardsNotReady")


async def _drop_dropped(
    deps: Deps, t: Target, current: PlanRecord, pods: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Pods and stage Services of pipelines dropped from the active plan (``PlanRecord.without``:
    their nodes were lost); returns the Pods deleted."""
    kept = current.shard_keys()

    def dropped(o: dict[str, Any]) -> bool:  # a Pod's labels, a stage Service's selector
        labels = o["metadata"].get("labels") or {}
        if LABEL_STAGE not in labels:
            labels = (o.get("spec") or {}).get("selector") or {}
        return LABEL_PIPELINE in labels and (labels[LABEL_PIPELINE], labels.get(LABEL_STAGE)) not in kept

    stray = [p for p in _of_plans(pods, current) if dropped(p)]
    await deps.kube.delete_all("Pod", stray)
    services = await _owned(
        deps, t, "Service", {LABEL_DEPLOYMENT: label_value(t.name), LABEL_PLAN: current.id}
    )
    await deps.kube.delete_all("Service", [o for o in services if dropped(o)])
    return stray


async def _retire_old(
    deps: Deps,
    t: Target,
    current: PlanRecord,
    entry_name: str,
    pods: list[dict[str, Any]],
    lost: set[str],
) -> bool:
    """Delete older plans' objects, draining: their entry Pods first (SIGTERM: the agent stops
    taking streams and finishes what it holds within its grace period, its downstream stages
    still up), the rest once those entry Pods are gone. True while something still drains."""
    old = [p for p in pods if LABEL_PLAN in (p["metadata"].get("labels") or {})]
    old = [p for p in old if not matches(p, {LABEL_PLAN: current.id})]
    entries = [p for p in old if matches(p, {LABEL_STAGE: "0"})]
    await deps.kube.delete_all("Pod", [p for p in entries if not p["metadata"].get("deletionTimestamp")])
    # An entry on a lost node has nothing to drain, and one past its grace period has been
    # killed by its kubelet, or its node is dead and will never report its end.
    if any(pod_node(p) not in lost and not _past_grace(p) for p in entries):
        return True
    await deps.kube.delete_all("Pod", [p for p in old if p not in entries])
    services = await _owned(deps, t, "Service", {LABEL_DEPLOYMENT: label_value(t.name)})
    stale = [
        o for o in services
        if LABEL_PLAN in (o["metadata"].get("labels") or {}) and not matches(o, {LABEL_PLAN: current.id})
    ]  # fmt: skip
    # An entry Service of an older name (before names.py: a long name cut at 40) is ours and dead.
    stale += [
        o for o in services if matches(o, {LABEL_ROLE: "entry"}) and o["metadata"]["name"] != entry_name
    ]
    await deps.kube.delete_all("Service", stale)
    return False


def _phase_metric(t: Target, phase: Phase) -> None:
    for p in Phase:
        metrics.PHASE.labels(t.namespace, t.name, p.value).set(1.0 if p is phase else 0.0)


async def measure(deps: Deps, t: Target) -> dict[str, Any] | None:
    """``status.measured`` from the entry shards' metrics, or None: not due, nothing serving,
    or Prometheus unreachable (the last measurement stays, dated by its ``observedAt``)."""
    if not t.status.get("plan"):
        return None  # no shards serve yet (or the spec never planned)
    now = time.monotonic()
    if now - deps.last_measure.get(t.uid, -1e18) < deps.config.measure_interval_s:
        return None
    deps.last_measure[t.uid] = now
    window = deps.config.measure_window
    values: dict[str, float | None] = {}
    try:
        for key, promql in measured_queries(t.namespace, label_value(t.name), window).items():
            values[key] = scalar(await deps.prometheus.query(promql))
    except CapacityUnavailable as exc:
        log.warning("%s/%s: measured throughput and latency unavailable: %s", t.namespace, t.name, exc)
        return None
    return measured_status(values, window, now_iso())
