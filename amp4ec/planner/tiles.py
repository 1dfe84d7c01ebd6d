"""Tile groups: a model's leading convolutional blocks split into row stripes over several nodes.

Why: a layer-wise split runs every block of a request one after another, so one request is
never faster than on the fastest node alone. Tiles split the work of one request (DeepThings'
fused tile partitioning): each node computes a stripe of rows, reading its input rows plus
the halo its receptive field needs, and the stage's node stitches the stripes.

A tiled stage on node ``c`` with tile nodes ``T`` (``c`` in ``T``) runs the tileable prefix
as a sequence of *phases* (blocks ``i..j`` tiled: scatter, compute, gather, stitch) and
segments ``c`` runs alone, then the rest of the model on ``c``. Stitching resets the halo, so
several short phases beat one deep one when the halo would outgrow the stripes. A phase costs:

- stripes of block ``j``'s output with heights proportional to node speed;
- each stripe's rows at every earlier cut from the blocks' ``TileRows`` (the halo);
- a block's work on a stripe (``TileRows.work``): a measured fixed part of its compute time
  that every tile pays (weights streamed, per-op overhead: it dominates the small feature maps
  where tiles end), plus the rest × the mean of the stripe's input and output row fractions;
- another node's tile: scatter (its input rows over ``c``→node) + its agent's per-request
  overhead + compute + gather (its output rows back), plus encoding and decoding both frames
  (``TileRows.codec_ns_per_byte``, measured by the profiler: half at each end); ``c``'s own
  tile: compute plus one per-request overhead per other tile (it sends a frame and relays an
  answer for each) plus ``c``'s half of every frame's codec, which shares ``c``'s CPU;
- the phase: its slowest tile.

``tiled_stage`` prices a placed tiled stage the same way, so ``evaluate`` and re-planning
compare a deployed tiled plan on the model that chose it.

A dynamic programme over phase boundaries picks the phases; the stage is the inbound transfer
+ ``c``'s overhead + its phases and segments + the rest. Throughput: the busiest node's time
per request bounds the rate. The planner compares these candidates with the best layer-wise
plan by the objective, so on slow links, where scatter and gather cost more than they save,
tiles lose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from amp4ec.errors import InvalidSpec
from amp4ec.planner.cost import CostModel
from amp4ec.planner.types import Pipeline, Prediction, Stage, TileGroup

__all__ = [
    "MAX_TILE_NODES",
    "TILE_MARGIN",
    "TiledCandidate",
    "best_tiled",
    "split_rows",
    "tileable_prefix",
    "tiled_stage",
]

TILE_MARGIN = 0.9
"""A tiled plan is chosen only when its prediction beats the layer-wise plan's by 10%: it puts
every tile node on each request's path (one slow or lost node delays every request), and its
phases' nodes compute at once, which a node shared with other work does not always allow. On
a 2-core VM, ResNet-50 tiled for a predicted 2% gain measured 1.05× the fastest node alone,
within the ±5–15% that identical plans spread there (docs/benchmarks.md, tiles)."""

MAX_TILE_NODES = 4
"""Tile groups are drawn from the fastest four nodes (11 groups): beyond, a stripe's halo
outgrows its rows on the small feature maps tiles end at, and planning stays fast."""


def split_rows(height: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """``height`` rows cut into ``len(weights)`` stripes proportional to ``weights``, top first,
    each at least one row (the largest remainders get the leftover rows)."""
    n = len(weights)
    if n < 1 or n > height or any(not w > 0 for w in weights):
        raise InvalidSpec(f"tiles: cannot cut {height} rows into {n} stripes weighted {list(weights)}")
    total = sum(weights)
    raw = [height * w / total for w in weights]
    sizes = [max(1, math.floor(r)) for r in raw]
    while sum(sizes) > height:  # the floor of one row overshot: take from the largest
        sizes[sizes.index(max(sizes))] -= 1
    for i in sorted(range(n), key=lambda i: raw[i] - sizes[i], reverse=True)[: height - sum(sizes)]:
        sizes[i] += 1
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [(bounds[i], bounds[i + 1]) for i in range(n)]


def tileable_prefix(cm: CostModel) -> int:
    """How many leading blocks carry tile geometry."""
    k = 0
    while k < cm.B and cm.blocks[k].tile is not None:
        k += 1
    return k


@dataclass(frozen=True)
class TiledCandidate:
    """A priced single-pipeline plan whose only stage is tiled."""

    stage: Stage
    latency_ms: float
    busy_ms: float
    """The busiest node's time per request (bounds throughput)."""

    def prediction(self) -> Prediction:
        return Prediction(
            stage_ms=(self.stage.stage_ms,),
            bottleneck_ms=self.busy_ms,
            latency_ms=self.latency_ms,
            throughput_rps=1000.0 / self.busy_ms if self.busy_ms > 0 else math.inf,
        )

    def pipeline(self) -> Pipeline:
        return Pipeline((self.stage,))


