"""gRPC adapters: decode frames, hand them to the stage executor, forward, answer.

ShardServicer is the data plane (Stream, Infer, Describe); AgentServicer is the control
surface (capacity, link probes, loading a layer range).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2

from amp4ec.errors import StageNotLoaded
from amp4ec.node_agent import metrics
from amp4ec.node_agent.capacity import LoadMeter, memory_available_bytes, reference_workload_ms
from amp4ec.node_agent.executor import LoadedStage, StageConfig, StageExecutor, build_stage
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.node_agent.status import DeadlineExceeded, error_frame, status_of
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2, shard_pb2_grpc

__all__ = ["AgentServicer", "ShardServicer", "StageRepository"]

log = logging.getLogger(__name__)


class StageRepository:
    """The layer range this agent serves; loading a new one swaps it in only when ready.

    Requests hold a reference to the stage they started on, so a swap never breaks them
    (make-before-break within one agent).
    """

    def __init__(self, settings: AgentSettings, health_servicer: health.aio.HealthServicer) -> None:
        self._settings = settings
        self._health = health_servicer
        self._stage: LoadedStage | None = None
        self._forwarders: dict[str, ShardStream] = {}
        self._load_lock = asyncio.Lock()

    @property
    def current(self) -> LoadedStage:
        if self._stage is None:
            raise StageNotLoaded(f"node agent {self._settings.node} serves no layer range yet")
        return self._stage

    async def load(self, config: StageConfig) -> LoadedStage:
        async with self._load_lock:
            stage = await asyncio.to_thread(build_stage, config)
            self._stage = stage
            await self._health.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "serving blocks %d..%d of %s (next hop %s)",
                config.first_block,
                config.last_block,
                config.model,
                config.next_hop or "-",
            )
            return stage

    def serve(self, stage: LoadedStage) -> None:
        """Serve an already built stage (the overhead calibration's relay); no health change."""
        self._stage = stage

    async def unload(self) -> None:
        self._stage = None
        await self._health.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)

    def forwarder(self, target: str) -> ShardStream:
        if target not in self._forwarders:
            self._forwarders[target] = ShardStream(target, self._settings.grpc_options())
        return self._forwarders[target]

    async def close(self) -> None:
        for forwarder in self._forwarders.values():
            await forwarder.close()


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

    async def _process(self, frame: shard_pb2.Frame) -> shard_pb2.Frame:
        """One request through this stage and everything after it; failures become error frames."""
        arrived = time.perf_counter()
        node = self._settings.node
        entry = False
        try:
            if frame.deadline_unix_ms and time.time() * 1000 > frame.deadline_unix_ms:
                raise DeadlineExceeded(f"request {frame.request_id!r} passed its deadline before stage ran")
            stage = self._repository.current
            entry = stage.config.stage == 0
            tensors, timing = await self._executor.run(stage, frame, arrived)
            for phase in ("queue", "decode", "forward", "encode") if self._observe else ():
                metrics.PHASE_SECONDS.labels(node, phase).observe(getattr(timing, f"{phase}_us") / 1e6)
            if stage.config.next_hop:
                out = shard_pb2.Frame(
                    request_id=frame.request_id, tensors=tensors, deadline_unix_ms=frame.deadline_unix_ms
                )
                answer = await self._repository.forwarder(stage.config.next_hop).call(out)
            else:
                answer = shard_pb2.Frame(request_id=frame.request_id, tensors=tensors)
            answer.timings.insert(0, timing)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is this request's answer, never the stream's end
            answer = error_frame(frame.request_id, exc)
        code = answer.error.code or "OK"
        if not self._observe:
            return answer
        metrics.REQUESTS.labels(node, code).inc()
        if entry:  # the whole pipeline's time, once per request
            metrics.REQUEST_SECONDS.labels(node, code).observe(time.perf_counter() - arrived)
        return answer

    async def Stream(
        self, request_iterator: AsyncIterator[shard_pb2.Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.Frame]:
        answers: asyncio.Queue[shard_pb2.Frame | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._settings.window)
        in_flight: set[asyncio.Task[None]] = set()

        async def handle(frame: shard_pb2.Frame) -> None:
            try:
                await answers.put(await self._process(frame))
            finally:
                window.release()

        async def read() -> None:
            async for frame in request_iterator:
                # A full window stops the reads; gRPC flow control then pushes back upstream.
                await window.acquire()
                task = asyncio.create_task(handle(frame))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # surfaces a broken inbound stream as this call's status
        finally:
            # The caller went away (cancelled, deadline): drop what it had in flight.
            reader.cancel()
            for task in list(in_flight):
                task.cancel()

    async def Infer(self, request: shard_pb2.Frame, context: grpc.aio.ServicerContext) -> shard_pb2.Frame:
        answer = await self._process(request)
        if answer.error.code:
            await context.abort(grpc.StatusCode[answer.error.code], answer.error.message)
        return answer

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
        return agent_pb2.Probe(payload=bytes(max(0, request.reply_bytes)))

    async def LoadStage(
        self, request: agent_pb2.StageSpec, context: grpc.aio.ServicerContext
    ) -> shard_pb2.ShardInfo:
        try:
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
