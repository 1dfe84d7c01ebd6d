"""A stage's spec, once: which blocks of which model a node serves and where its output goes.

Torch-free, so local mode, the bench, the operator and the agent's command line share it: it
converts to and from the ``StageSpec`` protobuf (``LoadStage``) and to the agent's flags (a
shard Pod's arguments).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amp4ec.errors import InvalidSpec
from amp4ec.wire.codec_names import codec_name, codec_value
from amp4ec.wire.v1 import agent_pb2

__all__ = [
    "MAX_BATCH_REQUESTS",
    "MAX_QUEUE_DELAY_MS",
    "Batching",
    "StageConfig",
    "TilePeer",
    "TilePhase",
    "TileSpan",
    "parse_tile_phase",
]

TileSpan = tuple[int, int, Sequence[str], Sequence[tuple[int, int]]]
"""One phase as the planner places it: (first block, last block, tile nodes top stripe first,
each node's output rows ``[start, stop)``) — ``planner.TileGroup``'s fields, torch- and
planner-free."""

MAX_BATCH_REQUESTS = 64
"""The node agent's default ``--max-batch``: a batch is one forward of at most that many rows."""
MAX_QUEUE_DELAY_MS = 1000.0
"""Longest ``max_queue_delay_ms`` a stage accepts: a batch waiting longer holds every request in it."""


@dataclass(frozen=True)
class Batching:
    """A deployment's dynamic batching, the same for each of its stages (see [Note: dynamic
    batching] in amp4ec.node_agent.batching)."""

    max_requests: int = 1
    """The most waiting requests one forward may gather (1 = none)."""
    max_queue_delay_ms: float = 0.0
    """How long a batch's first request may wait for more (0: only what already waits)."""

    def checked(self, requests_field: str = "--batch", delay_field: str = "--batch-delay-ms") -> Batching:
        if not 1 <= self.max_requests <= MAX_BATCH_REQUESTS:
            raise InvalidSpec(
                f"{requests_field}: expected 1 to {MAX_BATCH_REQUESTS}, got {self.max_requests}"
            )
        if not (
            math.isfinite(self.max_queue_delay_ms) and 0 <= self.max_queue_delay_ms <= MAX_QUEUE_DELAY_MS
        ):
            raise InvalidSpec(
                f"{delay_field}: expected 0 to {MAX_QUEUE_DELAY_MS:g} ms, got {self.max_queue_delay_ms!r}"
            )
        return self

    def profile_sizes(self) -> tuple[int, ...]:
        """Batch sizes to profile blocks at beyond batch 1 (none when batching is off): 2 and
        ``max_requests``; the planner interpolates between them (``LayerProfile.ms_at``)."""
        return tuple(sorted({2, self.max_requests})) if self.max_requests > 1 else ()

    def stage_fields(self) -> dict[str, Any]:
        """As ``StageConfig`` keyword arguments."""
        return {"max_batch_requests": self.max_requests, "max_queue_delay_ms": self.max_queue_delay_ms}

    def describe(self) -> str:
        if self.max_requests <= 1:
            return "off (one request per forward)"
        wait = (
            f"waiting up to {self.max_queue_delay_ms:g} ms for more" if self.max_queue_delay_ms else "no wait"
        )
        return f"up to {self.max_requests} waiting requests per forward, {wait}"


@dataclass(frozen=True)
class TilePeer:
    """One row tile of a tiled stage (``agent_pb2.TilePeer``)."""

    node: str
    address: str
    """"" for this stage's own tile."""
    identity: str
    rows: tuple[int, int]

    @classmethod
    def from_message(cls, m: agent_pb2.TilePeer) -> TilePeer:
        return cls(m.node, m.address, m.identity, (m.row_start, m.row_stop))

    def to_message(self) -> agent_pb2.TilePeer:
        return agent_pb2.TilePeer(
            node=self.node,
            address=self.address,
            identity=self.identity,
            row_start=self.rows[0],
            row_stop=self.rows[1],
        )


@dataclass(frozen=True)
class TilePhase:
    """Blocks ``first..last`` of a stage as row tiles (``agent_pb2.TilePhase``)."""

    first: int
    last: int
    tiles: tuple[TilePeer, ...]

    @property
    def own(self) -> TilePeer:
        return next(t for t in self.tiles if not t.address)

    @property
    def others(self) -> tuple[TilePeer, ...]:
        return tuple(t for t in self.tiles if t.address)

    def to_arg(self) -> str:
        """The phase as one ``--tile-phase`` value (JSON: addresses hold colons, identities dots)."""
        tiles = [
            {"node": t.node, "address": t.address, "identity": t.identity, "rows": list(t.rows)}
            for t in self.tiles
        ]
        return json.dumps({"first": self.first, "last": self.last, "tiles": tiles}, separators=(",", ":"))


def parse_tile_phase(text: str, field: str = "--tile-phase") -> TilePhase:
    """A ``TilePhase.to_arg`` value back; InvalidSpec naming ``field`` when malformed."""
    try:
        d = json.loads(text)
        tiles = tuple(
            TilePeer(str(t["node"]), str(t.get("address", "")), str(t.get("identity", "")), _rows(t["rows"]))
            for t in d["tiles"]
        )
        first, last = d["first"], d["last"]
        if not (isinstance(first, int) and isinstance(last, int) and tiles):
            raise ValueError("first and last must be integers, tiles non-empty")
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidSpec(
            f'{field}: expected {{"first": int, "last": int, "tiles": [{{"node", "address", "identity", '
            f'"rows": [start, stop]}}, ...]}}, got {text!r} ({exc})'
        ) from None
    return TilePhase(first, last, tiles)


def _rows(value: object) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"rows must be [start, stop], got {value!r}")
    return (value[0], value[1])


