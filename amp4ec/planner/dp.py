"""Exact single-pipeline search: DP over (set of used nodes, class of the last node, blocks covered).

A pipeline is an ordered choice of distinct nodes, each taking the next contiguous run of
blocks. ``f[mask][c][k]`` is the best value of a partial pipeline that used exactly the
nodes in ``mask``, covered blocks ``0..k-1`` and ended on a node of link class ``c``. A
stage's inbound transfer depends on the previous node only through its outbound links,
so nodes whose links to every other node agree share a class; with uniform links (the
common case: nothing declared) there is one class and the state is (mask, k).

Costs are integer nanoseconds (``cost.SCALE``) so sums and ties are exact; the value
modes (``bn``, ``sum``, ``lex``) and the row relaxation live in ``kernel``.

Work: Σ over (mask, class, next node) of the blocks² pairs, i.e. O(2^N · N · C · B²)
with the inner k-loop vectorised by list comprehensions, cut down by the exact bounds
of ``forward`` (incumbent values, stage caps, compute-left bands); used for N ≤ 8.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from amp4ec.planner.cost import INF, SCALE, CostModel
from amp4ec.planner.kernel import combine, relax, unpack
from amp4ec.planner.types import Pin

__all__ = ["Search", "best_per_mask", "link_classes", "solve", "stage_bounds"]


def link_classes(cm: CostModel, nodes: Sequence[int]) -> list[int]:
    """Class per node: p and q share one when every link p→n equals q→n (n ∉ {p, q}) and, when
    codecs may compress a cut, their speeds are equal too (the sender encodes)."""

    def key(p: int, n: int) -> tuple[float, ...]:
        link = cm.link(cm.names[p], cm.names[n])
        return (link.rtt_ms, link.bandwidth_bytes_per_s, cm.speed[p] if cm.codecs else 0.0)

    members: list[list[int]] = []
    out = []
    for p in nodes:
        for c, group in enumerate(members):
            if all(key(p, n) == key(q, n) for q in group for n in nodes if n not in (p, q)):
                group.append(p)
                out.append(c)
                break
        else:
            members.append([p])
            out.append(len(members) - 1)
    return out


def stage_bounds(cm: CostModel, n: int, pins: Sequence[Pin]) -> tuple[list[int], list[int]]:
    """Per first block j, the allowed exclusive ends [lo[j], hi[j]] of a stage on node n."""
    B = cm.B
    kmax = cm.kmax(n)
    if not pins:
        return list(range(1, B + 2)), kmax
    lo, hi = list(range(1, B + 2)), list(kmax)
    mine = [p for p in pins if p.node == cm.names[n]]
    if mine:
        a, b = mine[0].first_block, mine[0].last_block
        hi = list(range(B + 1))
        if kmax[a] >= b + 1:
            lo[a] = hi[a] = b + 1
        return lo, hi
    nxt = B
    for j in range(B - 1, -1, -1):
        pin = next((p for p in pins if p.first_block <= j <= p.last_block), None)
        if pin is not None:
            hi[j] = j
            nxt = pin.first_block
        else:
            hi[j] = min(hi[j], nxt)
    return lo, hi


@dataclass
class Search:
    """The nodes one search may use (local index ln = position) and their cost tables."""

    cm: CostModel
    nodes: list[int]
    pins: Sequence[Pin] = ()

    def __post_init__(self) -> None:
        cm, nodes = self.cm, self.nodes
        self.B = cm.B
        self.cls = link_classes(cm, nodes)
        self.n_cls = max(self.cls) + 1
        self.cint = [cm.cint(n) for n in nodes]
        self.speed = [cm.speed[n] for n in nodes]
        self.tclient = [cm.xfer_ns("client", cm.names[n])[0] for n in nodes]
        self.ret = [cm.ret_ns(n) for n in nodes]
        bounds = [stage_bounds(cm, n, self.pins) for n in nodes]
        self.lo = [b[0] for b in bounds]
        self.hi = [b[1] for b in bounds]
        self.tin: list[list[list[int]]] = []
        for c in range(self.n_cls):
            row = []
            for ln, n in enumerate(nodes):
                rep = next((nodes[q] for q in range(len(nodes)) if self.cls[q] == c and q != ln), None)
                row.append(cm.xfer_ns(cm.names[rep], cm.names[n]) if rep is not None else [])
            self.tin.append(row)
        most = max((max(x) for r in self.tin for x in r if x), default=0)
        top = max(c[-1] for c in self.cint) + max(most, max(self.tclient))
        self.K = (len(nodes) + 1) * top + max(self.ret) + 1
        """Packing base of ``bn``/``lex`` values: larger than any stage cost or latency."""
        fast = min(self.cint, key=lambda c: c[-1])
        slack = 2 * len(nodes) + 1
        self.rest_lb = [max(0, fast[-1] - x - slack) + min(self.ret) for x in fast]
        """Per blocks covered, a lower bound (ns) on the rest of any pipeline's latency."""


