"""Baseline strategies the optimal planner is measured against: equal, memory, replicate, monolith."""

from __future__ import annotations

from collections.abc import Sequence

from amp4ec.errors import PlanInfeasible
from amp4ec.planner.cost import CostModel, Raw, mb

__all__ = ["equal_split", "plan_equal", "plan_memory", "plan_monolith", "plan_replicate", "weighted_split"]


def weighted_split(B: int, weights: Sequence[float]) -> list[int]:
    """Exclusive block ends of a contiguous split where part i gets about weights[i]/Σ of B blocks.

    Cumulative rounding (round half up) so the parts sum to B exactly; a part may be empty.
    """
    total = float(sum(weights))
    ends, acc = [], 0.0
    for w in weights:
        acc += w
        ends.append(min(B, int(B * acc / total + 0.5)))
    ends[-1] = B
    return ends


def equal_split(B: int, parts: int) -> list[int]:
    """Exclusive block ends of ``parts`` equal parts; the first ``B % parts`` get one block more."""
    ends, end = [], 0
    for i in range(parts):
        end += B // parts + (1 if i < B % parts else 0)
        ends.append(end)
    return ends


def _split_plan(
    cm: CostModel, nodes: list[int], weights: dict[int, float] | None, label: str
) -> tuple[Raw, list[str]]:
    """Split over ``nodes`` in order (equal parts, or by ``weights``); a node that cannot hold
    its part is dropped and the split redone over the rest; empty parts are left out."""
    notes: list[str] = []
    active = list(nodes)
    while active:
        if weights is None:
            ends = equal_split(cm.B, len(active))
        else:
            ends = weighted_split(cm.B, [weights[n] for n in active])
        stages, start, failed = [], 0, None
        for n, end in zip(active, ends, strict=True):
            if end <= start:
                continue
            need = cm.memory_bytes(start, end - 1)
            if need > cm.memory[n]:
                failed = (n, start, end - 1, need)
                break
            stages.append((n, start, end - 1))
            start = end
        if failed is None:
            used = {s[0] for s in stages}
            notes += [
                f"{label}: node {cm.names[n]} left out: its share rounds to zero blocks"
                for n in active
                if n not in used
            ]
            return [stages], notes
        n, first, last, need = failed
        notes.append(
            f"{label}: node {cm.names[n]} left out: blocks {first}..{last} need {mb(need)}, "
            f"it has {mb(cm.memory[n])} (lacks {mb(need - cm.memory[n])})"
        )
        active.remove(n)
    raise PlanInfeasible(f"{label}: no node subset holds its share of the model; " + "; ".join(notes))


def plan_equal(cm: CostModel, max_stages: int | None = None) -> tuple[Raw, list[str]]:
    """Equal block counts over the nodes in the given order (at most max_stages; nodes beyond
    the B-th get nothing)."""
    cap = min(cm.N, max_stages or cm.N)
    nodes = list(range(cap))
    notes = [f"equal: uses the first {cap} of {cm.N} nodes"] if cap < cm.N else []
    raw, more = _split_plan(cm, nodes, None, "equal")
    return raw, notes + more


def plan_memory(cm: CostModel, max_stages: int | None = None) -> tuple[Raw, list[str]]:
    """Blocks split in proportion to each node's memory, in the given order (as exo does)."""
    cap = min(cm.N, max_stages or cm.N)
    nodes = list(range(cap))
    notes = [f"memory: uses the first {cap} of {cm.N} nodes"] if cap < cm.N else []
    weights = {n: float(cm.memory[n]) for n in nodes}
    if not any(weights.values()):
        weights = dict.fromkeys(nodes, 1.0)
    raw, more = _split_plan(cm, nodes, weights, "memory")
    return raw, notes + more


def _fitting(cm: CostModel, label: str) -> list[int]:
    fit = [n for n in range(cm.N) if cm.memory[n] >= cm.model_bytes]
    if not fit:
        raise PlanInfeasible(
            f"{label}: no node can hold the whole model ({mb(cm.model_bytes)}): "
            + cm.lacking(cm.model_bytes, range(cm.N))
        )
    return fit


def plan_replicate(cm: CostModel) -> tuple[Raw, list[str]]:
    """Every node that holds the whole model runs all of it; each request goes to the replica
    expected to answer first."""
    fit = _fitting(cm, "replicate")
    notes = [
        f"replicate: node {cm.names[n]} left out: lacks {mb(cm.model_bytes - cm.memory[n])} for the model"
        for n in range(cm.N)
        if n not in fit
    ]
    return [[(n, 0, cm.B - 1)] for n in fit], notes


def plan_monolith(cm: CostModel, objective: str) -> tuple[Raw, list[str]]:
    """The single node that serves the whole model best (by the objective's metric)."""
    fit = _fitting(cm, "monolith")

    def key(n: int) -> tuple[float, float]:
        stage = cm.compute_ms(n, 0, cm.B - 1) + cm.transfer_ms(-1, n, 0) + cm.overhead[n]
        latency = stage + cm.return_ms(n)
        return (latency, stage) if objective == "latency" else (stage, latency)

    best = min(fit, key=key)
    return [[(best, 0, cm.B - 1)]], [f"monolith: the whole model on {cm.names[best]}"]
