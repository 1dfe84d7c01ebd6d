"""The cost model: what a stage, a pipeline and a plan cost (float ms), plus the DP's integer-ns tables."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

from amp4ec.errors import InvalidSpec, PlanInfeasible
from amp4ec.planner.types import (
    CodecProfile,
    LayerProfile,
    Link,
    NodeCapacity,
    Pipeline,
    Plan,
    Prediction,
    Stage,
)
from amp4ec.planner.validate import (
    CLIENT,
    DEFAULT_LINK,
    check_blocks,
    check_codecs,
    check_input_bytes,
    check_link,
    check_links,
    check_max_batch,
    check_nodes,
)

__all__ = ["INF", "RAW", "SCALE", "CostModel", "Cut", "Raw", "evaluate", "mb"]

SCALE = 1_000_000
"""The exact searches work in integer nanoseconds (ms × SCALE) so sums and ties are exact."""
INF = math.inf
"""An unreachable cost (compares with the integer costs)."""

Raw = list[list[tuple[int, int, int]]]
"""Pipelines as lists of (node index, first block, last block), the strategies' output."""


RAW = "raw"


@dataclass(frozen=True)
class Cut:
    """How one cut crosses one link: its codec, the wire time and the codec's CPU time (ms)."""

    codec: str
    wire_ms: float
    codec_ms: float
    error: float

    @property
    def total_ms(self) -> float:
        return self.wire_ms + self.codec_ms


def mb(nbytes: float) -> str:
    """Bytes as a short MiB string for messages (the unit memory flags are given in)."""
    return f"{nbytes / 2**20:.1f} MiB"


