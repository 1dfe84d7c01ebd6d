"""The ``p95`` objective: the plan of lowest simulated p95 latency at a target arrival rate.

[Note: p95 search] Throughput-optimal plans on unequal nodes are often whole-model replicas,
and a request sent to the slowest replica waits its whole (long) service time; pooling slow
nodes into one pipeline can shorten the tail at the same rate, or lengthen it (a pipeline's
request crosses every stage). Which one wins depends on the rate, so candidates are
simulated (``load.latency_under_load``: Poisson arrivals, expected-completion dispatch, fixed
seed, so the choice is deterministic) and the lowest p95 wins; ties go to the higher
throughput, then the lower latency, then fewer nodes.

Candidates: the throughput-optimal plan, whole-model replicas, the single fastest pipeline
and, up to ``MAX_EXACT_NODES`` nodes, every split of a subset of the nodes into disjoint
groups, each group running its pipeline of smallest bottleneck (``dp.best_per_mask``, then
the lowest latency under it). Only candidates whose predicted throughput reaches the rate are
simulated (below it the queue grows without bound), and of the groupings only the
``MAX_SIMULATED`` of highest throughput. Not searched: per group any pipeline but the
bottleneck-optimal one, tiled stages, groupings beyond 8 nodes; with pins the plan is one
pipeline (as for the other objectives), the throughput- or latency-optimal one. When no
candidate sustains the rate, the throughput-optimal plan is returned with a note.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import suppress

from amp4ec.errors import PlanInfeasible
from amp4ec.planner import baselines
from amp4ec.planner.cost import INF, CostModel, Raw
from amp4ec.planner.dp import Search, best_per_mask, solve
from amp4ec.planner.load import latency_under_load
from amp4ec.planner.optimal import MAX_EXACT_NODES, plan_optimal
from amp4ec.planner.types import Pin

__all__ = ["MAX_SIMULATED", "SEED", "groupings", "plan_p95"]

MAX_SIMULATED = 16
"""Groupings simulated at most (those of highest predicted throughput that reach the rate):
one simulation of an 8-node plan takes ~10–30 ms, and planning should stay well under a second."""
SEED = 0
"""Seed of every simulation: the same inputs always choose the same plan."""


def groupings(per_mask: Sequence[tuple[float, float]], n_nodes: int) -> Iterator[list[int]]:
    """Every split of a subset of the nodes into disjoint groups (masks) whose pipelines fit
    (``per_mask`` bottleneck < INF): each node joins an earlier group, starts one, or stays out."""

    def extend(node: int, groups: list[int]) -> Iterator[list[int]]:
        if node == n_nodes:
            if groups and all(per_mask[g][0] < INF for g in groups):
                yield list(groups)
            return
        bit = 1 << node
        yield from extend(node + 1, groups)  # left out
        for i, g in enumerate(groups):
            groups[i] = g | bit
            yield from extend(node + 1, groups)
            groups[i] = g
        groups.append(bit)
        yield from extend(node + 1, groups)
        groups.pop()

    yield from extend(0, [])


def plan_p95(
    cm: CostModel, rate_rps: float, max_stages: int | None = None, pins: Sequence[Pin] = ()
) -> tuple[Raw, list[str]]:
    """The p95 objective's pipelines and notes (see [Note: p95 search]); PlanInfeasible if none fits."""
    best_rate, notes = plan_optimal(cm, "throughput", max_stages, pins)
    fixed: list[Raw] = [best_rate]
    with suppress(PlanInfeasible):
        fixed.append(plan_optimal(cm, "latency", max_stages, pins)[0])
    if not pins:
        with suppress(PlanInfeasible):
            fixed.append(baselines.plan_replicate(cm)[0])
    grouped = _grouped(cm, rate_rps, max_stages) if not pins and 1 < cm.N <= MAX_EXACT_NODES else []
    seen: dict[str, float] = {}
    """p95 of each plan simulated, by its sorted pipelines."""
    scored: list[tuple[tuple[float, float, float, int], Raw]] = []
    for raw in [*fixed, *grouped]:
        key = repr(sorted(raw))
        if key in seen:
            continue
        seen[key] = INF
        plan = cm.make_plan("p95", "optimal", raw)
        if plan.predicted.throughput_rps < rate_rps:
            continue
        p95 = seen[key] = latency_under_load(plan, rate_rps, seed=SEED).p95_ms
        nodes = sum(len(p) for p in raw)
        scored.append(((p95, -plan.predicted.throughput_rps, plan.predicted.latency_ms, nodes), raw))
    if not scored:
        most = cm.price(best_rate)[1].throughput_rps
        note = f"p95: no plan sustains {rate_rps:g} req/s (at most {most:.1f}): the throughput-optimal plan"
        return best_rate, [note, *notes]
    (p95, *_), raw = min(scored, key=lambda s: s[0])
    chosen = [f"p95 {p95:.1f} ms predicted at {rate_rps:g} req/s, the lowest of {len(scored)} simulated"]
    other = seen[repr(sorted(best_rate))]
    if sorted(raw) != sorted(best_rate) and other < INF:
        chosen.append(f"the throughput-optimal plan: p95 {other:.1f} ms")
    if pins:
        chosen.append("pins: one pipeline, the throughput- or latency-optimal one")
    elif cm.N > MAX_EXACT_NODES:
        chosen.append(f"{cm.N} nodes > {MAX_EXACT_NODES}: node groupings not searched")
    return raw, chosen + _pipeline_notes(cm, raw)


def _grouped(cm: CostModel, rate_rps: float, max_stages: int | None) -> list[Raw]:
    """The ``MAX_SIMULATED`` groupings of highest throughput ≥ the rate, each as its pipelines."""
    sp = Search(cm, list(range(cm.N)))
    per_mask = best_per_mask(sp, max_stages)
    rates = [1e12 / b if 0 < b < INF else (INF if b == 0 else 0.0) for b, _ in per_mask]
    """Requests per second of each mask's best pipeline (ns bottleneck → req/s)."""
    ranked = sorted(
        (
            (-total, max(per_mask[g][1] for g in groups), groups)
            for groups in groupings(per_mask, cm.N)
            if (total := sum(rates[g] for g in groups)) >= rate_rps
        ),
        key=lambda r: (r[0], r[1], sum(g.bit_count() for g in r[2])),
    )[:MAX_SIMULATED]
    pipelines: dict[int, list[tuple[int, int, int]]] = {}
    out: list[Raw] = []
    for *_, groups in ranked:
        raw: Raw = []
        for g in groups:
            if g not in pipelines:
                b, lat = per_mask[g]
                found = solve(Search(cm, [n for n in range(cm.N) if g >> n & 1]), "sum", b, max_stages, lat)
                pipelines[g] = found[1] if found else []
            if pipelines[g]:
                raw.append(pipelines[g])
        if len(raw) == len(groups):
            out.append(raw)
    return out


def _pipeline_notes(cm: CostModel, raw: Raw) -> list[str]:
    notes = []
    if len(raw) > 1:
        replicas = sum(1 for p in raw if len(p) == 1)
        notes.append(f"{len(raw)} pipelines on disjoint nodes ({replicas} of them whole-model replicas)")
    used = {n for p in raw for n, _, _ in p}
    notes += [f"node {cm.names[n]} left out: it does not lower the p95" for n in range(cm.N) if n not in used]
    return notes
