"""Pure: the operator's one hard decision, as a typed result.

Given the active plan (if any), a freshly planned proposal and what is known about the nodes,
``choose`` says what to do: ``Keep`` the active plan (maybe noting it is degraded), ``Rollout``
a new one (make before break), or ``Blocked`` with a condition. Re-pricing the active plan on
today's capacity is ``planner.replan_reason``'s job, not repeated here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amp4ec import planner
from amp4ec.operator.faults import Fault
from amp4ec.operator.planstatus import PlanRecord
from amp4ec.planner.types import Link, NodeCapacity, Pipeline, Plan, Prediction, Stage

__all__ = ["Blocked", "Decision", "Keep", "Rollout", "as_plan", "choose"]


@dataclass(frozen=True)
class Keep:
    """Keep the active plan; ``degraded`` is the Degraded condition to report (None: as planned)."""

    degraded: dict[str, Any] | None = None


@dataclass(frozen=True)
class Rollout:
    """Roll out ``plan``; ``reason`` says why (logs, the Degraded message)."""

    plan: PlanRecord
    reason: str
    victims: tuple[tuple[str, str], ...] = ()
    """Lower-priority deployments (namespace, name) asked to re-plan off what this plan takes."""


@dataclass(frozen=True)
class Blocked:
    """No plan can be made or kept: a ``Planned=False`` condition. ``permanent`` only for what
    the user must fix in the spec; anything else is retried after ``retry_s`` and never cached."""

    reason: str
    message: str
    retry_s: float | None = None
    permanent: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


Decision = Keep | Rollout | Blocked


def as_plan(record: PlanRecord) -> Plan:
    """The planner's view of a stored plan (its placement and stored prediction)."""
    pipelines: dict[int, list[Stage]] = {}
    for s in record.stages:
        pipelines.setdefault(s.pipeline, []).append(
            Stage(
                s.node,
                s.first_block,
                s.last_block,
                out_codec=s.out_codec,
                tiles=s.tiles.phases if s.tiles else (),
                tile_memory_bytes=s.tiles.memory_bytes if s.tiles else 0,
            )
        )
    placement = tuple(Pipeline(tuple(stages)) for _, stages in sorted(pipelines.items()))
    predicted = Prediction(
        stage_ms=tuple(s.predicted_ms for s in record.stages),
        bottleneck_ms=record.bottleneck_ms,
        latency_ms=record.latency_ms,
        throughput_rps=record.throughput_rps,
        output_error=record.output_error,
    )
    return Plan(record.objective, record.strategy, placement, predicted)


def choose(
    current: PlanRecord | None,
    proposal: PlanRecord,
    proposed: Plan,
    *,
    threshold: float,
    hysteresis: bool,
    faults: Mapping[str, Fault],
    forced: str = "the spec changed",
    blocks: Sequence[Any],
    nodes: Sequence[NodeCapacity],
    links: Sequence[Link] = (),
    input_bytes: int = 0,
    codecs: Sequence[Any] = (),
    max_error: float | None = None,
    rate_rps: float | None = None,
) -> Keep | Rollout:
    """Keep ``current`` or roll out ``proposal``.

    A plan through a lost node is replaced whatever the gain (it cannot serve); otherwise the
    proposal must beat the current plan, re-priced on today's capacity, by ``threshold``
    (unless ``hysteresis`` is off: a spec change, or room asked for by a higher priority —
    ``forced`` says which — rolls out whatever differs)."""
    if current is None:
        return Rollout(proposal, "no current plan")
    lost = sorted(n for n in set(current.nodes) if n in faults and faults[n].lost)
    if proposal.id == current.id:
        return Keep()
    if lost:
        return Rollout(proposal, "; ".join(faults[n].message for n in lost))
    if not hysteresis:
        return Rollout(proposal, forced)
    try:
        reason = planner.replan_reason(
            as_plan(current),
            proposed,
            threshold,
            blocks=blocks,
            nodes=nodes,
            links=links,
            input_bytes=input_bytes,
            codecs=codecs,
            max_error=max_error,
            rate_rps=rate_rps,
        )
    except (KeyError, ValueError) as exc:  # a node of the current plan has no capacity now
        reason = f"the current plan cannot be priced on today's capacity: {exc}"
    return Keep() if reason is None else Rollout(proposal, reason)
