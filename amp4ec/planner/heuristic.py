"""The optimal strategy's search beyond 8 nodes: a DP over nodes in a fixed speed order, O(N·B²).

Nodes are ordered fastest first (pinned nodes re-slotted so their block ranges stay in
order); a pipeline is any subsequence of that order, each chosen node taking the next
contiguous run of blocks. ``f_t[k]`` = best value covering blocks ``0..k-1`` with the
first t nodes (each used or skipped), so the work is O(N·B²) instead of O(2^N·N²·B²).
The inbound transfer of a stage is taken pessimistically (the slowest link into its node
from any other candidate node); ``evaluate`` re-prices the result with the real links.
For the bottleneck pass a greedy bisection gives an upper bound first, which caps every
stage's cost and prunes most of the B² pairs.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from amp4ec.planner.cost import INF, SCALE, CostModel
from amp4ec.planner.dp import stage_bounds
from amp4ec.planner.kernel import combine, relax, unpack
from amp4ec.planner.types import Pin

__all__ = ["Ordered", "candidates", "ordered_pipeline", "speed_order"]


def speed_order(cm: CostModel, nodes: Sequence[int], pins: Sequence[Pin] = ()) -> list[int]:
    """Nodes fastest first (then larger memory, then input order); each pinned node inserted at
    the position matching where its blocks sit in the model, so others can take the blocks
    before and after it."""
    pinned = [cm.index[p.node] for p in pins]
    order = sorted((n for n in nodes if n not in pinned), key=lambda n: (-cm.speed[n], -cm.memory[n], n))
    slots = [round(len(order) * (p.first_block + p.last_block + 1) / (2 * cm.B)) for p in pins]
    for shift, (n, at) in enumerate(zip(pinned, slots, strict=True)):
        order.insert(at + shift, n)
    return order


class Ordered:
    """Cost tables for one ordered search (positions t = 0..T-1 of ``order``)."""

    def __init__(self, cm: CostModel, order: Sequence[int], pins: Sequence[Pin] = ()) -> None:
        self.cm, self.order, self.B = cm, list(order), cm.B
        self.pinned = {cm.index[p.node] for p in pins}
        self.cint = [cm.cint(n) for n in order]
        self.tclient = [cm.xfer_ns("client", cm.names[n])[0] for n in order]
        self.ret = [cm.ret_ns(n) for n in order]
        bounds = [stage_bounds(cm, n, pins) for n in order]
        self.lo = [b[0] for b in bounds]
        self.hi = [b[1] for b in bounds]
        self.tin: list[list[int]] = []
        for n in order:
            keys: dict[tuple[float, ...], str] = {}
            for p in order:
                if p != n:
                    link = cm.link(cm.names[p], cm.names[n])
                    speed = cm.speed[p] if cm.codecs else 0.0  # a codec's encode runs on the sender
                    keys.setdefault((link.rtt_ms, link.bandwidth_bytes_per_s, speed), cm.names[p])
            rows = [cm.xfer_ns(p, cm.names[n]) for p in keys.values()] or [[0] * self.B]
            self.tin.append(rows[0] if len(rows) == 1 else [max(x) for x in zip(*rows, strict=True)])
        top = max(c[-1] for c in self.cint) + max(max(max(r) for r in self.tin), max(self.tclient))
        self.K = (len(order) + 1) * top + max(self.ret) + 1

    def off(self, t: int, j: int) -> int:
        return (self.tclient[t] if j == 0 else self.tin[t][j]) - self.cint[t][j]

    def greedy_bound(self) -> float:
        """Smallest X (ns, by bisection) for which filling nodes in order with stages ≤ X covers all."""

        def covers(x: float) -> bool:
            j = 0
            for t in range(len(self.order)):
                if j == self.B:
                    break
                lo, hi = self.lo[t][j], self.hi[t][j]
                if lo <= hi:
                    k = min(hi, bisect_right(self.cint[t], x - self.off(t, j), lo, hi + 1) - 1)
                    j = max(j, k)
            return j == self.B

        high = max(c[-1] for c in self.cint) + max(max(r) for r in self.tin) + max(self.tclient)
        if not covers(high):
            return INF
        low = 0
        while high - low > max(1, high // 1000):
            mid = (low + high) // 2
            if covers(mid):
                high = mid
            else:
                low = mid
        return high

    def run(self, mode: str, cap: float = INF, ub: float = INF) -> list[list]:
        """Rows f_0..f_T.

        ``bn`` caps every stage at the best bottleneck found so far (from ``ub``); with a
        stage cap X (``bn``, or ``sum`` with ``cap``), a state that has more compute left
        than the remaining nodes can do in X each is dropped (a band around the diagonal).
        ``sum`` also drops states whose latency cannot finish under ``ub``.
        """
        B, K, T = self.B, self.K, len(self.order)
        ref = [x * SCALE for x in self.cm.prefix_ms]
        left = [0.0] * (T + 1)
        for t in range(T - 1, -1, -1):
            left[t] = left[t + 1] + self.cm.speed[self.order[t]]
        fast = min(self.cint, key=lambda c: c[-1])
        rows = [[0] + [INF] * B]
        best = ub if mode == "bn" else INF
        for t, n in enumerate(self.order):
            prev = rows[-1]
            row = [INF] * (B + 1) if n in self.pinned else list(prev)
            cn, lo, hi, ret, tin = self.cint[t], self.lo[t], self.hi[t], self.ret[t], self.tin[t]
            c = min(cap, best)
            reach = (c + T + 1) * left[t] if c < INF else INF
            for j in range(B):
                v = prev[j]
                if v >= INF or lo[j] > hi[j] or ref[B] - ref[j] > reach:
                    continue
                if mode == "bn" and v // K > best:
                    continue
                if mode == "sum" and ub < INF and v + fast[B] - fast[j] - T > ub:
                    continue
                off = (self.tclient[t] if j == 0 else tin[j]) - cn[j]
                relax(row, mode, v, cn, off, lo[j], hi[j], c, ret, K)
            if mode == "bn" and row[B] < INF:
                best = min(best, row[B] // K)
            rows.append(row)
        return rows

    def backtrack(self, rows: list[list], mode: str, cap: float) -> list[tuple[int, int, int]]:
        t, k = len(self.order), self.B
        v = rows[t][k]
        stages: list[tuple[int, int, int]] = []
        while k > 0:
            n, prev = self.order[t - 1], rows[t - 1]
            if n not in self.pinned and prev[k] == v:
                t -= 1
                continue
            cn = self.cint[t - 1]
            for j in range(k):
                pv = prev[j]
                if pv >= INF or not self.lo[t - 1][j] <= k <= self.hi[t - 1][j]:
                    continue
                x = cn[k] + self.off(t - 1, j)
                if combine(mode, pv, x, k == self.B, self.ret[t - 1], cap, self.K) == v:
                    stages.append((n, j, k - 1))
                    k, v, t = j, pv, t - 1
                    break
            else:  # pragma: no cover - the forward pass guarantees a predecessor
                raise AssertionError("ordered backtrack lost its path")
        return stages[::-1]


def ordered_pipeline(
    cm: CostModel, nodes: Sequence[int], objective: str, pins: Sequence[Pin] = ()
) -> list[tuple[int, int, int]] | None:
    """The best pipeline over ``nodes`` taken in speed order, or None if none fits."""
    if not nodes:
        return None
    od = Ordered(cm, speed_order(cm, nodes, pins), pins)
    B = cm.B
    if objective == "latency":
        rows = od.run("lex")
        return od.backtrack(rows, "lex", INF) if rows[-1][B] < INF else None
    rows = od.run("bn", ub=od.greedy_bound() if not pins else INF)
    if rows[-1][B] >= INF:
        return None
    bottleneck, latency = unpack("bn", rows[-1][B], od.K)
    rows = od.run("sum", cap=bottleneck, ub=latency)
    return od.backtrack(rows, "sum", bottleneck)


def candidates(cm: CostModel, objective: str, max_stages: int | None, pins: Sequence[Pin] = ()) -> list:
    """Heuristic plans (Raw): the ordered pipeline; for throughput without pins also replicas of
    every node that holds the model plus 1, 2, 4 or 8 pipelines over the rest (dealt by speed)."""
    everyone = list(range(cm.N))
    pool = everyone
    if max_stages is not None and max_stages < cm.N:
        pinned = {cm.index[p.node] for p in pins}
        free = [n for n in speed_order(cm, everyone) if n not in pinned][: max(0, max_stages - len(pinned))]
        pool = sorted(pinned | set(free))
    single = ordered_pipeline(cm, pool, objective, pins)
    out = [[single]] if single else []
    if objective == "throughput" and not pins:
        fit = [n for n in everyone if cm.memory[n] >= cm.model_bytes]
        rest = [n for n in speed_order(cm, everyone) if n not in fit]
        replicas = [[(n, 0, cm.B - 1)] for n in fit]
        for k in (1, 2, 4, 8):
            if k > max(1, len(rest)):
                break
            groups = [rest[i::k] for i in range(k)]
            pipes = [ordered_pipeline(cm, g[:max_stages] if max_stages else g, objective) for g in groups]
            out.append(replicas + [p for p in pipes if p])
    return [c for c in out if c]
