"""Monitor ↔ monitor link probes over mutual TLS: a monitor may Echo a peer monitor's control
port and nothing else there; a peer that is not a monitor fails the probe (real TLS, in process)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from amp4ec import pki
from amp4ec.node_agent import AgentSettings, create_server
from amp4ec.node_agent.metrics import LINK_RTT
from amp4ec.node_agent.monitor import Monitor
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc


def _security(ca: pki.CertificateAuthority, identity: str) -> transport.TransportSecurity:
    pair = ca.issue(identity)
    return transport.TransportSecurity(ca.cert_pem, pair.cert_pem, pair.key_pem)


def test_monitors_probe_each_other_and_nothing_more() -> None:
    ca = pki.CertificateAuthority.create()
    monitor = _security(ca, pki.MONITOR)

    async def main() -> None:
        peer = await create_server(AgentSettings(node="b", security=monitor, control_port=0, cpu_limit=1.0))
        impostor = await create_server(
            AgentSettings(
                node="c", security=_security(ca, pki.agent_identity("c")), control_port=0, cpu_limit=1.0
            )
        )
        for agent in (peer, impostor):
            await agent.start()
        try:
            probing = Monitor(AgentSettings(node="a", security=monitor), cpu_limit=1.0)
            await probing.probe("b", f"127.0.0.1:{peer.control_port}")
            assert LINK_RTT.labels("a", "b")._value.get() > 0
            with pytest.raises(grpc.aio.AioRpcError) as info:  # not a monitor: the handshake fails
                await probing.probe("c", f"127.0.0.1:{impostor.control_port}")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # A monitor's identity reaches Echo only: no loading, no capacity, no profiling.
            channel = transport.channel(
                f"127.0.0.1:{peer.control_port}", monitor, expect_identity=pki.MONITOR
            )
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await agent_pb2_grpc.NodeAgentStub(channel).UnloadStage(
                        agent_pb2.UnloadRequest(), timeout=10
                    )
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            for agent in (peer, impostor):
                await agent.stop(0)

    asyncio.run(main())