def _submask_best(h: list[float], mask: int) -> float:
    """Best sum of h over splits of ``mask`` into two non-empty parts."""
    low = mask & -mask
    rest = mask ^ low
    best = 0.0
    sub = rest
    while sub:
        g = sub | low
        if g != mask:
            best = max(best, h[g] + h[mask ^ g])
        sub = (sub - 1) & rest
    return max(best, h[low] + h[rest]) if rest else best


def forward(
    sp: Search,
    mode: str,
    cap: float = INF,
    max_stages: int | None = None,
    ub: float = INF,
    hybrid: bool = False,
    rate_lb: float = 0.0,
) -> list[dict[int, list]]:
    """Fill ``f[mask][class]`` (lists over blocks covered) for every mask in increasing order.

    Branch and bound, exact for what the caller asks:

    * ``sum``/``lex`` (and ``bn`` without ``hybrid``) keep the best complete primary value
      seen (``ub`` to start with) and drop states that cannot finish under it; for
      latency the rest is bounded below by the fastest node's compute.
    * ``bn`` with ``hybrid``: a pipeline over nodes g is only worth keeping if it beats
      the best split of g into smaller pipelines; with ``h[m]`` the best total rate of
      any split of the nodes in m (kept incrementally, O(3^N)), a partial pipeline over m
      with bottleneck M ending in g ⊋ m is dropped when ``1/M < h[m]`` and a stage into
      node n is capped at ``1/(h[m] + h[{n}])``. Values of dominated masks become INF.
      With ``rate_lb`` (1/ns, a total rate some plan achieves), a group g of the optimal
      split needs ``rate(g) ≥ rate_lb − Σ_{n∉g} speed_n/total`` (no group beats perfect
      balance), which caps the stages of any pipeline growing out of m the same way.
    * Every stage cap X also drops states with more compute left than the unused nodes
      can do in X each.
    """
    L, B, K = len(sp.nodes), sp.B, sp.K
    limit = L if max_stages is None else min(L, max_stages)
    lbr = sp.rest_lb
    tol = 1 + 1e-9
    ref = [x * SCALE for x in sp.cm.prefix_ms]
    slack = 2 * L + 1
    f: list[dict[int, list]] = [{} for _ in range(1 << L)]
    for ln in range(L):
        row = [INF] * (B + 1)
        cn = sp.cint[ln]
        if sp.lo[ln][0] <= sp.hi[ln][0]:
            relax(row, mode, 0, cn, sp.tclient[ln] - cn[0], sp.lo[ln][0], sp.hi[ln][0], cap, sp.ret[ln], K)
        f[1 << ln][sp.cls[ln]] = row
    h = [0.0] * (1 << L) if hybrid else []
    best = ub
    all_speed = sum(sp.speed)
    # Rate bound per unit of speed (1/ns), inflated for the ns rounding of stage costs.
    eps = 1e-6 + 2 * slack * all_speed / ref[B] if ref[B] > 0 else 1.0
    per_speed = (1 + eps) / ref[B] if rate_lb > 0 and eps < 0.1 else 0.0
    floor = rate_lb * (1 - 1e-6)

    def need(m: int) -> float:
        """Rate a pipeline over nodes ⊇ m must reach to be in a split beating ``rate_lb``
        given that nodes outside it reach at most their perfect-balance rate."""
        return floor - (all_speed - sum(sp.speed[q] for q in range(L) if m >> q & 1)) * per_speed

    def need_cap(m: int) -> float:
        """Largest useful bottleneck of a pipeline over exactly the nodes m."""
        n = need(m) if per_speed else 0.0
        return tol / n if n > 0 else INF

    def balanced(vals: list, live: list[int], m: int, room: float) -> list[int]:
        """Keep states (j, bottleneck M) that some group g ⊇ m could finish usefully: with
        x the speed added, rate ≤ 1/M and rate ≤ x/(compute left) must reach need(m) + x·per_speed."""
        a = need(m)
        if a <= 0:
            return live
        keep = []
        for j in live:
            M = vals[j] // K
            upper = min(room, (1.0 / M - a) / per_speed) if M > 0 else room
            left = ref[B] - ref[j] - all_speed
            if left > 0:
                slope = 1.0 / left - per_speed
                if slope <= 0:
                    continue
                lower = a / slope
            else:
                lower = 0.0
            if lower <= upper * tol + 1e-12:
                keep.append(j)
        return keep

    for mask in range(1, 1 << L):
        done = min((row[B] for row in f[mask].values()), default=INF)
        own = INF if done >= INF else (done if mode == "sum" else done // K)
        if hybrid:
            h[mask] = max(INF if own == 0 else 1.0 / own, _submask_best(h, mask))
        else:
            best = min(best, own)
        if mask.bit_count() >= limit:
            continue
        if hybrid:
            stage_cap = min(cap, tol / h[mask] if h[mask] > 0 else INF, need_cap(mask))
        else:
            stage_cap = min(cap, best) if mode == "bn" else cap
        free = sorted((sp.speed[q] for q in range(L) if not mask >> q & 1), reverse=True)
        room = sum(free[: limit - mask.bit_count()])
        first = 1
        if stage_cap < INF:
            first = max(1, bisect_left(ref, ref[B] - (stage_cap + slack) * room))
        for c, vals in f[mask].items():
            if mode == "bn":
                live = [j for j in range(first, B) if vals[j] // K <= stage_cap]
                if hybrid and per_speed and live:
                    live = balanced(vals, live, mask, room)
            elif best < INF:
                live = [
                    j
                    for j in range(first, B)
                    if (vals[j] if mode == "sum" else vals[j] // K) + lbr[j] <= best
                ]
            else:
                live = [j for j in range(first, B) if vals[j] < INF]
            if not live:
                continue
            tin_c = sp.tin[c]
            for ln in range(L):
                if mask >> ln & 1:
                    continue
                cn, t, lo, hi, ret = sp.cint[ln], tin_c[ln], sp.lo[ln], sp.hi[ln], sp.ret[ln]
                cap_t = cap
                if hybrid:
                    split = h[mask] + h[1 << ln]
                    cap_t = min(cap, tol / split if split > 0 else INF, need_cap(mask | 1 << ln))
                elif mode == "bn":
                    cap_t = min(cap, best)
                nxt = f[mask | 1 << ln]
                tgt = nxt.get(sp.cls[ln])
                if tgt is None:
                    tgt = nxt[sp.cls[ln]] = [INF] * (B + 1)
                a = need(mask | 1 << ln) if hybrid and per_speed else 0.0
                for j in live:
                    low, v = lo[j], vals[j]
                    if a > 0:  # the new state must leave little enough compute for the rest
                        M = v // K
                        room_m = min(room, (1.0 / M - a) / per_speed) if M > 0 else room
                        if room_m <= 0:
                            continue
                        low = max(low, bisect_left(ref, ref[B] - all_speed - 1.0 / (per_speed + a / room_m)))
                    if low <= hi[j]:
                        relax(tgt, mode, v, cn, t[j] - cn[j], low, hi[j], cap_t, ret, K)
    return f


def backtrack(
    sp: Search, f: list[dict[int, list]], mode: str, cap: float, mask: int, c: int
) -> list[tuple[int, int, int]]:
    """Stages (global node, first, last) of the pipeline ending in state (mask, c, B)."""
    k, v = sp.B, f[mask][c][sp.B]
    stages: list[tuple[int, int, int]] = []
    while mask:
        step = None
        for ln in (q for q in range(len(sp.nodes)) if mask >> q & 1 and sp.cls[q] == c):
            cn, bit = sp.cint[ln], 1 << ln
            prevs = [(-1, 0)] if mask == bit else list(f[mask ^ bit].items())
            for j in [0] if mask == bit else range(1, k):
                if not sp.lo[ln][j] <= k <= sp.hi[ln][j]:
                    continue
                for c2, row in prevs:
                    pv = 0 if c2 < 0 else row[j]
                    t = sp.tclient[ln] if c2 < 0 else sp.tin[c2][ln][j]
                    x = cn[k] - cn[j] + t
                    if pv < INF and combine(mode, pv, x, k == sp.B, sp.ret[ln], cap, sp.K) == v:
                        step = (ln, j, c2, pv)
                        break
                if step:
                    break
            if step:
                break
        if step is None:  # pragma: no cover - the forward pass guarantees a predecessor
            raise AssertionError("dp backtrack lost its path")
        ln, j, c, v = step
        stages.append((sp.nodes[ln], j, k - 1))
        mask ^= 1 << ln
        k = j
    return stages[::-1]


def best_per_mask(
    sp: Search, max_stages: int | None = None, hybrid: bool = False, ub: float = INF, rate_lb: float = 0.0
) -> list[tuple[float, float]]:
    """Per mask of local nodes: (smallest bottleneck, a latency at it) in ns, using exactly them.

    With ``hybrid``, masks whose best pipeline cannot beat splitting them into smaller
    pipelines (replicas included) come back as (INF, INF).
    """
    f = forward(sp, "bn", max_stages=max_stages, ub=ub, hybrid=hybrid, rate_lb=rate_lb)
    return [unpack("bn", min((row[sp.B] for row in fm.values()), default=INF), sp.K) for fm in f]


def solve(
    sp: Search, mode: str, cap: float = INF, max_stages: int | None = None, ub: float = INF
) -> tuple[float, list[tuple[int, int, int]]] | None:
    """The best complete pipeline in ``mode`` (ties: fewer nodes), or None if none fits."""
    f = forward(sp, mode, cap, max_stages, ub)
    best = None
    for mask, fm in enumerate(f):
        for c, row in fm.items():
            key = (row[sp.B], mask.bit_count(), mask)
            if row[sp.B] < INF and (best is None or key < best[0]):
                best = (key, c)
    if best is None:
        return None
    (value, _, mask), c = best
    return value, backtrack(sp, f, mode, cap, mask, c)
