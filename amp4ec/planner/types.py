"""Plain data the planner consumes and produces: block profiles, node capacity, links, plans.

Reading order: LayerProfile (what a block costs) → CodecProfile (what compressing each cut
costs and changes) → NodeCapacity and Link (what the cluster offers) → Pin and
SchedulerHistory (optional planner inputs) → Stage, Pipeline, Plan (the answer). Everything
except SchedulerHistory is frozen and pure Python so the operator can plan without torch.

Plan-level numbers (``Prediction``): each pipeline's bottleneck is its slowest stage and
its latency the sum of its stages plus the result's return to the client. A plan with
several pipelines (disjoint node sets, requests sent to the one expected to answer first) reports
``bottleneck_ms`` = the slowest stage over all pipelines, ``latency_ms`` = the latency of
its fastest pipeline (what one request sees on an idle plan), and ``throughput_rps`` =
the sum over pipelines of ``1000 / bottleneck``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OBJECTIVES",
    "CodecProfile",
    "LayerProfile",
    "Link",
    "NodeCapacity",
    "Pin",
    "Pipeline",
    "Plan",
    "Prediction",
    "SchedulerHistory",
    "Stage",
    "TileGroup",
    "TileRows",
    "measured_node",
    "reference_overhead_ms",
]

OBJECTIVES = ("throughput", "latency", "p95")


@dataclass(frozen=True)
class TileRows:
    """How a block's output rows depend on its input rows, for spatial tiling (measured from
    the graph by ``amp4ec.slicing.tiles``): output rows ``[a, b)`` need input rows
    ``[lo[a], hi[b - 1])``. Rows are dim 2 (H) of the block's NCHW input and output."""

    in_height: int
    out_height: int
    lo: tuple[int, ...]
    """Per output row, the first input row it reads."""
    hi: tuple[int, ...]
    """Per output row, one past the last input row it reads."""
    codec_ns_per_byte: float = 0.0
    """Reference-core ns per byte to cut a stripe of the block's input rows out, encode it
    into a frame and decode it (measured by ``amp4ec.slicing.tiles.codec_ns_per_byte``): the
    CPU a scatter or gather costs beyond the wire."""
    fixed: float = 0.0
    """The part of the block's ``compute_ms`` a tile pays whatever its rows (its weights
    streamed from memory, per-op overhead): on small feature maps a one-row tile can cost half
    the block. Measured by ``amp4ec.slicing.tiles.row_maps``; 0: work proportional to rows."""
    overhead: float = 0.0
    """How much more than ``compute_ms`` the block costs run whole as a tile (explicit halo
    padding, the row bookkeeping), as a fraction."""

    def needs(self, start: int, stop: int) -> tuple[int, int]:
        """Input rows that output rows ``[start, stop)`` read."""
        return (self.lo[start], self.hi[stop - 1])

    def work(self, compute_ms: float, out_rows: tuple[int, int]) -> float:
        """Reference-core ms of a tile computing ``out_rows`` of the block whose whole forward
        takes ``compute_ms``: the fixed part plus the rest in proportion to the tile's share of
        rows, the mean of its output and input (halo included) row fractions (a 3×3 pair of
        convolutions computes the middle rows with half the halo)."""
        lo, hi = self.needs(*out_rows)
        share = ((out_rows[1] - out_rows[0]) / self.out_height + (hi - lo) / self.in_height) / 2
        return compute_ms * (self.fixed + (1.0 + self.overhead - self.fixed) * share)


