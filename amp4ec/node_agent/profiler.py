"""The profiler role: a node agent that serves ``Monitor.Profile`` and nothing else.

``python -m amp4ec.node_agent --profiler --model M [--seed S --input-shape …] --control-port P
--health-port H --tls-…`` is what the operator runs in a short-lived Pod in a deployment's
namespace, with that deployment's profiler identity (``profiler.<deployment>.<namespace>.amp4ec``),
a memory limit and a deadline: a user's model (an allowed factory, a ``.pt2`` archive from
storage, a zoo model at the user's input shape) is loaded only there, never in a cluster-wide
component (the monitors refuse, ``monitor.REFUSED``). It profiles only the model of its own
arguments: a request names that model or none, so nothing on the network can make it load
another. One server: mutual TLS, the operator's identity only (``authz``), no ``Shard`` and no
``NodeAgent`` service; a plaintext health-only port for the kubelet's probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amp4ec.node_agent.authz import profiler_policy
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.monitor import MonitorServicer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["MONITOR_SERVICE", "ProfilerServer", "create_profiler"]

MONITOR_SERVICE = "amp4ec.wire.v1.Monitor"
"""The health service name a profiler reports SERVING once it takes Profile calls."""


@dataclass
class ProfilerServer:
    control: grpc.aio.Server
    control_port: int
    health: health.aio.HealthServicer
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    @property
    def servers(self) -> list[grpc.aio.Server]:
        return [s for s in (self.control, self.health_server) if s is not None]

    async def start(self) -> None:
        for s in self.servers:
            await s.start()
        await self.health.set(MONITOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        for s in self.servers:
            await s.stop(grace)


async def create_profiler(settings: AgentSettings, model: agent_pb2.StageSpec) -> ProfilerServer:
    """Bind the profiler's control port (``settings.control_port``; 0 = any) and health port;
    ``model`` is the one model it profiles."""
    if settings.control_port is None:
        raise ValueError("--control-port: the profiler serves Monitor.Profile on the control port")
    security = settings.security
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(MONITOR_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    # One Profile at a time (MonitorServicer's lock); a few calls at once are plenty.
    control = transport.server(
        security, profiler_policy, settings.server_options(), maximum_concurrent_rpcs=8
    )
    add_servicer(agent_pb2_grpc.add_MonitorServicer_to_server, MonitorServicer(settings, only=model), control)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, control)
    port = transport.add_port(control, f"{settings.host}:{settings.control_port}", security)
    server = ProfilerServer(control, port, health_servicer)
    if settings.health_port is not None:
        plain = transport.TransportSecurity.plaintext()
        server.health_server = transport.server(plain, None)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server.health_server)
        address = f"{settings.host}:{settings.health_port}"
        server.health_port = transport.add_port(server.health_server, address, plain)
    return server
