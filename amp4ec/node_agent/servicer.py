"""gRPC adapters: decode frames, hand them to the stage executor, forward, answer.

ShardServicer is the data plane (Stream, Infer, Describe); AgentServicer is the control
surface (capacity, link probes, loading a layer range). The stage served lives in
``repository.py``, the streams to next hops in ``forwarders.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from amp4ec.allocator import release_memory
from amp4ec.errors import InvalidSpec, StageNotLoaded
from amp4ec.node_agent import metrics
from amp4ec.node_agent.batching import StreamShare, stream_share
from amp4ec.node_agent.budget import Budget, OverBudget
from amp4ec.node_agent.capacity import LoadMeter, memory_available_bytes
from amp4ec.node_agent.decoding import Undecodable
from amp4ec.node_agent.executor import LoadedStage, StageExecutor
from amp4ec.node_agent.forwarders import ForwarderPool
from amp4ec.node_agent.limits import check_echo, check_frame, check_stage_spec
from amp4ec.node_agent.repository import StageRepository
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.node_agent.status import DeadlineExceeded, error_frame, status_of
from amp4ec.node_agent.tiling import scatter_gather
from amp4ec.slicing.profile import reference_workload_ms
from amp4ec.wire import codec
from amp4ec.wire.liveness import remaining_s
from amp4ec.wire.stage import StageConfig, TilePeer
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2, shard_pb2_grpc

__all__ = ["AgentServicer", "ShardServicer"]

log = logging.getLogger(__name__)

Request = shard_pb2.Frame | Undecodable


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        settings: AgentSettings,
        repository: StageRepository,
        executor: StageExecutor,
        *,
        observe: bool = True,
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._executor = executor
        self._observe = observe
        """False for the overhead calibration, whose requests are not the node's traffic."""
        self._calls = 0
        """Data-plane calls (streams and Infer) being served, against ``max_streams``."""
        self._freed = asyncio.Event()
        """Set whenever a call gives back its slot (a new call waits for the stalled one it ended)."""
        self._budget = Budget(settings.max_held_bytes)
        self._trim: asyncio.TimerHandle | None = None
        self._forwarders = ForwarderPool(settings)
        """The streams to the next hop and to tile peers."""

    async def close(self) -> None:
        """Close the streams to next hops (the agent stops)."""
        await self._forwarders.close()

    async def _process(self, frame: shard_pb2.Frame, turn: StreamShare | None = None) -> shard_pb2.Frame:
        """One request through this stage and everything after it; failures become error frames.

        ``turn`` is the calling stream's share of the forward threads (see [Note: fair streams]).
        """
        arrived = time.perf_counter()
        node = self._settings.node
        entry = False
        try:
            check_frame(frame, self._settings)
            if frame.deadline_unix_ms and time.time() * 1000 > frame.deadline_unix_ms:
                raise DeadlineExceeded(
                    f"request {frame.request_id!r} passed its deadline before {node} got it"
                )
            stage = self._repository.current
            entry = stage.config.stage == 0
            tensors, timing = await self._computed(stage, frame, arrived, turn)
            for phase in ("queue", "decode", "forward", "encode") if self._observe else ():
                metrics.PHASE_SECONDS.labels(node, phase).observe(getattr(timing, f"{phase}_us") / 1e6)
            if self._observe and stage.config.output_codec != "raw":
                metrics.BYTES_SAVED.labels(node, stage.config.output_codec).inc(codec.saved_bytes(tensors))
            if stage.config.next_hop:
                out = shard_pb2.Frame(
                    request_id=frame.request_id, tensors=tensors, deadline_unix_ms=frame.deadline_unix_ms
                )
                # The forward waits no longer than the frame's deadline (ShardStream.call).
                config = stage.config
                forwarder = self._forwarders.forwarder(
                    config.next_hop, config.next_hop_identity, config.next_peer
                )
                answer = await forwarder.call(out)
            else:
                answer = shard_pb2.Frame(request_id=frame.request_id, tensors=tensors)
            answer.timings.insert(0, timing)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is this request's answer, never the stream's end
            answer = error_frame(frame.request_id[: self._settings.max_request_id_chars], exc)
        code = answer.error.code or "OK"
        if not self._observe:
            return answer
        metrics.REQUESTS.labels(node, code).inc()
        if entry:  # the whole pipeline's time, once per request
            metrics.REQUEST_SECONDS.labels(node, code).observe(time.perf_counter() - arrived)
        return answer

    @contextlib.asynccontextmanager
    async def _call_slot(self, context: grpc.aio.ServicerContext) -> AsyncIterator[Callable[[], None]]:
        """One of ``max_streams`` data-plane calls: a free one, or a stalled stream's (see
        [Note: held bytes]); RESOURCE_EXHAUSTED when every call is still being read after
        ``4 * stall_s`` (streams opened together stall only after ``stall_s``, and refusing
        before then would let merely slow readers lock out a valid caller). Yields the slot's
        release, which a stream ended for not reading calls before its status is sent."""
        limit = self._settings.max_streams
        give_up = time.monotonic() + 4 * self._budget.stall_s
        while self._calls >= limit and time.monotonic() < give_up:
            wait = 5.0 if self._budget.end_most_stalled() else self._budget.stall_s / 4
            self._freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # 3.10: not the builtin yet
                await asyncio.wait_for(self._freed.wait(), wait)
        if self._calls >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node agent {self._settings.node} serves {self._settings.max_streams} calls already "
                "(--max-streams); retry later",
            )
        self._calls += 1
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._calls -= 1
                self._freed.set()

        try:
            yield release
        finally:
            release()

    async def _computed(
        self,
        stage: LoadedStage,
        frame: shard_pb2.Frame,
        arrived: float,
        turn: StreamShare | None,
    ) -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]:
        """The stage's forward, waited for no longer than the frame's deadline (queued for its
        turn or a forward thread, or computing)."""

        async def run() -> tuple[list[shard_pb2.Tensor], shard_pb2.StageTiming]:
            async with turn or contextlib.nullcontext():
                if stage.config.tile_phases and not stage.config.tile_only:
                    return await scatter_gather(stage, frame, arrived, self._executor, self._tile_stream)
                return await self._executor.run(stage, frame, arrived)

        timeout = remaining_s(frame.deadline_unix_ms)
        if timeout is None:
            return await run()
        try:
            return await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"request {frame.request_id!r} passed its deadline at stage {stage.config.stage} "
                f"on {self._settings.node}"
            ) from None

    def _tile_stream(self, peer: TilePeer) -> ShardStream:
        return self._forwarders.forwarder(
            peer.address, peer.identity, f"tile rows {peer.rows[0]}..{peer.rows[1] - 1} on {peer.node}"
        )

    async def Stream(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> None:
        """[Note: window until read] A window slot is taken when a request is read and given
        back only when gRPC has sent its answer (``context.write`` returns), which HTTP/2
        flow control stops when the caller does not read. So a caller that stops reading
        stops being read after ``window`` requests and holds at most ``window`` answers here.
        When an answer has waited ``unread_timeout_s`` to be sent, or the agent needs the
        memory (see [Note: held bytes]), the call ends RESOURCE_EXHAUSTED and its answers are
        freed. Answers are written with ``context.write``, not yielded, because only then can
        a stalled write be given up: cancelling a handler task sends the caller no status
        and keeps the call open (grpc/grpc#29248).

        Each stream has its share of the forward workers (see [Note: fair streams] in
        amp4ec.node_agent.batching).
        """
        async with self._call_slot(context) as release:
            await self._stream(request_iterator, context, release)

    async def _stream(
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
        release_slot: Callable[[], None],
    ) -> None:
        answers: asyncio.Queue[tuple[shard_pb2.Frame, int] | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._settings.window)
        turn = StreamShare(lambda: stream_share(self._settings.workers, self._repository.batch_requests))
        in_flight: set[asyncio.Task[None]] = set()
        evicted: asyncio.Future[None] = (
            asyncio.get_running_loop().create_future()
        )  # one per stream, not per write
        holder = self._budget.open(lambda: evicted.done() or evicted.set_result(None))

        def queue(answer: shard_pb2.Frame, request_size: int) -> None:
            size = answer.ByteSize()
            self._budget.answer(holder, request_size, size)
            answers.put_nowait((answer, size))

        async def handle(frame: shard_pb2.Frame, size: int) -> None:
            queue(await self._process(frame, turn), size)

        async def read() -> None:
            async for frame in request_iterator:
                # A full window stops the reads; gRPC flow control then pushes back upstream.
                await window.acquire()
                if isinstance(frame, Undecodable):  # no request id to answer by: ""
                    queue(error_frame("", InvalidSpec(frame.describe())), 0)
                    continue
                size = frame.ByteSize()
                try:
                    await self._budget.charge_request(holder, size)
                except OverBudget as exc:
                    queue(error_frame(frame.request_id[: self._settings.max_request_id_chars], exc), 0)
                    continue
                task = asyncio.create_task(handle(frame, size))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            await answers.put(None)

        def drop() -> None:
            """The caller went away (cancelled, deadline, never read): drop what it had in flight."""
            reader.cancel()
            for task in list(in_flight):
                task.cancel()
            while not answers.empty():  # freed now, not when the suspended handler ends
                answers.get_nowait()
            self._budget.close(holder)
            release_slot()

        reader = asyncio.create_task(read())
        ended = False
        try:
            while (item := await answers.get()) is not None:
                answer, size = item
                await self._write(context, answer, evicted, drop)
                self._budget.taken(holder, size)
                window.release()
            await reader  # surfaces a broken inbound stream as this call's status
            ended = True
        finally:
            drop()
            if not ended:
                self._trim_soon()

    def _trim_soon(self) -> None:
        """[Note: trim after abuse] Freed answers stay resident (``keep_activation_memory``
        raises glibc's trim threshold), so once streams stop ending abnormally for half a
        second the heap is handed back: RSS returns near its warm size after an attack."""
        if self._trim is not None:
            self._trim.cancel()
        loop = asyncio.get_running_loop()
        self._trim = loop.call_later(0.5, lambda: loop.run_in_executor(None, release_memory))

    async def _write(
        self,
        context: grpc.aio.ServicerContext,
        answer: shard_pb2.Frame,
        evicted: asyncio.Future[None],
        drop: Callable[[], None],
    ) -> None:
        """Send one answer, or end the call RESOURCE_EXHAUSTED when the caller does not take it
        (``drop`` frees what the call holds)."""
        write = asyncio.ensure_future(context.write(answer))
        await asyncio.wait(
            {write, evicted}, timeout=self._settings.unread_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if write.done():
            write.result()
            return
        write.cancel()
        why = (
            "the agent needed their memory"
            if evicted.done()
            else (f"none was taken for {self._settings.unread_timeout_s:.0f} s (--unread-timeout)")
        )
        log.warning("ending a stream that does not read its answers: %s", why)
        # The status waits behind the unsent answer in the caller's HTTP/2 stream (abort returns
        # only once the caller reads or cancels), so this call's queued answers, budget and slot
        # are freed now: else ended streams keep them, and being ended none can be evicted. What
        # lingers is gRPC's copy of one answer per ended stream, bounded by maximum_concurrent_rpcs.
        drop()
        self._trim_soon()  # what it dropped, handed back once evictions stop (not at the caller's cancel)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"stream ended: its answers were not read and {why}"
        )

    async def Infer(self, request: shard_pb2.Frame, context: grpc.aio.ServicerContext) -> shard_pb2.Frame:
        async with self._call_slot(context):
            holder = self._budget.open(lambda: None)  # answered at once: never the stalled one
            try:
                await self._budget.charge_request(holder, request.ByteSize())
                answer = await self._process(request)
            except OverBudget as exc:
                answer = error_frame(request.request_id, exc)
            finally:
                self._budget.close(holder)
        if answer.error.code:
            await context.abort(grpc.StatusCode[answer.error.code], answer.error.message)
        return answer

    async def submit(self, frame: shard_pb2.Frame) -> shard_pb2.Frame:
        """One request from inside this process (the entry's v2 front door, ``entry.py``): the
        path of ``Infer`` (bounds, held bytes, this stage and every one after it), answered as
        a frame, an Error frame on failure."""
        holder = self._budget.open(lambda: None)  # answered at once: never the stalled one
        try:
            await self._budget.charge_request(holder, frame.ByteSize())
            return await self._process(frame)
        except OverBudget as exc:
            return error_frame(frame.request_id, exc)
        finally:
            self._budget.close(holder)

    async def Describe(
        self, request: shard_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.ShardInfo:
        try:
            return self._repository.current.info()
        except StageNotLoaded as exc:
            await context.abort(*status_of(exc))
            raise  # unreachable: abort raises


class AgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(
        self,
        settings: AgentSettings,
        repository: StageRepository,
        cpu_limit: float,
        measure_overhead: Callable[[], Awaitable[float]] | None = None,
    ) -> None:
        self._settings = settings
        self._repository = repository
        self._cpu_limit = cpu_limit
        self._load = LoadMeter(cpu_limit)
        self._workload_ms: float | None = None
        self._measure_overhead = measure_overhead
        self._overhead_ms: float | None = None

    async def GetCapacity(
        self, request: agent_pb2.CapacityRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.Capacity:
        if self._workload_ms is None:  # measured once, on first demand, not at start-up
            self._workload_ms = await asyncio.to_thread(reference_workload_ms, self._cpu_limit)
        if self._overhead_ms is None:  # once, like the workload: before the agent serves traffic
            self._overhead_ms = await self._overhead()
        memory = self._settings.memory_bytes or memory_available_bytes()
        capacity = agent_pb2.Capacity(
            node=self._settings.node,
            cpu_limit=self._cpu_limit,
            workload_ms=self._workload_ms,
            memory_available_bytes=memory,
            load=self._load.read(),
            cpu_seconds=time.process_time(),
            request_overhead_ms=self._overhead_ms,
        )
        for resource in ("cpu_limit", "workload_ms", "memory_available_bytes", "load", "request_overhead_ms"):
            metrics.CAPACITY.labels(self._settings.node, resource).set(getattr(capacity, resource))
        return capacity

    async def _overhead(self) -> float:
        if self._measure_overhead is None:
            return 0.0
        try:
            return await self._measure_overhead()
        except Exception:  # capacity without this term beats no capacity at all
            log.exception("request overhead calibration failed; reporting 0")
            return 0.0

    async def Echo(self, request: agent_pb2.Probe, context: grpc.aio.ServicerContext) -> agent_pb2.Probe:
        try:
            check_echo(request, self._settings)
        except InvalidSpec as exc:
            await context.abort(*status_of(exc))
        return agent_pb2.Probe(payload=bytes(request.reply_bytes))

    async def LoadStage(
        self, request: agent_pb2.StageSpec, context: grpc.aio.ServicerContext
    ) -> shard_pb2.ShardInfo:
        try:
            check_stage_spec(request, self._settings)
            stage = await self._repository.load(StageConfig.from_message(request))
        except Exception as exc:
            await context.abort(*status_of(exc))
            raise  # unreachable: abort raises
        return stage.info()

    async def UnloadStage(
        self, request: agent_pb2.UnloadRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.UnloadReply:
        await self._repository.unload()
        return agent_pb2.UnloadReply()