@dataclass(frozen=True)
class LayerProfile:
    """One block of the model's chain, measured once on the reference (one full core, one thread)."""

    name: str
    """Module path of the block, e.g. ``features.3``."""
    flops: int
    """Floating-point operations of one forward pass (batch of the profile)."""
    param_bytes: int
    """Bytes of the parameters and buffers the block uses."""
    out_bytes: int
    """Bytes of the activation(s) crossing the cut after this block."""
    compute_ms: float
    """Measured forward time on the reference core, in milliseconds."""
    act_bytes: int = 0
    """Peak activation bytes while the block runs (its inputs plus outputs)."""
    tile: TileRows | None = None
    """Row geometry when the block may run as spatial tiles (a leading convolutional block);
    None: layer-wise only."""
    batch_ms: tuple[tuple[int, float], ...] = ()
    """``(batch, ms)`` pairs, batches ≥ 2 in increasing order: the block's measured time for one
    forward of that many requests at once (``compute_ms`` is batch 1). Measured only for the
    batch sizes a deployment's dynamic batching can use; empty: priced at batch 1 (no gain)."""

    def ms_at(self, batch: float) -> float:
        """Time of one forward of ``batch`` requests: linear between measured batches, the
        largest measured batch's per-request time beyond it, ``batch × compute_ms`` without figures."""
        if batch <= 1 or not self.batch_ms:
            return batch * self.compute_ms
        lo_b, lo_ms = 1, self.compute_ms
        for b, ms in self.batch_ms:
            if batch <= b:
                return lo_ms + (ms - lo_ms) * (batch - lo_b) / (b - lo_b)
            lo_b, lo_ms = b, ms
        return batch * lo_ms / lo_b


@dataclass(frozen=True)
class CodecProfile:
    """An activation codec (``fp16``, ``int8``; raw is implicit) measured at every cut of the
    model on the reference core (``amp4ec/slicing/compression.py``). Cut ``j`` is the input
    of block ``j`` (cut 0: the model's input, which the client always sends raw) and cut ``B``
    the model's output, the answer the last stage returns. Every field has ``B + 1`` entries."""

    name: str
    wire_bytes: tuple[int, ...]
    """Bytes the cut's tensors take on the wire in this codec (tensors it cannot shrink count raw)."""
    encode_ms: tuple[float, ...]
    """Reference-core ms to encode the cut (paid by the sender)."""
    decode_ms: tuple[float, ...]
    """Reference-core ms to restore float32 (paid by the receiver)."""
    error: tuple[float, ...]
    """Relative L2 error of the model's final outputs when only this cut is sent in this codec,
    measured on the profile's inputs. The errors of several compressed cuts are summed (a
    first-order estimate; ``amp4ec run`` measures the deployed plan's actual error)."""


@dataclass(frozen=True)
class NodeCapacity:
    """What one node offers."""

    name: str
    cpu: float
    """CPU limit in cores (0.4 means 40% of one core)."""
    memory_bytes: int
    """Memory available to a shard on this node."""
    speed: float = 0.0
    """Reference-core milliseconds this node does per wall millisecond (1.0 = one full
    reference core). 0 means unknown: the planner then uses ``min(cpu, 1)``."""
    load: float = 0.0
    """Current utilisation in [0, 1], used by the paper's scheduler filter."""
    overhead_ms: float = 0.0
    """Reference-core milliseconds a stage on this node spends per request beyond its blocks
    (receiving, decoding, encoding, forwarding, relaying the answer), measured by its agent.
    Like a block, it takes ``overhead_ms / effective_speed`` on the node."""

    @property
    def effective_speed(self) -> float:
        return self.speed if self.speed > 0 else min(self.cpu, 1.0)


def reference_overhead_ms(cpu_ms: float, cpu: float, speed: float) -> float:
    """A node agent's measured per-request CPU ms (on its own cores) in reference-core ms.

    ``speed / min(cpu, 1)`` is how fast one of the node's cores is against the reference
    core, so ``NodeCapacity.overhead_ms / effective_speed`` comes back to the wall time the
    node spends: ``cpu_ms / min(cpu, 1)``.
    """
    share = min(cpu, 1.0)
    return cpu_ms * speed / share if share > 0 and speed > 0 else cpu_ms


