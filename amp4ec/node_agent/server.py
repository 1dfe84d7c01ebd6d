"""create_server(settings) -> AgentServer: the node agent's gRPC servers, bound, ready to start.

Up to three servers, each authorised on its own (see docs/security.md):

- data (``port``): ``Shard`` and health; a Shard call is served only for the identities
  the loaded stage accepts frames from (its previous stage, or its clients);
- control (``control_port``): ``NodeAgent`` (and ``Monitor`` in the monitor role); only the
  operator, or the local supervisor, may call it, monitors only ``Echo`` (link probes);
- health (``health_port``): plaintext, health only, for the kubelet's probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amp4ec.allocator import keep_activation_memory
from amp4ec.node_agent import metrics
from amp4ec.node_agent.authz import control_policy, data_policy
from amp4ec.node_agent.calibrate import request_overhead_ms
from amp4ec.node_agent.capacity import cgroup_cpu_limit
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.executor import StageExecutor
from amp4ec.node_agent.repository import StageRepository
from amp4ec.node_agent.servicer import AgentServicer, ShardServicer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import transport
from amp4ec.wire.stage import StageConfig
from amp4ec.wire.v1 import agent_pb2_grpc, shard_pb2_grpc

__all__ = ["AgentServer", "create_server"]


@dataclass
class AgentServer:
    server: grpc.aio.Server
    """The data-plane server (Shard)."""
    port: int
    repository: StageRepository
    executor: StageExecutor
    health: health.aio.HealthServicer
    shard: ShardServicer
    """The data plane's servicer (the entry's v2 front door submits requests to it)."""
    control: grpc.aio.Server | None = None
    """The control-plane server (NodeAgent, Monitor); None when ``control_port`` is None."""
    control_port: int | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    @property
    def servers(self) -> list[grpc.aio.Server]:
        return [s for s in (self.server, self.control, self.health_server) if s is not None]

    async def load(self, config: StageConfig) -> None:
        await self.repository.load(config)

    async def start(self) -> None:
        for s in self.servers:
            await s.start()

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        for s in self.servers:
            await s.stop(grace)
        await self.shard.close()
        self.executor.shutdown()


async def create_server(settings: AgentSettings) -> AgentServer:
    """Build the servers and bind their ports (0 = any free one); the caller starts them."""
    cpu_limit = settings.cpu_limit if settings.cpu_limit is not None else cgroup_cpu_limit()
    threads = settings.threads or max(1, math.floor(cpu_limit))
    torch.set_num_threads(threads)
    keep_activation_memory()  # see [Note: activation page faults]

    security = settings.security
    health_servicer = health.aio.HealthServicer()
    repository = StageRepository(settings, health_servicer)
    executor = StageExecutor(
        cpu_limit,
        emulate_cpu=settings.emulate_cpu,
        workers=settings.workers,
        max_rows=settings.max_batch,
        on_batch=metrics.BATCH_SIZE.labels(settings.node).observe,
    )

    # Data-plane calls are counted by the servicer (--max-streams); this backstop bounds the rest.
    server = transport.server(
        security,
        data_policy(repository),
        settings.server_options(),
        maximum_concurrent_rpcs=4 * settings.max_streams,
    )
    # add_servicer: undecodable requests are answered INVALID_ARGUMENT (see [Note: undecodable requests]).
    shard = ShardServicer(settings, repository, executor)
    add_servicer(shard_pb2_grpc.add_ShardServicer_to_server, shard, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The agent process is healthy as soon as it serves; the Shard service only once a range is loaded.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = transport.add_port(server, f"{settings.host}:{settings.port}", security)
    agent = AgentServer(server, port, repository, executor, health_servicer, shard)

    if settings.control_port is not None:
        agent.control = transport.server(
            security,
            control_policy,
            settings.server_options(),
            maximum_concurrent_rpcs=4 * settings.max_streams,
        )
        servicer = AgentServicer(settings, repository, cpu_limit, lambda: request_overhead_ms(settings))
        add_servicer(agent_pb2_grpc.add_NodeAgentServicer_to_server, servicer, agent.control)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, agent.control)
        agent.control_port = transport.add_port(
            agent.control, f"{settings.host}:{settings.control_port}", security
        )
    if settings.health_port is not None:
        plain = transport.TransportSecurity.plaintext()
        agent.health_server = transport.server(plain, None)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, agent.health_server)
        address = f"{settings.host}:{settings.health_port}"
        agent.health_port = transport.add_port(agent.health_server, address, plain)
    return agent
