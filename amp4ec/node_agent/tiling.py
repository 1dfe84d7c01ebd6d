"""A scattering stage: one request's leading blocks as row tiles on several agents at once.

The stage decodes the request and runs its program (``LoadedStage.steps``): for a phase it
sends each other tile its input rows plus halo (a frame on the stream to that tile's stage,
naming the phase, answered with the tile's output rows), runs its own tile on its forward
thread meanwhile and stitches the rows in order; blocks between phases and after the last
run on this stage alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import torch

from amp4ec.errors import DeadlineExceeded, InvalidSpec, ShardUnavailable, StageNotLoaded
from amp4ec.node_agent.executor import LoadedStage, StageExecutor
from amp4ec.slicing.tiles import TiledRange, stitch
from amp4ec.wire import codec
from amp4ec.wire.stage import TilePeer, TilePhase
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import shard_pb2

__all__ = ["scatter_gather"]

_RAISES = {
    "INVALID_ARGUMENT": InvalidSpec,
    "FAILED_PRECONDITION": StageNotLoaded,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}
"""A tile's error code → the error this request fails with (anything else: unavailable)."""


async def scatter_gather(
    stage: LoadedStage,
    frame: shard_pb2.Frame,
    arrived: float,
    executor: StageExecutor,
    stream_to: Callable[[TilePeer], ShardStream],
) -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]:
    """The stage's outputs for ``frame`` (encoded) and its timing; ``stream_to`` gives the
    stream to another tile's stage."""
    t0 = time.perf_counter()
    tensors: Sequence[torch.Tensor] = await executor.call(_decoded, stage, frame)
    t1 = time.perf_counter()
    phases = iter(enumerate(stage.config.tile_phases))
    for step in stage.steps:
        if isinstance(step, TiledRange):
            index, phase = next(phases)
            tensors = await _phase(step, index, phase, tensors, frame, executor, stream_to)
        else:
            tensors = await executor.call(step, *tensors)
    t2 = time.perf_counter()
    encoded = await executor.call(codec.encode_all, tensors)
    t3 = time.perf_counter()
    timing = shard_pb2.StageTiming(
        stage=stage.config.stage,
        queue_us=int((t0 - arrived) * 1e6),
        decode_us=int((t1 - t0) * 1e6),
        forward_us=int((t2 - t1) * 1e6),
        encode_us=int((t3 - t2) * 1e6),
    )
    return encoded, timing


async def _phase(
    tiled: TiledRange,
    index: int,
    phase: TilePhase,
    tensors: Sequence[torch.Tensor],
    frame: shard_pb2.Frame,
    executor: StageExecutor,
    stream_to: Callable[[TilePeer], ShardStream],
) -> tuple[torch.Tensor, ...]:
    """One phase: scatter the other tiles' rows, run this stage's own, gather, stitch."""

    async def remote(peer: TilePeer) -> tuple[torch.Tensor, ...]:
        out = shard_pb2.Frame(
            request_id=frame.request_id,
            tensors=codec.encode_all(tiled.scatter(tensors, peer.rows)),
            deadline_unix_ms=frame.deadline_unix_ms,
            tile_phase=index,
        )
        answer = await stream_to(peer).call(out)
        if answer.HasField("error"):
            kind = _RAISES.get(answer.error.code, ShardUnavailable)
            raise kind(f"tile rows {peer.rows[0]}..{peer.rows[1] - 1} on {peer.node}: {answer.error.message}")
        return tuple(codec.decode_all(answer.tensors))

    def own(peer: TilePeer) -> tuple[torch.Tensor, ...]:
        return tiled.run(tiled.scatter(tensors, peer.rows), peer.rows)

    # The other tiles' frames first: each is encoded and sent before this node's own rows take
    # its CPU, so the slowest tiles start computing as early as they can.
    order = sorted(range(len(phase.tiles)), key=lambda k: not phase.tiles[k].address)
    jobs = [
        remote(phase.tiles[k]) if phase.tiles[k].address else executor.call(own, phase.tiles[k])
        for k in order
    ]
    done = dict(zip(order, await asyncio.gather(*jobs), strict=True))
    return await executor.call(stitch, [done[k] for k in range(len(phase.tiles))])


def _decoded(stage: LoadedStage, frame: shard_pb2.Frame) -> list[torch.Tensor]:
    if frame.deadline_unix_ms and time.time() * 1000 > frame.deadline_unix_ms:
        raise DeadlineExceeded(
            f"request {frame.request_id!r} passed its deadline queued at stage {stage.config.stage}"
        )
    tensors = codec.decode_all(frame.tensors)
    stage.shard.check_inputs(tensors)
    return tensors
