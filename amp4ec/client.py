"""The data-plane client: tensors in, model outputs back, over one or more pipelines.

Each request goes to the entry shard with the fewest requests in flight (least-loaded
dispatch), so a plan of several pipelines or replicas is served as one endpoint.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from amp4ec.errors import Amp4ecError, InvalidSpec, ShardUnavailable, StageNotLoaded
from amp4ec.wire import codec
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import shard_pb2

__all__ = ["Client", "Result", "error_from_status"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Result:
    outputs: tuple[torch.Tensor, ...]
    timings: tuple[shard_pb2.StageTiming, ...]
    """Per-stage timing of this request, first stage first."""
    latency_s: float
    entry: str
    """The entry shard that served it."""
    request_bytes: int
    response_bytes: int


def error_from_status(code: str, message: str) -> Amp4ecError:
    """An error frame or gRPC status back into the amp4ec error tree."""
    kind = {
        "INVALID_ARGUMENT": InvalidSpec,
        "UNAVAILABLE": ShardUnavailable,
        "FAILED_PRECONDITION": StageNotLoaded,
    }.get(code, Amp4ecError)
    return kind(f"{code}: {message}")


class Client:
    """Send tensors to the entry shards of one or more pipelines."""

    def __init__(self, entries: Sequence[str], max_message_bytes: int = 256 * MiB) -> None:
        if not entries:
            raise InvalidSpec("entries: expected at least one host:port")
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._streams = [ShardStream(e, options) for e in entries]
        self._ids = itertools.count()

    async def infer(self, tensors: Sequence[torch.Tensor], deadline_s: float | None = None) -> Result:
        stream = min(self._streams, key=lambda s: s.in_flight)
        frame = shard_pb2.Frame(request_id=str(next(self._ids)), tensors=codec.encode_all(tensors))
        if deadline_s is not None:
            frame.deadline_unix_ms = int((time.time() + deadline_s) * 1000)
        start = time.perf_counter()
        try:
            answer = await stream.call(frame)
        except grpc.aio.AioRpcError as e:
            raise error_from_status(e.code().name, e.details() or "") from None
        latency = time.perf_counter() - start
        if answer.error.code:
            raise error_from_status(answer.error.code, answer.error.message)
        return Result(
            outputs=codec.decode_all(answer.tensors),
            timings=tuple(answer.timings),
            latency_s=latency,
            entry=stream.target,
            request_bytes=frame.ByteSize(),
            response_bytes=answer.ByteSize(),
        )

    async def close(self) -> None:
        for stream in self._streams:
            await stream.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
