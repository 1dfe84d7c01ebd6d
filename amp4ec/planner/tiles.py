"""Tile groups: a model's leading convolutional blocks split into row stripes over several nodes.

Why: a layer-wise split runs every block of a request one after another, so one request is
never faster than on the fastest node alone. Tiles split the work of one request (DeepThings'
fused tile partitioning): each node computes a stripe of rows, reading its input rows plus
the halo its receptive field needs, and the stage's node stitches the stripes.

Pricing a tiled stage on node ``c`` with tile nodes ``T`` (``c`` in ``T``), tiling blocks
``0..k`` and running ``k+1..B-1`` on ``c`` afterwards:

- stripes of the output of block ``k`` with heights proportional to node speed;
- each stripe's rows at every earlier cut from the blocks' ``TileRows`` (the halo);
- a block's work on a stripe: its compute time × the mean of the stripe's input and output
  row fractions (a 3×3 pair of convolutions computes the middle rows with half the halo);
- another node's tile: scatter (its input rows over ``c``→node) + its agent's per-request
  overhead + compute + gather (its output rows back); ``c``'s own tile: compute plus one
  per-request overhead per other tile (it sends a frame and relays an answer for each);
- the stage: inbound transfer + ``c``'s overhead + the slowest tile + the rest on ``c``.

Throughput: the busiest node's time per request (a node's tile, or ``c``'s own tile plus its
rest) bounds the rate. The planner compares these candidates with the best layer-wise plan by
the objective, so on slow links, where scatter and gather cost more than they save, tiles lose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from amp4ec.errors import InvalidSpec
from amp4ec.planner.cost import CostModel
from amp4ec.planner.types import Pipeline, Prediction, Stage, TileGroup, TileRows

__all__ = ["MAX_TILE_NODES", "TiledCandidate", "best_tiled", "split_rows", "tileable_prefix"]

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


def _stripe_work(cm: CostModel, k: int, rows: tuple[int, int]) -> tuple[float, tuple[int, int]]:
    """Reference-core ms of blocks 0..k for output rows ``rows`` of block k, and the input rows
    of block 0 they need."""
    work = 0.0
    out = rows
    for j in range(k, -1, -1):
        geometry = cm.blocks[j].tile
        assert isinstance(geometry, TileRows)
        inp = geometry.needs(*out)
        share = ((out[1] - out[0]) / geometry.out_height + (inp[1] - inp[0]) / geometry.in_height) / 2
        work += cm.blocks[j].compute_ms * share
        out = inp
    return work, out


def _price(cm: CostModel, coord: int, group: Sequence[int], k: int) -> TiledCandidate | None:
    last = cm.B - 1
    geometry = cm.blocks[k].tile
    first_geometry = cm.blocks[0].tile
    assert geometry is not None and first_geometry is not None
    if len(group) > geometry.out_height:
        return None
    # Memory: tile nodes hold blocks 0..k; the stage's node holds the whole model.
    if cm.memory_bytes(0, last) > cm.memory[coord]:
        return None
    if any(cm.memory_bytes(0, k) > cm.memory[n] for n in group if n != coord):
        return None
    ordered = sorted(group, key=lambda n: (n != coord, -cm.speed[n], n))  # the stage's node on top
    rows = split_rows(geometry.out_height, [cm.speed[n] for n in ordered])
    names = cm.names
    tile_ms: list[float] = []
    busy: dict[int, float] = {}
    peers = len(ordered) - 1
    for n, r in zip(ordered, rows, strict=True):
        work, (lo, hi) = _stripe_work(cm, k, r)
        compute = work / cm.speed[n]
        if n == coord:
            own = compute + peers * cm.overhead[coord]
            tile_ms.append(own)
            busy[n] = own
            continue
        in_bytes = round(cm.input_bytes * (hi - lo) / first_geometry.in_height)
        out_bytes = round(cm.blocks[k].out_bytes * (r[1] - r[0]) / geometry.out_height)
        scatter = cm.link(names[coord], names[n]).transfer_ms(in_bytes)
        gather = cm.link(names[n], names[coord]).transfer_ms(out_bytes)
        tile_ms.append(scatter + cm.overhead[n] + compute + gather)
        busy[n] = cm.overhead[n] + compute
    rest = cm.compute_ms(coord, k + 1, last) if k < last else 0.0
    busy[coord] += rest + cm.overhead[coord]
    tiles = TileGroup(
        last_block=k,
        nodes=tuple(names[n] for n in ordered),
        rows=tuple(rows),
        tile_ms=tuple(tile_ms),
    )
    stage = Stage(
        node=names[coord],
        first_block=0,
        last_block=last,
        compute_ms=tiles.phase_ms + rest,
        transfer_ms=cm.transfer_ms(-1, coord, 0),
        memory_bytes=cm.memory_bytes(0, last),
        overhead_ms=cm.overhead[coord],
        tiles=tiles,
    )
    return TiledCandidate(stage, stage.stage_ms + cm.return_ms(coord), max(busy.values()))


def best_tiled(cm: CostModel, objective: str) -> TiledCandidate | None:
    """The best tiled single-stage plan for ``objective`` (None: the model has no tileable
    leading block or no group fits): every group of two or more of the fastest nodes, each
    with its fastest node that holds the whole model as the stage's node (it runs the rest),
    at each depth of the tileable prefix."""
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
            for k in range(prefix):
                found = _price(cm, coord, group, k)
                if found is None:
                    continue
                if objective == "latency":
                    key: tuple[float, ...] = (found.latency_ms, found.busy_ms, size)
                else:
                    key = (found.busy_ms, found.latency_ms, size)
                if best is None or key < best_key:
                    best, best_key = found, key
    return best
