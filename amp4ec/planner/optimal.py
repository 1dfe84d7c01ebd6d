"""The ``optimal`` strategy: best pipeline(s) for the objective — exact up to 8 nodes, heuristic beyond.

Throughput: maximise Σ over pipelines of 1000/bottleneck (ties: lower latency, fewer
nodes). Every split of the nodes into disjoint groups, each running its own pipeline,
is a candidate — pure replication (all singleton groups), one pipeline over everything,
and every hybrid in between. Up to ``MAX_EXACT_NODES`` nodes this is exact: one DP pass
(``dp.best_per_mask``) yields each group's best bottleneck, a set-partition DP over the
masks (O(3^N)) picks the groups, and an exact tie-break pass per chosen group minimises
its latency under its bottleneck. With pins there is a single pipeline (a pin fixes
where its blocks run; a replica elsewhere would break it).

Latency: one pipeline, minimising end-to-end latency then its bottleneck (more pipelines
only help under load; the planner reports the single fastest one).

Beyond ``MAX_EXACT_NODES``: the ordered DP of ``heuristic`` (nodes in speed order) for a
single pipeline; for throughput the best of that pipeline, replicas of every node that
holds the model plus pipelines over the rest (1, 2, 4 or 8 groups dealt round-robin by
speed), and every baseline strategy's plan (so it is never worse than any of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress

from amp4ec.errors import PlanInfeasible
from amp4ec.planner import baselines, paper
from amp4ec.planner.cost import INF, SCALE, CostModel, Raw, mb
from amp4ec.planner.dp import Search, best_per_mask, solve
from amp4ec.planner.heuristic import candidates
from amp4ec.planner.types import Pin

__all__ = ["MAX_EXACT_NODES", "best_partition", "plan_optimal"]

MAX_EXACT_NODES = 8


def best_partition(per_mask: Sequence[tuple[float, float]], n_nodes: int) -> list[int]:
    """Disjoint node groups (masks) maximising Σ rate; ties: lower best latency, fewer nodes."""
    keys: list[tuple[int, float, int] | None] = []
    for mask, (bottleneck, latency) in enumerate(per_mask):
        if bottleneck >= INF:
            keys.append(None)
        else:
            rate = 10**18 // bottleneck if bottleneck > 0 else 10**30
            keys.append((int(rate), -latency, -mask.bit_count()))
    full = (1 << n_nodes) - 1
    best: list[tuple[int, float, int]] = [(0, -INF, 0)] * (full + 1)
    pick = [0] * (full + 1)
    for mask in range(1, full + 1):
        low = mask & -mask
        rest = mask ^ low
        top, choice = best[rest], 0
        sub = rest
        while True:
            g = sub | low
            key = keys[g]
            if key is not None:
                other = best[mask ^ g]
                cand = (key[0] + other[0], max(key[1], other[1]), key[2] + other[2])
                if cand > top:
                    top, choice = cand, g
            if not sub:
                break
            sub = (sub - 1) & rest
        best[mask], pick[mask] = top, choice
    groups, mask = [], full
    while mask:
        g = pick[mask]
        if g:
            groups.append(g)
            mask ^= g
        else:
            mask ^= mask & -mask
    return sorted(groups)


def _rank(cm: CostModel, objective: str, raw: Raw) -> tuple[float, float, int]:
    """Sort key of a candidate plan: smaller is better."""
    _, pred = cm.price(raw)
    nodes = sum(len(p) for p in raw)
    if objective == "latency":
        return (pred.latency_ms, pred.bottleneck_ms, nodes)
    return (-pred.throughput_rps, pred.latency_ms, nodes)


def _best(cm: CostModel, objective: str, plans: Sequence[Raw]) -> Raw:
    plans = [p for p in plans if p]
    return min(plans, key=lambda raw: _rank(cm, objective, raw)) if plans else []


def _exact(cm: CostModel, objective: str, max_stages: int | None, pins: Sequence[Pin]) -> Raw:
    everyone = list(range(cm.N))
    sp = Search(cm, everyone, pins)
    # On bigger instances a heuristic incumbent first: its value bounds the exact search.
    incumbent = _best(cm, objective, candidates(cm, objective, max_stages, pins)) if _big(cm) else []
    inc = cm.price(incumbent)[1] if incumbent else None
    slack = 2 * cm.N + 1
    if objective == "latency":
        ub = inc.latency_ms * SCALE * (1 + 1e-9) + slack if inc else INF
        found = solve(sp, "lex", max_stages=max_stages, ub=ub)
        return _best(cm, objective, [[found[1]] if found else [], incumbent])
    hybrid = not pins and cm.N > 1
    if hybrid:
        per_mask = _hybrid_masks(cm, sp, max_stages, inc.throughput_rps if inc else 0.0)
    else:
        ub = inc.bottleneck_ms * SCALE * (1 + 1e-9) + slack if inc else INF
        per_mask = best_per_mask(sp, max_stages, ub=ub)
    if all(b >= INF for b, _ in per_mask):
        return incumbent
    if hybrid:
        groups = best_partition(per_mask, cm.N)
    else:
        groups = [min(range(len(per_mask)), key=lambda m: (per_mask[m], m.bit_count()))]
    raw: Raw = []
    if len(groups) == 1:
        b, lat = per_mask[groups[0]]
        found = solve(sp, "sum", cap=b, max_stages=max_stages, ub=lat)
        raw = [found[1]] if found else []
    else:
        for g in groups:
            b, lat = per_mask[g]
            found = solve(Search(cm, [n for n in everyone if g >> n & 1]), "sum", b, max_stages, lat)
            if found:
                raw.append(found[1])
    return _best(cm, objective, [raw, incumbent])


def _hybrid_masks(cm: CostModel, sp: Search, max_stages: int | None, known_rps: float) -> list:
    """``best_per_mask`` bounded by a total rate: first an optimistic guess between the known
    rate and perfect balance (valid if the result reaches it), else the rate it did find."""
    if known_rps <= 0 or cm.prefix_ms[-1] <= 0:
        return best_per_mask(sp, max_stages, hybrid=True)
    ideal = 1000.0 * sum(cm.speed) / cm.prefix_ms[-1]
    guess = known_rps + 0.75 * max(0.0, ideal - known_rps)
    per_mask = best_per_mask(sp, max_stages, hybrid=True, rate_lb=guess / 1e9)
    found = sum(1e9 / per_mask[g][0] if per_mask[g][0] else INF for g in best_partition(per_mask, cm.N))
    if found >= guess:
        return per_mask
    return best_per_mask(sp, max_stages, hybrid=True, rate_lb=max(found, known_rps) / 1e9)


def _big(cm: CostModel) -> bool:
    """Whether the exact search is large enough for a heuristic incumbent to pay off."""
    return (1 << cm.N) * cm.B * cm.B > 50_000


def _heuristic(cm: CostModel, objective: str, max_stages: int | None, pins: Sequence[Pin]) -> Raw:
    plans = candidates(cm, objective, max_stages, pins)
    if not pins:
        for fn in (
            lambda: baselines.plan_equal(cm, max_stages),
            lambda: baselines.plan_memory(cm, max_stages),
            lambda: baselines.plan_monolith(cm, objective),
            lambda: paper.plan_paper(cm, max_stages),
        ):
            with suppress(PlanInfeasible):
                plans.append(fn()[0])
        if objective == "throughput":
            with suppress(PlanInfeasible):
                plans.append(baselines.plan_replicate(cm)[0])
    return _best(cm, objective, plans)


def plan_optimal(
    cm: CostModel, objective: str, max_stages: int | None = None, pins: Sequence[Pin] = ()
) -> tuple[Raw, list[str]]:
    """The optimal strategy's pipelines and notes; PlanInfeasible with the reason if none fits."""
    if len(pins) > (max_stages or len(pins)):
        raise PlanInfeasible(f"pinned: {len(pins)} pins need {len(pins)} stages but max_stages={max_stages}")
    for i, pin in enumerate(pins):
        n, need = cm.index[pin.node], cm.memory_bytes(pin.first_block, pin.last_block)
        if need > cm.memory[n]:
            raise PlanInfeasible(
                f"pinned[{i}]: blocks {pin.first_block}..{pin.last_block} need {mb(need)} but node "
                f"{pin.node!r} has {mb(cm.memory[n])} (lacks {mb(need - cm.memory[n])})"
            )
    exact = cm.N <= MAX_EXACT_NODES
    raw = (_exact if exact else _heuristic)(cm, objective, max_stages, pins)
    if not raw:
        reason = cm.why_infeasible(max_stages)
        if pins:
            reason = f"no placement honours the pins ({_describe(pins)}); {reason}"
        raise PlanInfeasible(reason)
    notes = [] if exact else [f"{cm.N} nodes > {MAX_EXACT_NODES}: heuristic (nodes in speed order)"]
    if len(raw) > 1:
        replicas = sum(1 for p in raw if len(p) == 1)
        kind = (
            "replicas of the whole model"
            if replicas == len(raw)
            else f"{replicas} of them whole-model replicas"
        )
        notes.append(f"{len(raw)} pipelines on disjoint nodes ({kind}); their throughputs add up")
    used = {n for p in raw for n, _, _ in p}
    for n in range(cm.N):
        if n in used:
            continue
        if all(cm.kmax(n)[j] <= j for j in range(cm.B)):
            notes.append(f"node {cm.names[n]} left out: it cannot hold any single block")
        else:
            notes.append(f"node {cm.names[n]} left out: it does not improve the {objective}")
    return raw, notes


def _describe(pins: Sequence[Pin]) -> str:
    return ", ".join(f"blocks {p.first_block}..{p.last_block} on {p.node}" for p in pins)
