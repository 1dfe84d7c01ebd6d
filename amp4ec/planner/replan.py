"""Replanning hysteresis: adopt a proposed plan only when it beats the current one by a margin.

Capacity drifts (a node slows down, a pod is throttled) would otherwise make the
operator reshuffle stages on every small change; moving a stage costs a reload. The
gain is measured on the proposed plan's objective, relative to the current plan:

* throughput: ``(proposed.rps − current.rps) / current.rps``
* latency:    ``(current.ms − proposed.ms) / current.ms``
* p95:        ``(current.p95 − proposed.p95) / current.p95``, both simulated at ``rate_rps``
  (``load.latency_under_load``, the seed the p95 search uses)

and a replan happens when it exceeds ``threshold`` (0.1 = 10 %). It always happens
when there is no current plan, when the objective changed, or when the current plan no
longer fits the new capacity (a node gone, or a stage over its node's memory) — checked
by re-pricing it when the new ``blocks``/``nodes`` are passed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from amp4ec.errors import Amp4ecError, InvalidSpec
from amp4ec.planner.cost import INF, CostModel, evaluate
from amp4ec.planner.load import latency_under_load
from amp4ec.planner.tail import SEED
from amp4ec.planner.types import CodecProfile, LayerProfile, Link, NodeCapacity, Plan, Prediction
from amp4ec.planner.validate import check_choice, check_threshold

__all__ = ["gain", "replan_reason", "should_replan"]


def gain(current: Prediction, proposed: Prediction, objective: str) -> float:
    """Relative improvement of ``proposed`` over ``current`` on ``objective`` (> 0: better)."""
    check_choice(objective, "objective", ("throughput", "latency"))
    if objective == "throughput":
        old, new = current.throughput_rps, proposed.throughput_rps
        if old == new:
            return 0.0
        if old <= 0 or math.isinf(new):
            return math.inf
        return (new - old) / old if not math.isinf(old) else -math.inf
    old, new = current.latency_ms, proposed.latency_ms
    if old == new:
        return 0.0
    if old <= 0:
        return -math.inf
    return (old - new) / old


def replan_reason(
    current: Plan | None,
    proposed: Plan,
    threshold: float,
    *,
    blocks: Sequence[LayerProfile] | None = None,
    nodes: Sequence[NodeCapacity] | None = None,
    links: Iterable[Link] = (),
    input_bytes: int = 0,
    default_link: Link | None = None,
    codecs: Sequence[CodecProfile] = (),
    max_error: float | None = None,
    rate_rps: float | None = None,
) -> str | None:
    """Why ``proposed`` should replace ``current`` (a line for logs and events), or None to keep it.

    Pass ``blocks`` and ``nodes`` (and the links, and the codecs with their bound when the
    deployment compresses) of the NEW capacity to re-price ``current`` on it; otherwise
    ``current.predicted`` is compared as it stands. The ``p95`` objective needs ``rate_rps``,
    the rate both plans are simulated at.
    """
    limit = check_threshold(threshold)
    if current is None:
        return "no current plan"
    if current.objective != proposed.objective:
        return f"objective changed from {current.objective} to {proposed.objective}"
    if proposed.objective == "p95":
        return _p95_reason(
            current,
            proposed,
            limit,
            rate_rps,
            blocks,
            nodes,
            links,
            input_bytes,
            default_link,
            codecs,
            max_error,
        )
    before = current.predicted
    if blocks is not None and nodes is not None:
        try:
            before = evaluate(
                current,
                blocks,
                nodes,
                links,
                input_bytes=input_bytes,
                default_link=default_link,
                codecs=codecs,
                max_error=math.inf if max_error is None else max_error,
            )
        except Amp4ecError as exc:
            return f"the current plan no longer fits: {exc}"
    change = gain(before, proposed.predicted, proposed.objective)
    if change > limit:
        return f"{proposed.objective} improves by {_percent(change)} (> {_percent(limit)})"
    return None


def should_replan(
    current: Plan | None,
    proposed: Plan,
    threshold: float,
    *,
    blocks: Sequence[LayerProfile] | None = None,
    nodes: Sequence[NodeCapacity] | None = None,
    links: Iterable[Link] = (),
    input_bytes: int = 0,
    default_link: Link | None = None,
    codecs: Sequence[CodecProfile] = (),
    max_error: float | None = None,
    rate_rps: float | None = None,
) -> bool:
    """True when ``proposed`` should replace ``current`` (see ``replan_reason``)."""
    reason = replan_reason(
        current,
        proposed,
        threshold,
        blocks=blocks,
        nodes=nodes,
        links=links,
        input_bytes=input_bytes,
        default_link=default_link,
        codecs=codecs,
        max_error=max_error,
        rate_rps=rate_rps,
    )
    return reason is not None


def _p95_reason(
    current: Plan,
    proposed: Plan,
    limit: float,
    rate_rps: float | None,
    blocks: Sequence[LayerProfile] | None,
    nodes: Sequence[NodeCapacity] | None,
    links: Iterable[Link],
    input_bytes: int,
    default_link: Link | None,
    codecs: Sequence[CodecProfile],
    max_error: float | None,
) -> str | None:
    """``replan_reason`` for the p95 objective: both plans re-priced as Plans (the simulation
    needs their stages; a plan rebuilt from a status record has only placements), both
    simulated at ``rate_rps``."""
    if rate_rps is None:
        raise InvalidSpec("rate_rps: the p95 objective needs a target rate to compare plans at")
    before, after = current, proposed
    if blocks is not None and nodes is not None:
        try:
            cm = CostModel(
                blocks,
                nodes,
                links,
                input_bytes=input_bytes,
                default_link=default_link,
                codecs=codecs,
                error_limit=INF if max_error is None else max_error,
            )
            before = cm.make_plan(current.objective, current.strategy, cm.to_raw(current))
        except Amp4ecError as exc:
            return f"the current plan no longer fits: {exc}"
        after = cm.make_plan(proposed.objective, proposed.strategy, cm.to_raw(proposed))
    new = latency_under_load(after, rate_rps, seed=SEED).p95_ms
    if before.predicted.throughput_rps < rate_rps <= after.predicted.throughput_rps:
        return f"p95: the current plan no longer sustains {rate_rps:g} req/s"
    old = latency_under_load(before, rate_rps, seed=SEED).p95_ms
    change = (old - new) / old if old > 0 else 0.0
    if change > limit:
        return f"p95 improves by {_percent(change)} (> {_percent(limit)})"
    return None


def _percent(x: float) -> str:
    return "∞" if math.isinf(x) else f"{100 * x:.1f}%"
