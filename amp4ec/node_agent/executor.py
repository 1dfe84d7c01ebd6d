"""Stages and their execution: build a layer range from a spec, run requests through it.

No gRPC here beyond the generated message types: the servicer is the adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from amp4ec.allocator import release_memory
from amp4ec.errors import DeadlineExceeded, InvalidSpec, ShapeMismatch
from amp4ec.node_agent.batching import BatchQueue, Waiting, run_batch
from amp4ec.slicing import BlockChain, ModelSource, Shard, TensorSpec, load_model, split_model
from amp4ec.slicing.materialise import materialise
from amp4ec.slicing.signature import input_names
from amp4ec.slicing.tiles import TiledRange
from amp4ec.wire import codec
from amp4ec.wire.stage import StageConfig
from amp4ec.wire.v1 import shard_pb2

T = TypeVar("T")

__all__ = ["LoadedStage", "StageExecutor", "build_stage"]


@dataclass(frozen=True)
class LoadedStage:
    config: StageConfig
    shard: Shard
    num_blocks: int
    model_inputs: tuple[TensorSpec, ...] = ()
    """The whole model's inputs and outputs (its chain's first and last cut) and the names of
    its inputs: what the entry stage's v2 front door describes (``node_agent/entry.py``)."""
    model_outputs: tuple[TensorSpec, ...] = ()
    input_names: tuple[str, ...] = ()
    steps: tuple[TiledRange | Shard, ...] = ()
    """A tiled stage's program: per phase its tiled blocks, between them the blocks it runs
    alone (a tile stage: one TiledRange per phase, indexed as ``tile_phases``)."""

    def info(self) -> shard_pb2.ShardInfo:
        return shard_pb2.ShardInfo(
            model=self.config.model,
            first_block=self.config.first_block,
            last_block=self.config.last_block,
            num_blocks=self.num_blocks,
            inputs=[codec.spec_of(s.dtype, s.shape) for s in self.shard.input_specs],
            outputs=[codec.spec_of(s.dtype, s.shape) for s in self.shard.output_specs],
            next_hop=self.config.next_hop,
            param_bytes=self.shard.param_bytes,
            stage=self.config.stage,
        )


def build_stage(config: StageConfig) -> LoadedStage:
    """Load the model, cut it into its chain and keep only this stage's blocks.

    A zoo model is built and cut on the meta device and only this range's tensors are made
    real, so the agent never holds the whole model (see ``amp4ec.slicing.materialise``);
    other models are built whole and the rest of the chain is dropped on return. Memory freed
    before and after (a stage just unloaded, the tracing) goes back to the OS, so a node's
    memory limit holds what the planner counted.
    """
    if not config.model:
        raise InvalidSpec("model: expected a zoo name, a .pt2 path or package.module:factory, got ''")
    release_memory()
    stage = _build(config)
    release_memory()
    return stage


def _build(config: StageConfig) -> LoadedStage:
    source = ModelSource(
        config.model, weights=config.weights, seed=config.seed, input_shape=config.input_shape
    )
    loaded = load_model(source, materialise=False)
    if loaded.lazy:
        meta_inputs = tuple(t.to("meta") for t in loaded.example_inputs)
        chain = split_model(replace(loaded, example_inputs=meta_inputs))
    else:
        chain = split_model(loaded)
    if config.last_block < 0:  # -1: through the last block
        config = replace(config, last_block=len(chain) - 1)
    shard = chain.shard(config.first_block, config.last_block)
    if loaded.lazy:
        materialise(shard.blocks, config.seed, loaded.state)
    shard.eval()
    return LoadedStage(
        config=config,
        shard=shard,
        num_blocks=len(chain),
        model_inputs=chain.boundaries[0],
        model_outputs=chain.boundaries[-1],
        input_names=input_names(loaded.module, len(chain.boundaries[0])),
        steps=_tile_steps(chain, config) if config.tile_phases else (),
    )


