"""A tiled stage as the cluster sees it: which rows of which blocks each node computes, and the
tile Pods beside the stage's own.

A stage with tile phases (``planner.TileGroup``) runs on its own node's shard Pod, which
scatters each phase's rows to one *tile Pod* per other tile node and stitches their answers
(``node_agent/tiling.py``). A tile Pod is part of its stage: it presents the stage's identity
(the same leaf, ``desired._tls_volume``), answers only the stage's own Pod and sends to no one.
It is reached through a Service of its own, ``<stage service>-t<k>``, and is labelled
``amp4ec.io/stage: <stage>-t<k>``, so neither the entry Service nor a stage Service (which
select ``amp4ec.io/stage: <stage>``) ever routes a request to it.

Status (``status.plan.stages[].tiles``)::

    tiles:
      nodes: [{node: edge-b, cpu: 1.0}]      # tile Pod k runs on nodes[k - 1]
      memoryBytes: 12345                     # each tile Pod's parameters + peak activation
      phases:
        - firstBlock: 0
          lastBlock: 4
          rows: [{node: edge-a, start: 0, stop: 24}, {node: edge-b, start: 24, stop: 48}]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from amp4ec.planner.types import Stage, TileGroup

__all__ = ["TilePlacement", "shard_label"]


def shard_label(stage: int, tile: int = 0) -> str:
    """The ``amp4ec.io/stage`` label of a stage's own Pod (tile 0) or of its tile Pod ``tile``."""
    return str(stage) if tile == 0 else f"{stage}-t{tile}"


@dataclass(frozen=True)
class TilePlacement:
    """The tile part of a placed stage."""

    nodes: tuple[str, ...]
    """The other tile nodes (not the stage's own), in tile Pod order: Pod ``k`` runs on ``nodes[k - 1]``."""
    cpu: tuple[float, ...]
    """Per other tile node, its Pod's CPU request and limit (the share the planner counted on)."""
    memory_bytes: int
    """Each tile Pod's predicted resident bytes (the tiled blocks' parameters + peak activation)."""
    phases: tuple[TileGroup, ...]
    """The phases, in block order (``TileGroup.nodes`` includes the stage's own node)."""

    @classmethod
    def of(cls, stage: Stage, node_cpu: Mapping[str, float]) -> TilePlacement | None:
        """A planner Stage's tiles (None for a layer-wise stage)."""
        if not stage.tiles:
            return None
        others = stage.nodes[1:]
        return cls(
            nodes=others,
            cpu=tuple(float(node_cpu[n]) for n in others),
            memory_bytes=int(stage.tile_memory_bytes),
            phases=tuple(TileGroup(g.first_block, g.last_block, g.nodes, g.rows) for g in stage.tiles),
        )

    def spans(self) -> list[tuple[int, int, tuple[str, ...], tuple[tuple[int, int], ...]]]:
        """The phases as ``wire.stage.TileSpan`` (what ``StageConfig.tiled`` takes)."""
        return [(g.first_block, g.last_block, g.nodes, g.rows) for g in self.phases]

    def to_status(self) -> dict[str, Any]:
        return {
            "nodes": [{"node": n, "cpu": c} for n, c in zip(self.nodes, self.cpu, strict=True)],
            "memoryBytes": self.memory_bytes,
            "phases": [
                {
                    "firstBlock": g.first_block,
                    "lastBlock": g.last_block,
                    "rows": [
                        {"node": n, "start": a, "stop": b} for n, (a, b) in zip(g.nodes, g.rows, strict=True)
                    ],
                }
                for g in self.phases
            ],
        }

    @classmethod
    def from_status(cls, d: Mapping[str, Any] | None) -> TilePlacement | None:
        if not d or not d.get("phases"):
            return None
        return cls(
            nodes=tuple(str(n["node"]) for n in d.get("nodes") or ()),
            cpu=tuple(float(n["cpu"]) for n in d.get("nodes") or ()),
            memory_bytes=int(d.get("memoryBytes", 0)),
            phases=tuple(
                TileGroup(
                    int(p["firstBlock"]),
                    int(p["lastBlock"]),
                    tuple(str(r["node"]) for r in p["rows"]),
                    tuple((int(r["start"]), int(r["stop"])) for r in p["rows"]),
                )
                for p in d["phases"]
            ),
        )