@dataclass(frozen=True)
class _Phase:
    first: int
    last: int
    rows: tuple[tuple[int, int], ...]
    tile_ms: tuple[float, ...]
    busy_ms: tuple[float, ...]
    """Per tile node (in ``ordered`` order), its own time on the phase."""


Walk = list[tuple[float, tuple[int, int]]]
"""For one stripe of block ``j``'s output: per first block ``i`` (index), the reference-core
work of blocks ``i..j`` on it and the input rows of block ``i`` it reads."""


def _walk(cm: CostModel, j: int, rows: tuple[int, int]) -> Walk:
    """Walk back from block ``j``'s output ``rows``: every phase ``i..j`` at once."""
    work, out, walk = 0.0, rows, []
    for i in range(j, -1, -1):
        g = cm.blocks[i].tile
        assert g is not None
        work += g.work(cm.blocks[i].compute_ms, out)
        out = g.needs(*out)
        walk.append((work, out))
    return walk[::-1]


def _codec_ms(cm: CostModel, nbytes: int, ns_per_byte: float, n: int) -> float:
    """Half of a frame's measured encode + decode (one end's part) on node ``n``."""
    return nbytes * ns_per_byte * 1e-6 / 2 / cm.speed[n]


def _phase(
    cm: CostModel,
    coord: int,
    ordered: Sequence[int],
    i: int,
    j: int,
    rows: Sequence[tuple[int, int]],
    walks: Sequence[Walk],
) -> _Phase:
    """Blocks ``i..j`` tiled with ``rows`` of block ``j``'s output per node of ``ordered``.

    A remote tile: the stage's node encodes its input rows (cut out of the full tensor),
    the link carries them, the tile decodes them, computes, encodes its output rows, the link
    carries them back and the stage's node decodes them (``TileRows.codec_ns_per_byte``,
    half at each end). The stage's own tile shares its node's CPU with that encoding and
    decoding for every other tile, so they add to its time."""
    names = cm.names
    first, last = cm.blocks[i].tile, cm.blocks[j].tile
    assert first is not None and last is not None
    tile_ms: list[float] = []
    busy: list[float] = []
    coord_codec = 0.0
    for n, r, walk in zip(ordered, rows, walks, strict=True):
        work, (lo, hi) = walk[i]
        compute = work / cm.speed[n]
        if n == coord:
            tile_ms.append(compute)
            busy.append(compute)
            continue
        in_bytes = round(cm.in_bytes[i] * (hi - lo) / first.in_height)
        out_bytes = round(cm.blocks[j].out_bytes * (r[1] - r[0]) / last.out_height)
        here = _codec_ms(cm, in_bytes, first.codec_ns_per_byte, coord)
        here += _codec_ms(cm, out_bytes, last.codec_ns_per_byte, coord)
        there = _codec_ms(cm, in_bytes, first.codec_ns_per_byte, n)
        there += _codec_ms(cm, out_bytes, last.codec_ns_per_byte, n)
        scatter = cm.link(names[coord], names[n]).transfer_ms(in_bytes)
        gather = cm.link(names[n], names[coord]).transfer_ms(out_bytes)
        coord_codec += here
        tile_ms.append(here + scatter + cm.overhead[n] + there + compute + gather)
        busy.append(cm.overhead[n] + there + compute)
    own = ordered.index(coord)
    peers = len(ordered) - 1
    tile_ms[own] += peers * cm.overhead[coord] + coord_codec
    busy[own] += peers * cm.overhead[coord] + coord_codec
    return _Phase(i, j, tuple(rows), tuple(tile_ms), tuple(busy))


