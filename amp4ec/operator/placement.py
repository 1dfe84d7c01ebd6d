"""Pure: what the nodes already hold, what one deployment may still take there, and why a shard waits.

Several InferenceDeployments share the same few nodes. The scheduler counts *requests*: a Pod
binds to a node only while the requests of the Pods bound there, its own included, fit the
node's ``status.allocatable``. So the operator plans each deployment against the same count:

1. **Held** (``holdings``): per node, the requests of the non-terminal Pods bound there (any
   workload), plus the shard Pods of other deployments already created for that node but not
   bound yet (the scheduler's "nominated" Pods), when their priority is at least ours.
2. **Budget** (``budgets``): per node, the CPU this deployment may request there is the least of
   its *fair share* and what is *free* (allocatable less held). The fair share splits the node's
   allocatable CPU among the deployments whose node selector matches it, each weighted by
   ``1 + spec.priority`` (equal by default). Its own bound Pods count as held: a new plan is
   made *beside* the old one (make before break). A deployment may also count as free what
   lower-priority deployments hold there while above their own fair share (*reclaimable*):
   the fewest such deployments that make room (lowest priority, largest holding first) are
   asked to re-plan off the node (``pressure``), and the memory they hold counts as free too; a
   deployment never reclaims from its equals, it waits. Memory has no fair share: a stage needs
   what its blocks need, and must find it free (or freed by those victims).
3. **Narrowed capacity** (``narrow``): the planner's NodeCapacity with the budget's CPU (speed
   scaled to it: one forward thread gets at most one core) and memory (less the Pod's runtime
   overhead); a node under ``min_cpu`` is left out, with the reason.
4. **Unschedulable** (``unschedulable``): a shard Pod the scheduler left Pending, its stage,
   node and the scheduler's message, and since when.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amp4ec.operator.desired import LABEL_DEPLOYMENT, LABEL_PIPELINE, LABEL_PLAN, LABEL_STAGE
from amp4ec.operator.names import label_value
from amp4ec.planner.shares import Holding, fair_share, millicores, scaled, victims
from amp4ec.planner.types import NodeCapacity

__all__ = [
    "Budget",
    "Held",
    "Pending",
    "Resources",
    "Tenant",
    "budgets",
    "holdings",
    "narrow",
    "node_allocatable",
    "parse_cpu",
    "parse_memory",
    "pod_requests",
    "pressure",
    "shortage",
    "tenants_of",
    "unschedulable",
]

HOSTNAME = "kubernetes.io/hostname"
_MEMORY_UNITS = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
}  # fmt: skip


def parse_cpu(q: Any) -> float:
    """A CPU quantity in cores: ``"2"``, ``"1.5"``, ``"250m"``, ``"100000u"``; ValueError if not one."""
    text = str(q).strip()
    for suffix, per_core in (("m", 1e3), ("u", 1e6), ("n", 1e9)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) / per_core
    return float(text)


def parse_memory(q: Any) -> int:
    """A memory quantity in bytes: ``"2Gi"``, ``"512M"``, ``"1e9"``, ``"1000"``; ValueError if not one."""
    text = str(q).strip()
    for suffix in sorted(_MEMORY_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _MEMORY_UNITS[suffix])
    if text.endswith("m"):  # milli-bytes: legal, odd
        return int(float(text[:-1]) / 1000)
    return int(float(text))


@dataclass(frozen=True)
class Resources:
    cpu: float
    """Cores."""
    memory: int
    """Bytes."""

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory)


NOTHING = Resources(0.0, 0)


def node_allocatable(node: Mapping[str, Any]) -> Resources | None:
    """``status.allocatable`` (else ``status.capacity``) of a Node; None when it reports neither."""
    status = node.get("status") or {}
    for key in ("allocatable", "capacity"):
        have = status.get(key) or {}
        if "cpu" in have and "memory" in have:
            try:
                return Resources(parse_cpu(have["cpu"]), parse_memory(have["memory"]))
            except ValueError:
                return None
    return None


def pod_requests(pod: Mapping[str, Any]) -> Resources:
    """What the scheduler counts for a Pod: the sum of its containers' requests, or its largest
    init container's where that is more (init containers run one at a time, before the others)."""
    spec = pod.get("spec") or {}

    def of(container: Mapping[str, Any]) -> Resources:
        asked = (container.get("resources") or {}).get("requests") or {}
        try:
            return Resources(parse_cpu(asked.get("cpu", 0)), parse_memory(asked.get("memory", 0)))
        except ValueError:
            return NOTHING

    total = NOTHING
    for c in spec.get("containers") or ():
        total = total + of(c)
    for c in spec.get("initContainers") or ():
        init = of(c)
        total = Resources(max(total.cpu, init.cpu), max(total.memory, init.memory))
    return total


