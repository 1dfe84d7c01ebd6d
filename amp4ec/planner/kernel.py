"""The DP kernel shared by the exact and the ordered search: value modes and row relaxation.

Costs are integer nanoseconds (``cost.SCALE``), so sums and ties are exact. Modes:

* ``bn``: minimise the slowest stage; a value packs ``bottleneck·K + latency`` so ties
  keep the lower latency seen so far (exact in the bottleneck; the latency part is only
  a proxy because min–max and sum do not compose lexicographically);
* ``sum``: minimise latency among pipelines whose every stage costs ≤ ``cap`` (the
  throughput objective's exact tie-break pass, run with ``cap`` = the optimal bottleneck);
* ``lex``: minimise latency, then the slowest stage, in one pass: a value packs
  ``latency·K + bottleneck``; a larger latency can never be redeemed by later stages,
  so the lexicographic order is preserved and the DP is exact.

A value is an int (ns, or two ns quantities packed with base K) or INF (unreachable).
"""

from __future__ import annotations

from bisect import bisect_right

from amp4ec.planner.cost import INF

__all__ = ["MODES", "SMALL", "combine", "relax", "unpack"]

MODES = ("bn", "sum", "lex")


def unpack(mode: str, value: float, K: int) -> tuple[float, float]:
    """(bottleneck, latency) in ns of a packed ``bn``/``lex`` value."""
    if value >= INF:
        return INF, INF
    hi, lo = divmod(int(value), K)
    return (hi, lo) if mode == "bn" else (lo, hi)


SMALL = 12
"""Ranges shorter than this are relaxed by a scalar loop (cheaper than slicing)."""


def relax(
    tgt: list, mode: str, v: float, cn: list[int], off: int, lo: int, hi: int, cap: float, ret: int, K: int
) -> None:
    """Extend value v by a stage [j, k) costing y + off (y = cn[k]) for every k in [lo, hi]; keep minima.

    Every mode is linear in y on each side of "the stage is no slower than the bottleneck
    so far" (y ≤ thr): below it the value is ``a + y·A``, above it ``b + y·(K+1)``; so
    two list comprehensions (or one short loop) do a whole row.
    """
    B = len(tgt) - 1
    if cap < INF:
        hi = min(hi, bisect_right(cn, cap - off, lo, hi + 1) - 1)
        if hi < lo:
            return
    if mode == "sum":
        A, base, thr = 1, 0, INF
    elif mode == "lex":
        s, m = divmod(v, K)
        A, base, thr = K, s * K, m - off
    else:
        m, base = divmod(v, K)
        A, thr = 1, m - off
    K1 = K + 1
    a, b = v + off * A, base + off * K1
    top = hi if hi < B else B - 1
    if top - lo < SMALL:
        for k in range(lo, top + 1):
            y = cn[k]
            c = a + y * A if y <= thr else b + y * K1
            if c < tgt[k]:
                tgt[k] = c
    else:
        split = bisect_right(cn, thr, lo, top + 1) if thr < INF else top + 1
        if split > lo:
            seg = [a + y for y in cn[lo:split]] if A == 1 else [a + y * A for y in cn[lo:split]]
            tgt[lo:split] = list(map(min, tgt[lo:split], seg))
        if split <= top:
            seg = [b + y * K1 for y in cn[split : top + 1]]
            tgt[split : top + 1] = list(map(min, tgt[split : top + 1], seg))
    if hi == B:
        y = cn[B]
        c = (a + y * A if y <= thr else b + y * K1) + ret * A
        if c < tgt[B]:
            tgt[B] = c


def combine(mode: str, v: float, x: int, last: bool, ret: int, cap: float, K: int) -> float:
    """Scalar twin of ``relax``: v extended by one stage costing x (INF if over ``cap``)."""
    if x > cap:
        return INF
    r = ret if last else 0
    if mode == "sum":
        return v + x + r
    if mode == "lex":
        s, m = divmod(v, K)
        return (s + x + r) * K + max(m, x)
    m, s = divmod(v, K)
    return max(m, x) * K + s + x + r