def _phases(cm: CostModel, coord: int, ordered: Sequence[int], prefix: int) -> list[list[_Phase | None]]:
    """``table[i][j]``: the phase tiling blocks i..j with stripes proportional to node speed
    (None where a stripe would be empty)."""
    table: list[list[_Phase | None]] = [[None] * prefix for _ in range(prefix)]
    for j in range(prefix):
        geometry = cm.blocks[j].tile
        assert geometry is not None
        if len(ordered) > geometry.out_height:
            continue
        rows = split_rows(geometry.out_height, [cm.speed[n] for n in ordered])
        walks = [_walk(cm, j, r) for r in rows]
        for i in range(j + 1):
            table[i][j] = _phase(cm, coord, ordered, i, j, rows, walks)
    return table


def _stage(
    cm: CostModel,
    coord: int,
    ordered: Sequence[int],
    phases: Sequence[_Phase],
    first: int,
    last: int,
    prev: int,
) -> TiledCandidate:
    """Blocks ``first..last`` on ``coord`` with ``phases`` tiled over ``ordered`` (the rest on
    ``coord`` alone), its input from ``prev`` (-1: the client): the stage, its latency (with
    the answer's return, as if it were a pipeline's last stage) and its busiest node's time."""
    names = cm.names
    tiled = set().union(*(range(p.first, p.last + 1) for p in phases))
    alone = [j for j in range(first, last + 1) if j not in tiled]
    compute = (
        sum(max(p.tile_ms) for p in phases) + sum(cm.blocks[j].compute_ms for j in alone) / cm.speed[coord]
    )
    busy = {n: sum(p.busy_ms[t] for p in phases) for t, n in enumerate(ordered)}
    busy[coord] += cm.overhead[coord] + sum(cm.blocks[j].compute_ms for j in alone) / cm.speed[coord]
    cut = cm.cut(cm.name_of(prev), names[coord], first)
    stage = Stage(
        node=names[coord],
        first_block=first,
        last_block=last,
        compute_ms=compute,
        transfer_ms=cut.wire_ms,
        memory_bytes=cm.memory_bytes(first, last),
        overhead_ms=cm.overhead[coord],
        codec_ms=cut.codec_ms,
        tiles=tuple(
            TileGroup(p.first, p.last, tuple(names[n] for n in ordered), p.rows, p.tile_ms) for p in phases
        ),
        tile_memory_bytes=cm.memory_bytes(phases[0].first, phases[-1].last),
        busy_ms=max(busy.values()),
    )
    return TiledCandidate(stage, stage.stage_ms + cm.return_ms(coord), stage.busy_ms)


def _price(cm: CostModel, coord: int, group: Sequence[int], prefix: int) -> TiledCandidate | None:
    """The best phases for this group and stage node (None: no phase fits or pays)."""
    last = cm.B - 1
    if cm.memory_bytes(0, last) > cm.memory[coord]:
        return None
    if any(cm.memory_bytes(0, prefix - 1) > cm.memory[n] for n in group if n != coord):
        return None
    ordered = sorted(group, key=lambda n: (n != coord, -cm.speed[n], n))  # the stage's node on top
    table = _phases(cm, coord, ordered, prefix)
    # best[j]: fastest way through blocks 0..j-1, with the phases used (at least one at the end).
    alone = [b.compute_ms / cm.speed[coord] for b in cm.blocks]
    best: list[tuple[float, tuple[_Phase, ...]]] = [(0.0, ())]
    for j in range(prefix):
        options = [(best[j][0] + alone[j], best[j][1])]
        for i in range(j + 1):
            phase = table[i][j]
            if phase is not None:
                options.append((best[i][0] + max(phase.tile_ms), (*best[i][1], phase)))
        best.append(min(options, key=lambda o: (o[0], len(o[1]))))
    _, phases = best[prefix]
    if not phases:
        return None
    return _stage(cm, coord, ordered, phases, 0, last, -1)


