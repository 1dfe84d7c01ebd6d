"""create_server(settings) -> (server, port): the node agent's gRPC server, ready to start."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amp4ec.allocator import keep_activation_memory
from amp4ec.node_agent.calibrate import request_overhead_ms
from amp4ec.node_agent.capacity import cgroup_cpu_limit
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.executor import StageConfig, StageExecutor
from amp4ec.node_agent.servicer import AgentServicer, ShardServicer, StageRepository
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire.v1 import agent_pb2_grpc, shard_pb2_grpc

__all__ = ["AgentServer", "create_server"]


@dataclass
class AgentServer:
    server: grpc.aio.Server
    port: int
    repository: StageRepository
    executor: StageExecutor
    health: health.aio.HealthServicer

    async def load(self, config: StageConfig) -> None:
        await self.repository.load(config)

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.repository.close()
        self.executor.shutdown()


async def create_server(settings: AgentSettings) -> AgentServer:
    """Build the server and bind its port (0 = any free one); the caller starts it."""
    cpu_limit = settings.cpu_limit if settings.cpu_limit is not None else cgroup_cpu_limit()
    threads = settings.threads or max(1, math.floor(cpu_limit))
    torch.set_num_threads(threads)
    keep_activation_memory()  # see [Note: activation page faults]

    # Data-plane calls are counted by the servicer (--max-streams); this backstop bounds the rest.
    server = grpc.aio.server(
        options=settings.server_options(), maximum_concurrent_rpcs=4 * settings.max_streams
    )
    health_servicer = health.aio.HealthServicer()
    repository = StageRepository(settings, health_servicer)
    executor = StageExecutor(cpu_limit, emulate_cpu=settings.emulate_cpu, workers=settings.workers)
    # add_servicer: undecodable requests are answered INVALID_ARGUMENT (see [Note: undecodable requests]).
    shard = ShardServicer(settings, repository, executor)
    add_servicer(shard_pb2_grpc.add_ShardServicer_to_server, shard, server)
    add_servicer(
        agent_pb2_grpc.add_NodeAgentServicer_to_server,
        AgentServicer(settings, repository, cpu_limit, lambda: request_overhead_ms(settings)),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The agent process is healthy as soon as it serves; the Shard service only once a range is loaded.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    return AgentServer(server, port, repository, executor, health_servicer)
