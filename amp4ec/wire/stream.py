"""A persistent bidirectional Stream to a shard, shared by every request sent to it.

Requests are renamed to stream-local ids on the way out (so two upstream clients may
reuse the same request id) and matched back by id on the way in. When the stream breaks,
every pending request is answered UNAVAILABLE and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc

from amp4ec.errors import ShardUnavailable
from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

__all__ = ["ShardStream"]

log = logging.getLogger(__name__)


class ShardStream:
    def __init__(self, target: str, options: list[tuple[str, int]]) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[shard_pb2.Frame]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (the dispatcher's measure of load)."""
        return len(self._pending)

    async def call(self, frame: shard_pb2.Frame) -> shard_pb2.Frame:
        """Send one frame downstream and wait for its answer (an error frame on failure)."""
        original_id = frame.request_id
        local_id = str(next(self._ids))
        future: asyncio.Future[shard_pb2.Frame] = asyncio.get_running_loop().create_future()
        self._pending[local_id] = future
        out = shard_pb2.Frame()
        out.CopyFrom(frame)
        out.request_id = local_id
        try:
            async with self._write_lock:
                call = self._ensure_stream()
                await call.write(out)
            answer = await future
        except grpc.aio.AioRpcError as e:
            self._fail_all(e)
            raise ShardUnavailable(f"next shard {self.target} unavailable: {e.details()}") from None
        except asyncio.CancelledError:
            self._pending.pop(local_id, None)
            raise
        answer.request_id = original_id
        return answer

    def _ensure_stream(self) -> grpc.aio.StreamStreamCall:
        if self._call is None or self._call.done():
            self._call = self._stub.Stream()
            self._reader = asyncio.create_task(self._read_answers(self._call))
        return self._call

    async def _read_answers(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for answer in call:
                future = self._pending.pop(answer.request_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as e:
            self._fail_all(e)
        except asyncio.CancelledError:
            return
        if self._call is call:
            self._call = None
        # The stream ended without answering some requests: they will never be answered.
        self._fail_all(None)

    def _fail_all(self, error: grpc.aio.AioRpcError | None) -> None:
        detail = error.details() if error is not None else "stream closed"
        pending, self._pending = self._pending, {}
        for local_id, future in pending.items():
            if not future.done():
                future.set_result(
                    shard_pb2.Frame(
                        request_id=local_id,
                        error=shard_pb2.Error(
                            code="UNAVAILABLE", message=f"next shard {self.target} unavailable: {detail}"
                        ),
                    )
                )
        self._call = None

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