@dataclass(frozen=True)
class StageConfig:
    """Which layer range to serve and where its output goes."""

    model: str
    first_block: int = 0
    last_block: int = -1
    """Inclusive; -1 = the last block."""
    next_hop: str = ""
    stage: int = 0
    weights: str | None = None
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    next_node: str = ""
    """The next hop's node name, for errors; "" = name it by address."""
    next_hop_identity: str = ""
    """Under mutual TLS, the identity the next hop must present (see amp4ec/pki.py)."""
    accept_from: tuple[str, ...] = ()
    """Under mutual TLS, the identities that may send this stage frames."""
    output_codec: str = "raw"
    """How the stage encodes what it sends (to the next hop, or its answer when last): a name
    of ``codec_names.CODECS``, chosen per cut by the planner."""
    tile_phases: tuple[TilePhase, ...] = ()
    """Phases of the stage run as row tiles (see ``agent_pb2.StageSpec.tile_phases``)."""
    tile_only: bool = False
    """A tile stage: answers each frame with its own rows of the phase the frame names."""
    max_batch_requests: int = 1
    """Dynamic batching: the most waiting requests one forward may gather (1 = none)."""
    max_queue_delay_ms: float = 0.0
    """How long a batch's first request may wait for more (0: only what already waits)."""

    @property
    def next_peer(self) -> str:
        """How errors name the next hop: ``stage 2 on node2``."""
        return f"stage {self.stage + 1} on {self.next_node or self.next_hop}"

    @classmethod
    def from_message(cls, m: agent_pb2.StageSpec) -> StageConfig:
        return cls(
            model=m.model,
            first_block=m.first_block,
            last_block=m.last_block,
            next_hop=m.next_hop,
            stage=m.stage,
            weights=m.weights or None,
            seed=m.seed,
            input_shape=tuple(m.input_shape) or None,
            next_node=m.next_node,
            next_hop_identity=m.next_hop_identity,
            accept_from=tuple(m.accept_from),
            output_codec=codec_name(m.output_codec, "output_codec"),
            tile_phases=tuple(
                TilePhase(p.first_block, p.last_block, tuple(TilePeer.from_message(t) for t in p.tiles))
                for p in m.tile_phases
            ),
            tile_only=m.tile_only,
            max_batch_requests=max(1, m.max_batch_requests),
            max_queue_delay_ms=m.max_queue_delay_ms,
        )

    def tiled(
        self,
        node: str,
        phases: Sequence[TileSpan],
        address: Callable[[str], str],
        identity: Callable[[str], str],
    ) -> tuple[StageConfig, dict[str, StageConfig]]:
        """This stage on ``node`` scattering ``phases``, and the tile stage every other tile
        node loads: it holds the blocks of every phase, answers only frames from ``node``'s
        identity, and computes its own rows of the phase a frame names. ``address`` and
        ``identity`` give another tile node's address and the identity it presents (mutual
        TLS; "" when plaintext)."""
        own = replace(
            self,
            tile_phases=tuple(
                TilePhase(
                    first,
                    last,
                    tuple(
                        TilePeer(n, "" if n == node else address(n), identity(n), (a, b))
                        for n, (a, b) in zip(nodes, rows, strict=True)
                    ),
                )
                for first, last, nodes, rows in phases
            ),
            tile_only=False,
        )
        others = dict.fromkeys(n for _, _, nodes, _ in phases for n in nodes if n != node)
        tiles = {
            n: StageConfig(
                model=self.model,
                weights=self.weights,
                seed=self.seed,
                input_shape=self.input_shape,
                first_block=phases[0][0],
                last_block=phases[-1][1],
                stage=self.stage,
                accept_from=(identity(node),) if identity(node) else (),
                tile_phases=tuple(
                    TilePhase(first, last, (TilePeer(n, "", identity(n), rows[list(nodes).index(n)]),))
                    for first, last, nodes, rows in phases
                ),
                tile_only=True,
            )
            for n in others
        }
        return own, tiles

    def to_message(self) -> agent_pb2.StageSpec:
        return agent_pb2.StageSpec(
            model=self.model,
            first_block=self.first_block,
            last_block=self.last_block,
            next_hop=self.next_hop,
            stage=self.stage,
            weights=self.weights or "",
            seed=self.seed,
            input_shape=list(self.input_shape or ()),
            next_node=self.next_node,
            next_hop_identity=self.next_hop_identity,
            accept_from=list(self.accept_from),
            output_codec=codec_value(self.output_codec, "output_codec"),
            tile_phases=[
                agent_pb2.TilePhase(
                    first_block=p.first, last_block=p.last, tiles=[t.to_message() for t in p.tiles]
                )
                for p in self.tile_phases
            ],
            tile_only=self.tile_only,
            max_batch_requests=self.max_batch_requests,
            max_queue_delay_ms=self.max_queue_delay_ms,
        )

    def to_args(self) -> list[str]:
        """The agent's command-line flags for this stage (``python -m amp4ec.node_agent``); empty
        fields are left out, so the agent's defaults apply. A tiled stage's phases are one
        ``--tile-phase`` each (``TilePhase.to_arg``)."""
        args = [
            "--model",
            self.model,
            "--first-block",
            str(self.first_block),
            "--last-block",
            str(self.last_block),
        ]
        args += ["--stage", str(self.stage), "--seed", str(self.seed)]
        if self.max_batch_requests > 1:
            args += [
                "--batch",
                str(self.max_batch_requests),
                "--batch-delay-ms",
                repr(self.max_queue_delay_ms),
            ]
        optional = {
            "--weights": self.weights or "",
            "--input-shape": ",".join(str(d) for d in self.input_shape or ()),
            "--next-hop": self.next_hop,
            "--next-node": self.next_node,
            "--next-hop-identity": self.next_hop_identity,
            "--output-codec": "" if self.output_codec == "raw" else self.output_codec,
        }
        args += [item for flag, value in optional.items() if value for item in (flag, value)]
        args += [item for phase in self.tile_phases for item in ("--tile-phase", phase.to_arg())]
        args += ["--tile-only"] if self.tile_only else []
        return args + [item for identity in self.accept_from for item in ("--accept-from", identity)]