def _tile_steps(chain: BlockChain, config: StageConfig) -> tuple[TiledRange | Shard, ...]:
    """The stage's program (``LoadedStage.steps``), every phase checked against the chain."""
    steps: list[TiledRange | Shard] = []
    expect = config.first_block
    for i, phase in enumerate(config.tile_phases):
        where = f"tile_phases[{i}]"
        if not expect <= phase.first <= phase.last <= config.last_block:
            raise InvalidSpec(
                f"{where}: blocks {phase.first}..{phase.last} do not follow block {expect - 1} "
                f"within {config.first_block}..{config.last_block}"
            )
        if phase.first > expect and not config.tile_only:
            steps.append(chain.shard(expect, phase.first - 1))
        tiled = TiledRange(chain, phase.first, phase.last)
        if sum(not t.address for t in phase.tiles) != 1:
            raise InvalidSpec(f"{where}.tiles: expected exactly one tile of this stage's own (no address)")
        if config.tile_only and len(phase.tiles) != 1:
            raise InvalidSpec(f"{where}.tiles: a tile stage lists only its own rows")
        top = phase.tiles[0].rows[0] if config.tile_only else 0
        for j, t in enumerate(phase.tiles):
            if not top <= t.rows[0] < t.rows[1] <= tiled.height:
                raise InvalidSpec(
                    f"{where}.tiles[{j}]: rows {t.rows[0]}..{t.rows[1]} not within 0..{tiled.height} "
                    "(top first, no gaps)"
                )
            top = t.rows[1]
        if not config.tile_only and top != tiled.height:
            raise InvalidSpec(f"{where}.tiles: rows end at {top}, expected {tiled.height}")
        steps.append(tiled)
        expect = phase.last + 1
    if expect <= config.last_block and not config.tile_only:
        steps.append(chain.shard(expect, config.last_block))
    return tuple(steps)