def tiled_stage(cm: CostModel, stage: Stage, prev: int, where: str) -> TiledCandidate:
    """A placed tiled stage priced as the planner prices its candidates (``evaluate``, and
    re-planning, re-price a deployed plan with this); InvalidSpec naming ``where`` when its
    phases do not fit the model's tile geometry."""
    coord = cm.index[stage.node]
    ordered_names = stage.tiles[0].nodes
    if stage.node not in ordered_names:
        raise InvalidSpec(f"{where}.tiles[0].nodes: must include the stage's node {stage.node!r}")
    ordered = [cm.index.get(n, -1) for n in ordered_names]
    if -1 in ordered:
        raise InvalidSpec(f"{where}.tiles[0].nodes: unknown node in {list(ordered_names)}")
    phases = []
    expect = stage.first_block
    for k, g in enumerate(stage.tiles):
        at = f"{where}.tiles[{k}]"
        if g.nodes != ordered_names:
            raise InvalidSpec(f"{at}.nodes: every phase of a stage runs on the same nodes")
        if not (expect <= g.first_block <= g.last_block <= stage.last_block):
            raise InvalidSpec(f"{at}: blocks {g.first_block}..{g.last_block} out of order in the stage")
        if any(cm.blocks[b].tile is None for b in range(g.first_block, g.last_block + 1)):
            raise InvalidSpec(f"{at}: blocks {g.first_block}..{g.last_block} are not all tileable")
        height = cm.blocks[g.last_block].tile.out_height  # type: ignore[union-attr]
        bounds = [0, *(b for _, b in g.rows)]
        if len(g.rows) != len(ordered) or [a for a, _ in g.rows] != bounds[:-1] or bounds[-1] != height:
            raise InvalidSpec(
                f"{at}.rows: expected one stripe per node covering rows 0..{height}, got {g.rows}"
            )
        if any(a >= b for a, b in g.rows):
            raise InvalidSpec(f"{at}.rows: an empty stripe in {g.rows}")
        walks = [_walk(cm, g.last_block, r) for r in g.rows]
        phases.append(_phase(cm, coord, ordered, g.first_block, g.last_block, g.rows, walks))
        expect = g.last_block + 1
    return _stage(cm, coord, ordered, phases, stage.first_block, stage.last_block, prev)


def best_tiled(cm: CostModel, objective: str) -> TiledCandidate | None:
    """The best tiled single-stage plan for ``objective`` (None: the model has no tileable
    leading block or no group fits): every group of two or more of the fastest nodes, each
    with its fastest node that holds the whole model as the stage's node (it runs the rest),
    its phases chosen by ``_price``."""
    prefix = tileable_prefix(cm)
    if prefix == 0 or cm.N < 2:
        return None
    fastest = sorted(range(cm.N), key=lambda n: -cm.speed[n])[:MAX_TILE_NODES]
    best: TiledCandidate | None = None
    best_key: tuple[float, ...] = ()
    for size in range(2, len(fastest) + 1):
        for group in combinations(fastest, size):
            coord = next((n for n in group if cm.memory_bytes(0, cm.B - 1) <= cm.memory[n]), None)
            if coord is None:
                continue
            found = _price(cm, coord, group, prefix)
            if found is None:
                continue
            if objective == "latency":
                key: tuple[float, ...] = (found.latency_ms, found.busy_ms, size)
            else:
                key = (found.busy_ms, found.latency_ms, size)
            if best is None or key < best_key:
                best, best_key = found, key
    return best
