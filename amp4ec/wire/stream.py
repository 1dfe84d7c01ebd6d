"""A persistent bidirectional Stream to a shard, shared by every request sent to it.

Requests are renamed to stream-local ids on the way out (so two upstream clients may
reuse the same request id) and matched back by id on the way in. When the stream breaks,
every pending request is answered UNAVAILABLE and the next request opens a new stream.
A request waits for its answer no longer than its frame's deadline, and every message
names the peer (``stage 1 on node1``), not its address.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amp4ec.errors import ShardUnavailable
from amp4ec.wire import transport
from amp4ec.wire.liveness import remaining_s
from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

__all__ = ["SHARD_SERVICE", "ShardStream"]

log = logging.getLogger(__name__)
SHARD_SERVICE = "amp4ec.wire.v1.Shard"
"""The health-checked service name: SERVING once the agent has a layer range loaded."""


class ShardStream:
    def __init__(
        self,
        target: str,
        options: list[tuple[str, int]],
        security: transport.TransportSecurity,
        expect_identity: str = "",
        peer: str | None = None,
    ) -> None:
        """``expect_identity``: what the shard at ``target`` must present under mutual TLS."""
        self.target = target
        self.peer = peer or f"shard at {target}"
        """How errors name the other end, e.g. ``stage 1 on node1``."""
        self._channel = transport.channel(target, security, expect_identity=expect_identity, options=options)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[shard_pb2.Frame]] = {}
        self._ids = itertools.count()
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call
        self._closed = False
        self._answered: grpc.aio.StreamStreamCall | None = None
        """The call that has answered at least once (so it is connected)."""

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (the dispatcher's measure of load)."""
        return len(self._pending)

    @property
    def warm(self) -> bool:
        """Whether the stream is open and has answered: a request sent now pays no connection
        set-up (TCP, TLS handshake, HTTP/2), so its round trip measures the shard."""
        return self._call is not None and self._call is self._answered and not self._call.done()

    async def call(self, frame: shard_pb2.Frame) -> shard_pb2.Frame:
        """Send one frame downstream and wait for its answer (an error frame on failure or
        when the frame's deadline passes first)."""
        if self._closed:
            return self._error(frame.request_id, "UNAVAILABLE", f"{self.peer} was retired")
        original_id = frame.request_id
        local_id = str(next(self._ids))
        future: asyncio.Future[shard_pb2.Frame] = asyncio.get_running_loop().create_future()
        self._pending[local_id] = future
        out = shard_pb2.Frame()
        out.CopyFrom(frame)
        out.request_id = local_id
        timeout = remaining_s(frame.deadline_unix_ms)
        try:
            if timeout is None:  # no task wrapped around the wait: this is every request's path
                answer = await self._send(out, future)
            else:
                answer = await asyncio.wait_for(self._send(out, future), timeout)
        except asyncio.TimeoutError:
            self._pending.pop(local_id, None)
            return self._error(
                original_id, "DEADLINE_EXCEEDED", f"no answer from {self.peer} before the request's deadline"
            )
        except grpc.aio.AioRpcError as e:
            self._fail_all(e)
            raise ShardUnavailable(f"{self.peer} unavailable: {_reason(e)}") from None
        except ShardUnavailable:
            self._pending.pop(local_id, None)
            raise
        except asyncio.CancelledError:
            self._pending.pop(local_id, None)
            raise
        answer.request_id = original_id
        return answer

    async def _send(self, out: shard_pb2.Frame, future: asyncio.Future[shard_pb2.Frame]) -> shard_pb2.Frame:
        async with self._write_lock:
            if self._closed:  # retired while this request waited for the lock: its channel is closed
                raise ShardUnavailable(f"{self.peer} unavailable: retired (its pipeline was replaced)")
            call = self._ensure_stream()
            # A write on a stream whose peer died before it started can wait forever (grpc.aio
            # waits for initial metadata that never goes out); the stream failing answers the
            # future, so whichever comes first ends the wait.
            write = asyncio.ensure_future(call.write(out))
            try:
                await asyncio.wait((write, future), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not write.done():
                    write.cancel()
            error = write.exception() if write.done() and not write.cancelled() else None
            if isinstance(error, asyncio.InvalidStateError):
                self._call = None  # written after the stream ended: the next request opens a new one
                raise ShardUnavailable(f"{self.peer} unavailable: stream ended")
            if error is not None:
                raise error
        return await future

    def _ensure_stream(self) -> grpc.aio.StreamStreamCall:
        if self._call is None or self._call.done():
            self._call = self._stub.Stream()
            self._reader = asyncio.create_task(self._read_answers(self._call))
        return self._call

    async def _read_answers(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for answer in call:
                self._answered = call
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

    def _error(self, request_id: str, code: str, message: str) -> shard_pb2.Frame:
        return shard_pb2.Frame(request_id=request_id, error=shard_pb2.Error(code=code, message=message))

    def _fail_all(self, error: grpc.aio.AioRpcError | None, why: str = "stream closed") -> None:
        detail = _reason(error) if error is not None else why
        pending, self._pending = self._pending, {}
        for local_id, future in pending.items():
            if not future.done():
                future.set_result(self._error(local_id, "UNAVAILABLE", f"{self.peer} unavailable: {detail}"))
        self._call = None

    async def serving(self, timeout_s: float) -> bool:
        """Whether the peer answers its health check SERVING for the Shard service in time."""
        if self._closed:
            return False
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=SHARD_SERVICE), timeout=timeout_s)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):  # UsageError: closed meanwhile
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close_when_idle(self) -> None:
        """Close once every request sent has its answer (a replaced stream finishes what it carries)."""
        while self._pending:
            await asyncio.wait(list(self._pending.values()))
        await self.close()

    async def close(self) -> None:
        """Close the stream; requests still waiting are answered UNAVAILABLE (retriable)."""
        self._closed = True
        self._fail_all(None, "retired (its pipeline was replaced)")
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()


def _reason(error: grpc.aio.AioRpcError) -> str:
    """gRPC's detail without the addresses it prefixes ("failed to connect to all addresses; last
    error: UNKNOWN: ipv4:127.0.0.1:PORT: Connection refused" → "Connection refused"): the
    message already names the peer by node and stage."""
    return (error.details() or error.code().name).rsplit(": ", 1)[-1]