def _terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Tenant:
    """An InferenceDeployment as a competitor for nodes."""

    namespace: str
    name: str
    priority: int
    selector: Mapping[str, str]
    """Labels a node must carry for it (its spec.nodeSelector and the chart's shard selector)."""

    @property
    def weight(self) -> int:
        """Its weight in a node's fair share."""
        return 1 + max(0, self.priority)

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, value of its shard Pods' ``amp4ec.io/deployment`` label)."""
        return (self.namespace, label_value(self.name))

    def __hash__(self) -> int:  # the selector is a dict: a tenant is known by its key
        return hash(self.key)

    def wants(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def tenants_of(objs: Iterable[Mapping[str, Any]], shard_selector: Mapping[str, str]) -> list[Tenant]:
    """The deployments competing for nodes: every InferenceDeployment not Failed, read leniently
    (a spec the operator refuses plans nothing, and a wrong priority counts as 0)."""
    out = []
    for obj in objs:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        if (obj.get("status") or {}).get("phase") == "Failed" or not isinstance(spec, Mapping):
            continue
        priority = spec.get("priority", 0)
        selector = spec.get("nodeSelector") if isinstance(spec.get("nodeSelector"), Mapping) else {}
        out.append(
            Tenant(
                namespace=str(meta.get("namespace") or "default"),
                name=str(meta.get("name") or ""),
                priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else 0,
                selector={**shard_selector, **{str(k): str(v) for k, v in (selector or {}).items()}},
            )
        )
    return out


@dataclass(frozen=True)
class Held:
    """One Pod's requests on a node."""

    owner: tuple[str, str] | None
    """(namespace, deployment label) of an amp4ec shard Pod; None for any other workload."""
    plan: str
    requests: Resources
    bound: bool
    """Bound by the scheduler (``spec.nodeName``); else created for the node, not bound yet."""


def holdings(pods: Iterable[Mapping[str, Any]]) -> dict[str, list[Held]]:
    """Node → the requests of the non-terminal Pods bound there, and of the shard Pods pinned
    there (``kubernetes.io/hostname``) that the scheduler has not bound yet."""
    out: dict[str, list[Held]] = {}
    for pod in pods:
        if _terminal(pod):
            continue
        spec, labels = pod.get("spec") or {}, (pod.get("metadata") or {}).get("labels") or {}
        shard = LABEL_DEPLOYMENT in labels
        node = spec.get("nodeName") or ((spec.get("nodeSelector") or {}).get(HOSTNAME) if shard else None)
        if not node:
            continue
        owner = (
            (str((pod.get("metadata") or {}).get("namespace")), labels[LABEL_DEPLOYMENT]) if shard else None
        )
        held = Held(owner, labels.get(LABEL_PLAN, ""), pod_requests(pod), bool(spec.get("nodeName")))
        out.setdefault(str(node), []).append(held)
    return out


@dataclass(frozen=True)
class Budget:
    """What one deployment may request on one node, and how that was found (for messages)."""

    node: str
    cpu: float
    """Cores it may request: min(fair share, free + reclaimable), whole millicores."""
    memory: int
    """Bytes free there (allocatable less held), with what the victims hold (they move off)."""
    fair_cpu: float
    free_cpu: float
    reclaim_cpu: float
    """Held beyond their fair share by lower-priority deployments (0 without preemption)."""
    victims: tuple[tuple[str, str], ...] = ()
    """(namespace, name) of those lower-priority deployments."""
    holders: tuple[tuple[str, float], ...] = ()
    """Who holds CPU there ("ns/name" or "other Pods"), most first."""


def _fair(alloc: Resources, labels: Mapping[str, str], tenants: Iterable[Tenant], t: Tenant) -> float:
    """``t``'s fair share of a node's CPU among all who want the node (``planner.shares``)."""
    return fair_share(alloc.cpu, t.weight, (o.weight for o in tenants if o.wants(labels) and o.key != t.key))


def _victims(
    holding: Mapping[Tenant, float], fair: Mapping[Tenant, float], priority: int, shortfall: float
) -> list[Tenant]:
    """``planner.shares.victims`` over tenants."""
    by_name = {str(t): t for t in holding}
    rows = [Holding(str(t), t.priority, cpu, fair[t]) for t, cpu in holding.items()]
    return [by_name[name] for name in victims(rows, priority, shortfall)]


def budgets(
    me: Tenant,
    tenants: Sequence[Tenant],
    nodes: Mapping[str, tuple[Resources, Mapping[str, str]]],
    held: Mapping[str, Sequence[Held]],
    *,
    preempt: bool = True,
    current_plan: str | None = None,
) -> dict[str, Budget]:
    """Per node (name → (allocatable, labels)), what ``me`` may request (module docstring, 2).

    Of ``me``'s own Pods only those of ``current_plan`` (the plan its status records) hold
    anything: a new plan must fit beside it (make-before-break). Any other plan's Pods are
    leftovers on their way out: an older plan draining, or a roll-out an operator restart
    cut short before recording it, which the same plan, decided again, adopts; counting them
    would shrink that plan or block it (InsufficientCapacity) for as long as they stood."""
    by_key = {t.key: t for t in tenants}
    by_key[me.key] = me
    everyone = list(by_key.values())
    out = {}
    for node, (alloc, labels) in nodes.items():
        fair = _fair(alloc, labels, everyone, me)
        used = NOTHING
        by_owner: dict[tuple[str, str] | None, float] = {}
        memory_of: dict[tuple[str, str] | None, int] = {}
        for h in held.get(node, ()):
            other = by_key.get(h.owner) if h.owner is not None else None
            if h.owner == me.key and (not h.bound or h.plan != current_plan):
                continue  # my own Pods hold only what the recorded plan's bound Pods hold
            if not h.bound and other is not None and other.priority < me.priority:
                continue  # a lower priority's claim does not bind before mine
            used = used + h.requests
            if h.bound:
                by_owner[h.owner] = by_owner.get(h.owner, 0.0) + h.requests.cpu
                memory_of[h.owner] = memory_of.get(h.owner, 0) + h.requests.memory
        free = alloc.cpu - used.cpu
        victims: list[Tenant] = []
        if preempt and free < fair - 1e-9:
            holding = {
                by_key[o]: c for o, c in by_owner.items() if o is not None and o in by_key and o != me.key
            }
            fairs = {t: _fair(alloc, labels, everyone, t) for t in holding}
            victims = _victims(holding, fairs, me.priority, fair - max(free, 0.0))
        moving = [o for o in by_owner if o is not None and by_key.get(o) in victims]
        reclaim = sum(by_owner[o] for o in moving)  # they move off: their memory is freed too
        names = {k: str(t) for k, t in by_key.items()}
        holders = sorted(
            ((names.get(o, f"{o[0]}/{o[1]}") if o else "other Pods", c) for o, c in by_owner.items()),
            key=lambda x: (-x[1], x[0]),
        )
        out[node] = Budget(
            node=node,
            cpu=millicores(min(fair, free + reclaim)),
            memory=max(0, alloc.memory - used.memory + sum(memory_of[o] for o in moving)),
            fair_cpu=fair,
            free_cpu=free,
            reclaim_cpu=reclaim,
            victims=tuple(sorted((v.namespace, v.name) for v in victims)),
            holders=tuple(holders),
        )
    return out


def narrow(
    capacity: Mapping[str, NodeCapacity],
    budget: Mapping[str, Budget],
    *,
    min_cpu: float,
    overhead_bytes: int,
) -> tuple[dict[str, NodeCapacity], dict[str, str]]:
    """The measured capacity of each node cut to the deployment's budget there, and the nodes
    left out (node → why). A node without a budget (its Node reports no allocatable) keeps its
    measured capacity. Speed scales with the CPU share up to one core (one forward thread)."""
    kept: dict[str, NodeCapacity] = {}
    out: dict[str, str] = {}
    for name, cap in capacity.items():
        b = budget.get(name)
        if b is None:
            kept[name] = cap
            continue
        cpu = min(cap.cpu, b.cpu)
        memory = min(cap.memory_bytes, b.memory - overhead_bytes)
        if cpu < min_cpu - 1e-9 or memory <= 0:
            out[name] = _why(b, cpu, memory + overhead_bytes, min_cpu)
            continue
        kept[name] = replace(scaled(cap, cpu), memory_bytes=memory)
    return kept, out


def _why(b: Budget, cpu: float, memory: int, min_cpu: float) -> str:
    held = ", ".join(f"{who} {c:.2f}" for who, c in b.holders[:3]) or "nothing"
    if cpu < min_cpu - 1e-9:
        return (
            f"{cpu:.2f} cpu to take (fair share {b.fair_cpu:.2f}, free {max(0.0, b.free_cpu):.2f}; "
            f"held: {held})"
        )
    return f"{memory / 2**20:.0f} MiB free, less than a shard's runtime (held: {held})"


def shortage(left_out: Mapping[str, str], min_cpu: float, memory: int) -> str:
    """What a deployment that fits nowhere needs, and what each node offers: a condition message."""
    offers = "; ".join(f"{n}: {why}" for n, why in sorted(left_out.items())) or "no node"
    return f"waiting for at least {min_cpu:g} cpu and {memory / 2**20:.0f} MiB on one node ({offers})"


def pressure(
    me: Tenant,
    tenants: Sequence[Tenant],
    nodes: Mapping[str, tuple[Resources, Mapping[str, str]]],
    held: Mapping[str, Sequence[Held]],
    plan: str,
) -> dict[str, str]:
    """Nodes ``me`` should move off: a higher-priority deployment's shard waits there (created for
    the node, not bound), and ``me`` (its Pods of ``plan``, the active one: a plan it left drains)
    is among the fewest lower-priority deployments above their fair share whose move makes room
    for it (as ``budgets`` chose them): node → why."""
    by_key = {t.key: t for t in tenants}
    by_key[me.key] = me
    everyone = list(by_key.values())
    out = {}
    for node, (alloc, labels) in nodes.items():
        here = held.get(node, ())
        holding: dict[Tenant, float] = {}
        for h in here:
            if h.bound and h.owner in by_key:
                holding[by_key[h.owner]] = holding.get(by_key[h.owner], 0.0) + h.requests.cpu  # type: ignore[index]
        if not any(h.owner == me.key and h.bound and h.plan == plan for h in here):
            continue
        waiting: dict[Tenant, float] = {}
        for h in here:
            if not h.bound and h.owner in by_key and by_key[h.owner].priority > me.priority:  # type: ignore[index]
                who = by_key[h.owner]  # type: ignore[index]
                waiting[who] = waiting.get(who, 0.0) + h.requests.cpu
        if not waiting:
            continue
        who = max(waiting, key=lambda w: (w.priority, str(w)))
        # As ``who``'s budget counts: bound Pods, and unbound ones of its equals or betters.
        used = sum(
            h.requests.cpu
            for h in here
            if h.bound
            or (h.owner != who.key and (h.owner not in by_key or by_key[h.owner].priority >= who.priority))  # type: ignore[index]
        )
        shortfall = waiting[who] - (alloc.cpu - used)
        fairs = {t: _fair(alloc, labels, everyone, t) for t in holding}
        if shortfall > 1e-9 and me in _victims(holding, fairs, who.priority, shortfall):
            out[node] = (
                f"{who} (priority {who.priority}) waits for {waiting[who]:.2f} cpu on {node}, where "
                f"this deployment (priority {me.priority}) holds {holding[me]:.2f} cpu, over its fair "
                f"share {fairs[me]:.2f}"
            )
    return out


@dataclass(frozen=True)
class Pending:
    """A shard Pod the scheduler could not place."""

    pod: str
    plan: str
    pipeline: str
    stage: str
    node: str
    message: str
    since: str

    def describe(self) -> str:
        return f"stage {self.stage} (pipeline {self.pipeline}) on {self.node}: {self.message}"

    def waited_s(self, now: datetime.datetime) -> float:
        try:
            since = datetime.datetime.fromisoformat(self.since.replace("Z", "+00:00"))
        except ValueError:
            return 0.0
        return (now - since).total_seconds()


def unschedulable(pods: Iterable[Mapping[str, Any]]) -> list[Pending]:
    """Shard Pods with ``PodScheduled=False`` (reason Unschedulable): stage, node, the scheduler's
    message and since when; ordered by pipeline and stage."""
    out = []
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if meta.get("deletionTimestamp") or spec.get("nodeName"):
            continue
        for c in (pod.get("status") or {}).get("conditions") or ():
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                labels = meta.get("labels") or {}
                out.append(
                    Pending(
                        pod=str(meta.get("name")),
                        plan=labels.get(LABEL_PLAN, ""),
                        pipeline=labels.get(LABEL_PIPELINE, "?"),
                        stage=labels.get(LABEL_STAGE, "?"),
                        node=str((spec.get("nodeSelector") or {}).get(HOSTNAME) or "any node"),
                        message=str(c.get("message") or c.get("reason") or "Unschedulable"),
                        since=str(c.get("lastTransitionTime") or ""),
                    )
                )
    return sorted(out, key=lambda p: (p.pipeline, p.stage, p.pod))