def measured_node(
    name: str,
    *,
    cpu: float,
    memory_bytes: float,
    workload_ms: float,
    reference_ms: float,
    overhead_cpu_ms: float = 0.0,
    load: float = 0.0,
) -> NodeCapacity:
    """A node as its agent measured it → planner input. ``workload_ms`` is the node's time for
    the reference workload and ``reference_ms`` the profiling process's, so speed is relative to
    where the blocks were profiled; an unmeasured side gives speed 0 (unknown)."""
    speed = reference_ms / workload_ms if workload_ms > 0 and reference_ms > 0 else 0.0
    return NodeCapacity(
        name=name,
        cpu=cpu,
        memory_bytes=int(memory_bytes),
        speed=speed,
        load=load,
        overhead_ms=reference_overhead_ms(overhead_cpu_ms, cpu, speed),
    )


@dataclass(frozen=True)
class Link:
    """A directed link between two nodes (or the client, named ``client``)."""

    src: str
    dst: str
    rtt_ms: float
    bandwidth_bytes_per_s: float

    def transfer_ms(self, nbytes: int) -> float:
        """One-way time to move ``nbytes``: half the round trip plus serialisation."""
        return self.rtt_ms / 2 + 1000.0 * nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Pin:
    """A manual placement: blocks ``first_block..last_block`` (inclusive) form exactly one
    stage, on ``node``; the optimal planner places every other block freely around it."""

    first_block: int
    last_block: int
    node: str


HISTORY_WINDOW = 100
"""How many recent execution times the paper's scheduler averages."""


@dataclass
class SchedulerHistory:
    """What the paper's weighted scheduler remembers per node (optional planner input).

    ``plan`` never mutates it; call ``record_execution``/``record_plan`` as requests run
    and plans are deployed.
    """

    exec_times_s: dict[str, list[float]] = field(default_factory=dict)
    """Per node, its recent execution times in seconds, oldest first."""
    task_counts: dict[str, int] = field(default_factory=dict)
    """Per node, how many tasks (partitions) the scheduler has given it."""

    def record_execution(self, node: str, seconds: float) -> None:
        """Append one execution time, keeping the last ``HISTORY_WINDOW``."""
        times = self.exec_times_s.setdefault(node, [])
        times.append(float(seconds))
        del times[:-HISTORY_WINDOW]

    def record_plan(self, plan: Plan) -> None:
        """Count one task for every stage of a deployed plan."""
        for stage in plan.stages:
            self.task_counts[stage.node] = self.task_counts.get(stage.node, 0) + 1

    def mean_exec_s(self, node: str) -> float | None:
        """Mean of the node's last ``HISTORY_WINDOW`` execution times, None without history."""
        times = self.exec_times_s.get(node, [])[-HISTORY_WINDOW:]
        return sum(times) / len(times) if times else None


@dataclass(frozen=True)
class TileGroup:
    """Blocks ``first_block..last_block`` of a stage run as horizontal stripes on several nodes
    at once (one *phase*): the stage's node scatters each tile its input rows plus halo, runs
    its own tile, gathers the others' rows and stitches them."""

    first_block: int
    last_block: int
    nodes: tuple[str, ...]
    """Tile nodes, top stripe first; the stage's own node is one of them."""
    rows: tuple[tuple[int, int], ...]
    """Per tile, the output rows ``[start, stop)`` of ``last_block`` it computes."""
    tile_ms: tuple[float, ...] = ()
    """Predicted time of each tile as the stage's node sees it: scatter, compute (halo
    included), gather; its own tile: compute plus sending and receiving the others' frames."""

    @property
    def phase_ms(self) -> float:
        """Predicted time from scatter to the last gather."""
        return max(self.tile_ms, default=0.0)