class CostModel:
    """Validated inputs plus everything derived from them that strategies share."""

    def __init__(
        self,
        blocks: Sequence[LayerProfile],
        nodes: Sequence[NodeCapacity],
        links: Iterable[Link] = (),
        *,
        input_bytes: int = 0,
        default_link: Link | None = None,
        codecs: Iterable[CodecProfile] = (),
        error_limit: float = INF,
        max_batch: int = 1,
    ) -> None:
        """``codecs`` (none: every cut raw) may compress a cut whose measured error is at most
        ``error_limit``; the cheapest way across each link is chosen (see ``cut``). With
        ``max_batch`` > 1 (a deployment's dynamic batching), each stage whose blocks all carry
        batch figures is also priced at batches 2..max_batch (``Stage.batch_ms``)."""
        self.blocks = check_blocks(blocks)
        self.nodes = check_nodes(nodes)
        self.links = check_links(links)
        self.default_link = DEFAULT_LINK if default_link is None else check_link(default_link, "default_link")
        self.input_bytes = check_input_bytes(input_bytes)
        self.B = len(self.blocks)
        self.N = len(self.nodes)
        self.names = [n.name for n in self.nodes]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.speed = [n.effective_speed for n in self.nodes]
        self.overhead = [n.overhead_ms / n.effective_speed for n in self.nodes]
        """Per node, the wall ms its agent spends on each request beyond the blocks."""
        self.memory = [n.memory_bytes for n in self.nodes]
        self.prefix_ms = [0.0, *accumulate(b.compute_ms for b in self.blocks)]
        self.prefix_params = [0, *accumulate(b.param_bytes for b in self.blocks)]
        self.act = [b.act_bytes for b in self.blocks]
        self.in_bytes = [self.input_bytes] + [b.out_bytes for b in self.blocks[:-1]]
        self.codecs = check_codecs(codecs, self.B)
        self.error_limit = error_limit
        self.max_batch = check_max_batch(max_batch)
        self._cuts: dict[tuple[str, str, int], Cut] = {}
        self.model_bytes = self.memory_bytes(0, self.B - 1)
        self._cint: dict[int, list[int]] = {}
        self._kmax: dict[int, list[int]] = {}
        self._xfer: dict[tuple[float, float, float], list[int]] = {}

    # ---- float cost of one stage -------------------------------------------------------------
    def link(self, src: str, dst: str) -> Link:
        """The declared link src→dst, else dst→src, else the default link."""
        return self.links.get((src, dst)) or self.links.get((dst, src)) or self.default_link

    def name_of(self, n: int) -> str:
        return CLIENT if n < 0 else self.names[n]

    def compute_ms(self, n: int, first: int, last: int) -> float:
        return math.fsum(b.compute_ms for b in self.blocks[first : last + 1]) / self.speed[n]

    def memory_bytes(self, first: int, last: int) -> int:
        """Parameters of blocks first..last plus their largest activation."""
        return self.prefix_params[last + 1] - self.prefix_params[first] + max(self.act[first : last + 1])

    def node_speed(self, name: str) -> float:
        """A node's effective speed; the client's is the reference core's (1)."""
        return 1.0 if name == CLIENT else self.speed[self.index[name]]

    def cut(self, src: str, dst: str, j: int) -> Cut:
        """The cheapest way for cut ``j`` (block j's input; ``B``: the model's output) to cross
        src→dst: raw, or a codec whose measured error is within ``error_limit`` and whose wire
        time saved exceeds its CPU (encode at the sender's speed, decode at the receiver's).
        Ties go to raw. The client sends the model's input raw (cut 0 is never compressed)."""
        key = (src, dst, j)
        if key in self._cuts:
            return self._cuts[key]
        link = self.link(src, dst)
        nbytes = self.blocks[-1].out_bytes if j == self.B else self.in_bytes[j]
        best = Cut(RAW, link.transfer_ms(nbytes), 0.0, 0.0)
        for c in self.codecs if j > 0 else ():
            if c.error[j] > self.error_limit or c.wire_bytes[j] >= nbytes:
                continue
            cpu = c.encode_ms[j] / self.node_speed(src) + c.decode_ms[j] / self.node_speed(dst)
            option = Cut(c.name, link.transfer_ms(c.wire_bytes[j]), cpu, c.error[j])
            if option.total_ms < best.total_ms:
                best = option
        self._cuts[key] = best
        return best

    def transfer_ms(self, src: int, dst: int, first: int) -> float:
        """Time for block ``first``'s input to reach node ``dst`` from ``src`` (-1: the client),
        encoding and decoding included when the cut is compressed."""
        return self.cut(self.name_of(src), self.names[dst], first).total_ms

    def return_ms(self, n: int) -> float:
        return self.cut(self.names[n], CLIENT, self.B).total_ms

    # ---- integer tables for the exact searches -----------------------------------------------
    def cint(self, n: int) -> list[int]:
        """Prefix compute time on node n in ns: stage [j, k) costs cint[k] - cint[j]."""
        if n not in self._cint:
            f = SCALE / self.speed[n]
            self._cint[n] = [round(x * f) for x in self.prefix_ms]
        return self._cint[n]

    def xfer_ns(self, src: str, dst: str) -> list[int]:
        """Per first block j, ns for j's input to cross src→dst, plus ``dst``'s per-request
        overhead: both are paid once per stage whatever its blocks, so the exact searches
        price them together."""
        link = self.link(src, dst)
        extra = self.overhead[self.index[dst]]
        key: tuple[float, ...] = (link.rtt_ms, link.bandwidth_bytes_per_s, extra)
        if self.codecs:  # a codec's CPU depends on both ends' speeds
            key = (*key, self.node_speed(src), self.node_speed(dst))
        if key not in self._xfer:
            if self.codecs:
                self._xfer[key] = [
                    round((self.cut(src, dst, j).total_ms + extra) * SCALE) for j in range(self.B)
                ]
            else:
                self._xfer[key] = [round((link.transfer_ms(x) + extra) * SCALE) for x in self.in_bytes]
        return self._xfer[key]

    def ret_ns(self, n: int) -> int:
        return round(self.return_ms(n) * SCALE)

    def kmax(self, n: int) -> list[int]:
        """Per first block j, the largest exclusive end k with [j, k) fitting node n (j if none)."""
        mem = self.memory[n]
        if mem not in self._kmax:
            self._kmax[mem] = self._fit_ends(mem)
        return self._kmax[mem]

    def _fit_ends(self, mem: int) -> list[int]:
        B, P, act = self.B, self.prefix_params, self.act
        if self.model_bytes <= mem:
            return [B] * (B + 1)
        ends = [0] * (B + 1)
        ends[B] = B
        k = 0
        window: deque[int] = deque()
        for j in range(B):
            if k < j:
                k = j
                window.clear()
            while window and window[0] < j:
                window.popleft()
            while k < B:
                a = act[k]
                peak = max(act[window[0]], a) if window else a
                if P[k + 1] - P[j] + peak > mem:
                    break
                while window and act[window[-1]] <= a:
                    window.pop()
                window.append(k)
                k += 1
            ends[j] = k
        return ends

    # ---- pricing -----------------------------------------------------------------------------
    def stage(self, n: int, first: int, last: int, prev: int) -> Stage:
        """The priced stage; ``prev`` is the previous stage's node (-1: the client). Its
        ``out_codec`` is raw until ``price`` knows where its outputs go."""
        cut = self.cut(self.name_of(prev), self.names[n], first)
        per_request = cut.wire_ms + self.overhead[n] + cut.codec_ms
        return Stage(
            node=self.names[n],
            first_block=first,
            last_block=last,
            compute_ms=self.compute_ms(n, first, last),
            transfer_ms=cut.wire_ms,
            memory_bytes=self.memory_bytes(first, last),
            overhead_ms=self.overhead[n],
            codec_ms=cut.codec_ms,
            batch_ms=self.batch_ms(n, first, last, per_request),
        )

    def batch_ms(self, n: int, first: int, last: int, per_request_ms: float) -> tuple[float, ...]:
        """The stage's time for batches 2..max_batch: one forward of the batch (its blocks'
        measured batch times) plus each request's own transfer, codec and overhead (every request
        still travels, decodes and relays on its own). Empty when a block has no batch figures."""
        blocks = self.blocks[first : last + 1]
        if self.max_batch <= 1 or not all(b.batch_ms for b in blocks):
            return ()
        return tuple(
            b * per_request_ms + math.fsum(x.ms_at(b) for x in blocks) / self.speed[n]
            for b in range(2, self.max_batch + 1)
        )

    def price(
        self, raw: Raw, tiled: Mapping[tuple[int, int], Stage] | None = None
    ) -> tuple[tuple[Pipeline, ...], Prediction]:
        """Priced pipelines and the plan's prediction; raises on a malformed or oversized placement.

        ``tiled`` maps (pipeline, stage) to a placed stage with tile phases: that stage is
        priced with the tile cost model (``planner.tiles.tiled_stage``), and its busiest node's
        time, not its latency, bounds the pipeline's rate, as when the planner chose it."""
        from amp4ec.planner.tiles import tiled_stage  # tiles prices with this module's CostModel

        tiled = tiled or {}
        used: set[int] = set()
        pipelines: list[Pipeline] = []
        latencies: list[float] = []
        errors: list[float] = []
        rate = 0.0
        busiest: list[float] = []
        for p, stages in enumerate(raw):
            expect, prev, priced = 0, -1, []
            first_of_pipeline = len(busiest)
            for s, (n, first, last) in enumerate(stages):
                where = f"pipelines[{p}].stages[{s}]"
                if not 0 <= n < self.N:
                    raise InvalidSpec(f"{where}.node: unknown node index {n}")
                if n in used:
                    raise InvalidSpec(f"{where}.node: node {self.names[n]!r} is used twice")
                if first != expect or last < first or last >= self.B:
                    raise InvalidSpec(
                        f"{where}: blocks {first}..{last} do not continue the chain at block {expect}"
                    )
                used.add(n)
                placed = tiled.get((p, s))
                if placed is not None and placed.tiles:
                    stage = tiled_stage(self, placed, prev, where).stage
                    for t in stage.nodes[1:]:
                        if self.index[t] in used:
                            raise InvalidSpec(f"{where}.tiles: node {t!r} is used twice")
                        used.add(self.index[t])
                        span = (
                            f"its tiles of blocks {stage.tiles[0].first_block}..{stage.tiles[-1].last_block}"
                        )
                        self._fits(where, span, stage.tile_memory_bytes, self.index[t])
                else:
                    stage = self.stage(n, first, last, prev)
                self._fits(where, f"blocks {first}..{last}", stage.memory_bytes, n)
                busiest.append(stage.interval_ms)
                priced.append(stage)
                expect, prev = last + 1, n
            if expect != self.B:
                raise InvalidSpec(f"pipelines[{p}]: covers blocks 0..{expect - 1} of 0..{self.B - 1}")
            priced, error = self._with_codecs(priced)
            errors.append(error)
            pipelines.append(Pipeline(tuple(priced)))
            bottleneck = max(busiest[first_of_pipeline:])
            latencies.append(sum(s.stage_ms for s in priced) + self.return_ms(prev))
            rate += 1000.0 / bottleneck if bottleneck > 0 else math.inf
        if not pipelines:
            raise InvalidSpec("pipelines: the placement has no pipeline")
        stage_ms = tuple(s.stage_ms for p in pipelines for s in p.stages)
        return tuple(pipelines), Prediction(
            stage_ms=stage_ms,
            bottleneck_ms=max(busiest),
            latency_ms=min(latencies),
            throughput_rps=rate,
            output_error=max(errors),
        )

    def _fits(self, where: str, what: str, need: int, n: int) -> None:
        if need > self.memory[n]:
            raise PlanInfeasible(
                f"{where}: {what} need {mb(need)} but node {self.names[n]!r} has {mb(self.memory[n])} "
                f"(lacks {mb(need - self.memory[n])})"
            )

    def _with_codecs(self, stages: list[Stage]) -> tuple[list[Stage], float]:
        """Each stage told how to send its outputs (the codec of the next cut, the answer's for
        the last), and the pipeline's summed error estimate."""
        if not self.codecs:
            return stages, 0.0
        out, error = [], 0.0
        for s, stage in enumerate(stages):
            if s + 1 < len(stages):
                nxt = stages[s + 1]
                cut = self.cut(stage.node, nxt.node, nxt.first_block)
            else:
                cut = self.cut(stage.node, CLIENT, self.B)
            error += cut.error
            out.append(replace(stage, out_codec=cut.codec))
        return out, error

    def make_plan(self, objective: str, strategy: str, raw: Raw, notes: Sequence[str] = ()) -> Plan:
        pipelines, predicted = self.price(raw)
        return Plan(objective, strategy, pipelines, predicted, tuple(notes))

    def to_raw(self, placement: Any) -> Raw:
        """A Plan, a Pipeline, Pipelines, or Stages (one pipeline) as index triples."""
        if isinstance(placement, Plan):
            pipes: Sequence[Any] = placement.pipelines
        elif isinstance(placement, Pipeline):
            pipes = [placement]
        elif isinstance(placement, Sequence) and placement and all(isinstance(s, Stage) for s in placement):
            pipes = [Pipeline(tuple(placement))]
        elif isinstance(placement, Sequence) and all(isinstance(p, Pipeline) for p in placement):
            pipes = placement
        else:
            raise InvalidSpec("placement: expected a Plan, a Pipeline, Pipelines or Stages")
        raw: Raw = []
        for p, pipe in enumerate(pipes):
            row = []
            for s, st in enumerate(pipe.stages):
                if st.node not in self.index:
                    raise InvalidSpec(f"pipelines[{p}].stages[{s}].node: unknown node {st.node!r}")
                row.append((self.index[st.node], st.first_block, st.last_block))
            raw.append(row)
        return raw

    @staticmethod
    def tiled_of(placement: Any) -> dict[tuple[int, int], Stage]:
        """(pipeline, stage) → the placement's stages that have tile phases (see ``price``)."""
        if isinstance(placement, Plan):
            pipes: Sequence[Any] = placement.pipelines
        elif isinstance(placement, Pipeline):
            pipes = [placement]
        elif isinstance(placement, Sequence) and placement and all(isinstance(s, Stage) for s in placement):
            pipes = [Pipeline(tuple(placement))]
        else:
            pipes = placement if isinstance(placement, Sequence) else ()
        return {
            (p, s): st
            for p, pipe in enumerate(pipes)
            for s, st in enumerate(getattr(pipe, "stages", ()))
            if isinstance(st, Stage) and st.tiles
        }

    # ---- explanations ------------------------------------------------------------------------
    def lacking(self, need: int, nodes: Iterable[int]) -> str:
        """'a lacks 3.0 MB, b lacks 5.5 MB' for the nodes short of ``need`` bytes."""
        short = [n for n in nodes if self.memory[n] < need]
        return ", ".join(f"{self.names[n]} lacks {mb(need - self.memory[n])}" for n in short) or "none lacks"

    def why_infeasible(self, max_stages: int | None = None) -> str:
        """The most specific reason the model fits no placement on these nodes."""
        big = max(range(self.N), key=lambda n: self.memory[n])
        for j in range(self.B):
            need = self.memory_bytes(j, j)
            if need > self.memory[big]:
                return (
                    f"block {j} ({self.blocks[j].name!r}) alone needs {mb(need)} but the largest node "
                    f"{self.names[big]!r} has {mb(self.memory[big])} (lacks {mb(need - self.memory[big])})"
                )
        params = self.prefix_params[-1]
        total = sum(self.memory)
        if params > total:
            return (
                f"the model's parameters need {mb(params)} but all nodes together have {mb(total)} "
                f"(lack {mb(params - total)})"
            )
        cap = "" if max_stages is None else f" within max_stages={max_stages}"
        return (
            f"no contiguous split of the model ({mb(self.model_bytes)}) fits the nodes' memory{cap}: "
            + self.lacking(self.model_bytes, range(self.N))
        )


def evaluate(
    placement: Any,
    blocks: Sequence[LayerProfile],
    nodes: Sequence[NodeCapacity],
    links: Iterable[Link] = (),
    *,
    input_bytes: int = 0,
    default_link: Link | None = None,
    codecs: Iterable[CodecProfile] = (),
    max_error: float = INF,
) -> Prediction:
    """Predict any placement (a Plan, Pipeline(s) or one pipeline's Stages) with the cost model;
    ``codecs`` within ``max_error`` per cut compress the cuts where they pay."""
    cm = CostModel(
        blocks,
        nodes,
        links,
        input_bytes=input_bytes,
        default_link=default_link,
        codecs=codecs,
        error_limit=max_error,
    )
    return cm.price(cm.to_raw(placement), cm.tiled_of(placement))[1]