class StageExecutor:
    """Runs requests through a stage on ``workers`` forward threads (one: in arrival order),
    gathering waiting requests into batches as the stage allows (see [Note: dynamic batching]).

    A node's CPU share is the budget. One worker suits a share of a core or less; beyond
    that, torch's intra-op threads or more workers (requests side by side, answered as they
    finish) use the extra cores. With ``emulate_cpu`` a worker idles after each forward so
    the duty cycle matches the CPU limit. ``on_batch`` hears the size of every forward.
    """

    def __init__(
        self,
        cpu_limit: float,
        emulate_cpu: bool = False,
        workers: int = 1,
        max_rows: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if workers < 1:
            raise InvalidSpec(f"workers: expected at least 1 forward thread, got {workers}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forward")
        self._idle_factor = (1.0 / cpu_limit - 1.0) if emulate_cpu and 0 < cpu_limit < 1 else 0.0
        self._workers = workers
        self._queue = BatchQueue(max_rows)
        self._tasks: list[asyncio.Task[None]] = []
        self._on_batch = on_batch

    @property
    def waiting(self) -> int:
        """Requests queued for a forward worker."""
        return len(self._queue)

    async def run(
        self, stage: LoadedStage, frame: shard_pb2.Frame, arrived: float
    ) -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]:
        """One request's encoded outputs and timing; cancelling the wait takes it out of the queue."""
        loop = asyncio.get_running_loop()
        if not self._tasks:  # the workers start with the first request, in the serving loop
            self._tasks = [loop.create_task(self._work()) for _ in range(self._workers)]
        future: asyncio.Future[tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]] = loop.create_future()
        self._queue.put(Waiting(stage, frame, arrived, future))
        return await future

    def _run(
        self, stage: LoadedStage, frame: shard_pb2.Frame, arrived: float
    ) -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]:
        t0 = time.perf_counter()
        if frame.deadline_unix_ms and time.time() * 1000 > frame.deadline_unix_ms:
            # Queued past its deadline: its caller has given up, so spend no CPU on it.
            raise DeadlineExceeded(
                f"request {frame.request_id!r} passed its deadline queued at stage {stage.config.stage}"
            )
        # Shapes first: decoding an int8 frame allocates 4x its bytes, so only what the stage takes.
        signatures = codec.signatures(frame.tensors)
        tiled: TiledRange | None = None
        if stage.config.tile_only:
            phase = frame.tile_phase
            if not 0 <= phase < len(stage.steps):
                raise InvalidSpec(f"tile_phase: expected 0..{len(stage.steps) - 1}, got {phase}")
            step = stage.steps[phase]
            assert isinstance(step, TiledRange)
            tiled = step
            _check_band(tiled, signatures, stage.shard.batch_flexible)
        else:
            stage.shard.check_inputs(signatures)
        tensors = codec.decode_all(frame.tensors)
        t1 = time.perf_counter()
        if tiled is not None:
            with torch.inference_mode():  # checks its rows' shapes itself
                outputs = tiled.run(tensors, stage.config.tile_phases[phase].own.rows)
        else:
            stage.shard.check_inputs(tensors)
            with torch.inference_mode():
                outputs = stage.shard(*tensors)
        t2 = time.perf_counter()
        encoded = codec.encode_all(outputs, stage.config.output_codec)
        t3 = time.perf_counter()
        if self._idle_factor:
            time.sleep((t3 - t0) * self._idle_factor)
        timing = shard_pb2.StageTiming(
            stage=stage.config.stage,
            queue_us=int((t0 - arrived) * 1e6),
            decode_us=int((t1 - t0) * 1e6),
            forward_us=int((t2 - t1) * 1e6),
            encode_us=int((t3 - t2) * 1e6),
        )
        return encoded, timing

    def _outcome(
        self, stage: LoadedStage, frame: shard_pb2.Frame, arrived: float
    ) -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming] | BaseException:
        try:
            encoded, timing = self._run(stage, frame, arrived)
        except Exception as exc:
            return exc
        timing.batch = 1
        return encoded, timing

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [w for w in await self._queue.take() if not w.future.done()]  # gave up while it formed
            if not batch:
                continue
            if len(batch) == 1:  # alone (a tile stage always): the one-request path
                one = batch[0]
                alone = loop.run_in_executor(self._pool, self._outcome, one.stage, one.frame, one.arrived)
                outcomes = [await alone]
            else:
                outcomes = await loop.run_in_executor(self._pool, run_batch, batch, self._idle_factor)
            if self._on_batch is not None:
                self._on_batch(len(batch))
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():  # its caller gave up during the forward
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a forward thread (a tiled stage's own steps), idling after it like
        a forward under ``emulate_cpu``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._timed, fn, args)

    def _timed(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        start = time.perf_counter()
        with torch.inference_mode():
            out = fn(*args)
        if self._idle_factor:
            time.sleep((time.perf_counter() - start) * self._idle_factor)
        return out

    def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _check_band(tiled: TiledRange, signatures: Sequence[torch.Tensor], batch_flexible: bool) -> None:
    """A tile stage's frame carries a band of its phase's input rows (dim 2, halo included):
    the phase's input dtypes and shapes with no more rows (any batch where the chain allows
    it), so what decoding allocates stays within a whole frame's bound. The band's exact rows
    are the tiled range's own check."""
    where = f"tile phase {tiled.first}..{tiled.last}"
    if len(signatures) != len(tiled.in_specs):
        raise ShapeMismatch(
            f"{where}: expected {len(tiled.in_specs)} input tensor(s), actual {len(signatures)}"
        )
    for i, (t, spec) in enumerate(zip(signatures, tiled.in_specs, strict=True)):
        shape, want = tuple(t.shape), tuple(spec.shape)
        fits = (
            t.dtype == spec.dtype
            and len(shape) == len(want)
            and len(shape) >= 3
            and (batch_flexible or shape[0] == want[0])
            and shape[1] == want[1]
            and shape[2] <= want[2]
            and shape[3:] == want[3:]
        )
        if not fits:
            raise ShapeMismatch(
                f"input {i} of {where}: expected a band of rows of {spec}, actual {t.dtype}{list(shape)}"
            )