@dataclass(frozen=True)
class Stage:
    """Blocks ``first_block..last_block`` (inclusive) placed on ``node`` (with ``tiles``: some
    of them as row tiles over several nodes, the rest on ``node``)."""

    node: str
    first_block: int
    last_block: int
    compute_ms: float = 0.0
    """Predicted time of the stage's blocks on its node."""
    transfer_ms: float = 0.0
    """Predicted time to receive the stage's input over its inbound link."""
    memory_bytes: int = 0
    """Predicted resident bytes: parameters plus peak activation."""
    overhead_ms: float = 0.0
    """Predicted per-request time of the node's agent beyond the blocks (its ``overhead_ms``)."""
    codec_ms: float = 0.0
    """Predicted time of encoding the stage's input at its sender and decoding it here, when its
    inbound cut is compressed (priced with the transfer it shortens)."""
    out_codec: str = "raw"
    """How the stage sends its outputs: to the next stage, or (the last) its answer to the client."""
    tiles: tuple[TileGroup, ...] = ()
    """Phases of the stage run as row tiles, in block order (every phase on the same nodes;
    blocks outside them run on ``node``); empty for a layer-wise stage."""
    batch_ms: tuple[float, ...] = ()
    """Predicted time of one pass of a batch of 2, 3, … requests (entry ``k``: batch ``k + 2``),
    up to the deployment's ``max_requests`` (``plan(max_batch=…)``): the blocks' time at that
    batch plus each request's own transfer, codec and overhead. Empty: the stage is priced at
    batch 1 only (no batching, blocks without batch figures, or a tiled stage)."""
    tile_memory_bytes: int = 0
    """Predicted resident bytes on each other tile node: the tiled blocks' parameters plus
    their largest activation (0 for a layer-wise stage)."""
    busy_ms: float = 0.0
    """A tiled stage: its busiest node's time per request, which bounds its rate while
    requests overlap (0: ``stage_ms``, a layer-wise stage's node is busy all through)."""

    @property
    def stage_ms(self) -> float:
        return self.compute_ms + self.transfer_ms + self.overhead_ms + self.codec_ms

    @property
    def interval_ms(self) -> float:
        """Time between requests the stage can take at saturation."""
        return self.busy_ms if self.busy_ms > 0 else self.stage_ms

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.last_block + 1)

    @property
    def max_batch(self) -> int:
        """The largest batch the stage is priced at (1: no batching)."""
        return 1 + len(self.batch_ms)

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the stage runs on: its own, then its other tile nodes."""
        others = [n for n in self.tiles[0].nodes if n != self.node] if self.tiles else []
        return (self.node, *others)


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of a plan."""

    stage_ms: tuple[float, ...]
    """Predicted time of each stage, pipelines concatenated in order."""
    bottleneck_ms: float
    """The slowest stage of the slowest pipeline (max over all stages of the plan)."""
    latency_ms: float
    """End-to-end time of one request on the fastest pipeline (client → … → client):
    the sum of its stages plus the return of the last block's output to the client."""
    throughput_rps: float
    """Requests per second with every pipeline saturated: sum over pipelines of
    ``1000 / that pipeline's slowest stage`` (``inf`` if a pipeline costs nothing)."""
    output_error: float = 0.0
    """Estimated relative L2 error of the final outputs that the plan's codecs introduce: per
    pipeline the sum of its compressed cuts' measured errors, the largest over pipelines."""


@dataclass(frozen=True)
class Pipeline:
    """Stages in data-flow order; together they cover every block exactly once."""

    stages: tuple[Stage, ...]


@dataclass(frozen=True)
class Plan:
    """The planner's answer: one or more pipelines; requests go to the one expected to answer first."""

    objective: str
    strategy: str
    pipelines: tuple[Pipeline, ...]
    predicted: Prediction
    notes: tuple[str, ...] = field(default=())
    """Human-readable remarks (nodes left out and why, heuristic used, …)."""

    @property
    def stages(self) -> tuple[Stage, ...]:
        return tuple(s for p in self.pipelines for s in p.stages)

    def rows(self) -> list[dict[str, Any]]:
        """One row per stage, in ``stages`` order: where it runs, which blocks and, when it
        compresses, how it sends its outputs (``out_codec``; absent when raw) — the form every
        report, JSON file and failover record uses; callers add their own columns."""
        return [
            {
                "pipeline": p,
                "stage": i,
                "node": s.node,
                "first_block": s.first_block,
                "last_block": s.last_block,
                **({"out_codec": s.out_codec} if s.out_codec != "raw" else {}),
            }
            for p, pipe in enumerate(self.pipelines)
            for i, s in enumerate(pipe.stages)
        ]
