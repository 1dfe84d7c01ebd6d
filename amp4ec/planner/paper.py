"""The ``paper`` strategy: AMP4EC's RALOS partitioner and weighted scheduler, as PAPER.md describes them.

1. Capability ``S_i = 0.6·cpu_i/cpu_max + 0.4·mem_i/mem_max`` over the nodes with
   load ≤ 0.8; share ``P_i = S_i / ΣS``; one partition per node, sized for the nodes in
   their given order.
2. Greedy contiguous split: partition i ends at the block boundary whose cumulative
   cost is closest to ``(P_0 + … + P_i)·total`` (every partition keeps ≥ 1 block).
   Layer cost = the profile's ``flops`` (the paper's ``k·k·C_in·C_out`` proxy needs the
   module shapes, which a LayerProfile does not carry; measured ``compute_ms`` if every
   flops is 0).
3. Boundary refinement: move one boundary by one block at a time while that lowers
   ``(1/n)·Σ|L_i − L_avg|`` (hill climbing, first improvement, until none).
4. Weighted scheduler, partitions in order: drop nodes with load > 0.8, nodes lacking the
   partition's memory, and nodes already given a partition (one partition per node, so
   the result is a valid pipeline); score the rest
   ``0.2·S_R + 0.2·(1 − load) + 0.1·S_P + 0.5/(1 + 2·task_count)`` with
   ``S_R = 0.5·min(1, cpu_avail/cpu_need) + 0.5·min(1, mem_avail/mem_need)``,
   ``cpu_avail = cpu·(1 − load)``, ``mem_avail = memory_bytes``,
   ``cpu_need = Σcpu · L_i/total`` (the CPU the partition would take if the cluster's
   CPU were spread by cost), ``mem_need`` = the partition's parameters + peak activation,
   ``S_P = 1/(1 + mean of the node's last 100 execution times in s)`` or 0.5 without
   history. Highest score wins (ties: earlier node); its task count goes up by one.

Not reproduced: the scheduler's 100 ms node-latency filter (no per-node latency input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from amp4ec.errors import PlanInfeasible
from amp4ec.planner.cost import CostModel, Raw, mb
from amp4ec.planner.types import NodeCapacity, SchedulerHistory

__all__ = ["Assignment", "capabilities", "imbalance", "plan_paper", "ralos_split", "schedule"]

LOAD_LIMIT = 0.8
NO_HISTORY_SCORE = 0.5


def capabilities(nodes: Sequence[NodeCapacity]) -> list[float]:
    """``S_i = 0.6·cpu_i/cpu_max + 0.4·mem_i/mem_max`` (a zero maximum contributes 0)."""
    cpu_max = max(n.cpu for n in nodes)
    mem_max = max(n.memory_bytes for n in nodes)
    return [
        0.6 * (n.cpu / cpu_max if cpu_max else 0.0) + 0.4 * (n.memory_bytes / mem_max if mem_max else 0.0)
        for n in nodes
    ]


def imbalance(costs: Sequence[float], ends: Sequence[int], prefix: Sequence[float] | None = None) -> float:
    """``(1/n)·Σ|L_i − L_avg|`` of the partitions ending (exclusive) at ``ends``."""
    if prefix is None:
        prefix = [0.0, *accumulate(costs)]
    loads = [prefix[end] - prefix[start] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    avg = sum(loads) / len(loads)
    return sum(abs(x - avg) for x in loads) / len(loads)


def ralos_split(costs: Sequence[float], shares: Sequence[float]) -> tuple[list[int], list[int]]:
    """(greedy ends, refined ends): exclusive block ends of len(shares) non-empty partitions."""
    B, n = len(costs), len(shares)
    prefix = [0.0, *accumulate(costs)]
    total, share_sum = prefix[-1], float(sum(shares))
    ends, acc, start = [], 0.0, 0
    for i, p in enumerate(shares[:-1]):
        acc += p
        target = total * acc / share_sum
        last = B - (n - 1 - i)
        end = min(range(start + 1, last + 1), key=lambda k: (abs(prefix[k] - target), k))
        ends.append(end)
        start = end
    ends.append(B)
    greedy = list(ends)
    best = imbalance(costs, ends, prefix)
    eps = 1e-12 * max(1.0, total)
    improved, rounds = True, 0
    while improved and rounds < 10 * B * n:
        improved, rounds = False, rounds + 1
        for b in range(n - 1):
            for d in (-1, 1):
                moved = ends[b] + d
                if not (ends[b - 1] if b else 0) < moved < ends[b + 1]:
                    continue
                trial = [*ends[:b], moved, *ends[b + 1 :]]
                score = imbalance(costs, trial, prefix)
                if score < best - eps:
                    ends, best, improved = trial, score, True
    return greedy, ends


@dataclass(frozen=True)
class Assignment:
    """Where the scheduler put one partition, and the scores it compared."""

    partition: int
    node: int
    score: float
    scores: dict[str, float]


def schedule(
    cm: CostModel,
    parts: Sequence[tuple[int, int]],
    costs: Sequence[float],
    candidates: Sequence[int],
    history: SchedulerHistory | None,
) -> list[Assignment]:
    """The weighted scheduler: one node per partition (first..last), in partition order."""
    total = float(sum(costs))
    total_cpu = sum(cm.nodes[n].cpu for n in candidates)
    counts = dict(history.task_counts) if history else {}
    taken: set[int] = set()
    out = []
    for i, (first, last) in enumerate(parts):
        mem_need = cm.memory_bytes(first, last)
        share = sum(costs[first : last + 1]) / total if total else 1.0 / len(parts)
        cpu_need = total_cpu * share
        scores: dict[str, float] = {}
        for n in candidates:
            node = cm.nodes[n]
            if n in taken or node.load > LOAD_LIMIT or node.memory_bytes < mem_need:
                continue
            cpu_avail = node.cpu * (1.0 - node.load)
            s_r = 0.5 * (min(1.0, cpu_avail / cpu_need) if cpu_need > 0 else 1.0) + 0.5 * (
                min(1.0, node.memory_bytes / mem_need) if mem_need > 0 else 1.0
            )
            mean = history.mean_exec_s(node.name) if history else None
            s_p = NO_HISTORY_SCORE if mean is None else 1.0 / (1.0 + mean)
            tasks = counts.get(node.name, 0)
            scores[node.name] = 0.2 * s_r + 0.2 * (1.0 - node.load) + 0.1 * s_p + 0.5 / (1.0 + 2.0 * tasks)
        if not scores:
            raise PlanInfeasible(
                f"paper: no node can take partition {i} (blocks {first}..{last}, needs {mb(mem_need)}): "
                + cm.lacking(mem_need, [n for n in candidates if n not in taken])
            )
        name = max(scores, key=lambda k: scores[k])
        n = cm.index[name]
        taken.add(n)
        counts[name] = counts.get(name, 0) + 1
        out.append(Assignment(i, n, scores[name], scores))
    return out


def plan_paper(
    cm: CostModel, max_stages: int | None = None, history: SchedulerHistory | None = None
) -> tuple[Raw, list[str]]:
    """Partition with RALOS over the eligible nodes, then place partitions with the scheduler."""
    eligible = [n for n in range(cm.N) if cm.nodes[n].load <= LOAD_LIMIT]
    notes = [
        f"paper: node {cm.names[n]} excluded: load {cm.nodes[n].load:.2f} > 0.8"
        for n in range(cm.N)
        if n not in eligible
    ]
    if not eligible:
        raise PlanInfeasible("paper: every node's load is above 0.8")
    cap = min(cm.B, max_stages or cm.N)
    if len(eligible) > cap:
        caps = capabilities([cm.nodes[n] for n in eligible])
        keep = sorted(sorted(range(len(eligible)), key=lambda i: -caps[i])[:cap])
        notes.append(f"paper: {len(eligible) - cap} least capable node(s) get no partition (≤ {cap})")
        eligible = [eligible[i] for i in keep]
    costs: list[float] = [float(b.flops) for b in cm.blocks]
    if not any(costs):
        costs = [b.compute_ms for b in cm.blocks]
        notes.append("paper: every flops is 0; layer cost = compute_ms")
    else:
        notes.append("paper: layer cost = flops (the paper's k·k·Cin·Cout proxy needs module shapes)")
    shares = capabilities([cm.nodes[n] for n in eligible])
    if not any(shares):
        shares = [1.0] * len(eligible)
    _, ends = ralos_split(costs, shares)
    parts = [(start, end - 1) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    assigned = schedule(cm, parts, costs, eligible, history)
    for a in assigned:
        first, last = parts[a.partition]
        notes.append(
            f"paper: partition {a.partition} (blocks {first}..{last}) → {cm.names[a.node]} "
            f"(score {a.score:.3f})"
        )
    return [[(a.node, *parts[a.partition]) for a in assigned]], notes
