"""A renewed certificate on disk is used without a restart (transport.py's Note: renewed
certificates): an agent's servers present it at the next handshake, real TLS, in process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from amp4ec import pki
from amp4ec.node_agent import AgentSettings, create_server
from amp4ec.wire import transport
from tests.security.leaves import write_leaf

AGENT = pki.agent_identity("n0")


async def _check(address: str, security: transport.TransportSecurity) -> int:
    async with transport.channel(address, security, expect_identity=AGENT) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status


def test_servers_present_a_renewed_certificate_at_the_next_handshake(tmp_path: Path) -> None:
    old_ca, new_ca = pki.CertificateAuthority.create("old"), pki.CertificateAuthority.create("new")
    write_leaf(old_ca, tmp_path, AGENT)
    files = (tmp_path / "ca.crt", tmp_path / "agent.crt", tmp_path / "agent.key")

    def operator(ca: pki.CertificateAuthority) -> transport.TransportSecurity:
        pair = ca.issue(pki.OPERATOR)
        return transport.TransportSecurity(ca.cert_pem, pair.cert_pem, pair.key_pem)

    async def main() -> None:
        security = transport.TransportSecurity.from_files(*files)
        agent = await create_server(AgentSettings(security=security, control_port=0, cpu_limit=1.0))
        await agent.start()
        address = f"127.0.0.1:{agent.control_port}"
        try:
            assert await _check(address, operator(old_ca)) == health_pb2.HealthCheckResponse.SERVING
            # The CA Secret was replaced and every leaf re-issued: same files, new content.
            write_leaf(new_ca, tmp_path, AGENT)
            assert security.refreshed().identity == AGENT and security.refreshed() is not security
            with pytest.raises(grpc.aio.AioRpcError) as info:  # the old CA no longer verifies it
                await _check(address, operator(old_ca))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await _check(address, operator(new_ca)) == health_pb2.HealthCheckResponse.SERVING
        finally:
            await agent.stop(0)

    asyncio.run(main())


def test_refreshed_keeps_what_it_has_while_files_are_unchanged_or_broken(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create()
    write_leaf(ca, tmp_path, AGENT)
    security = transport.TransportSecurity.from_files(
        tmp_path / "ca.crt", tmp_path / "agent.crt", tmp_path / "agent.key"
    )
    assert security.refreshed() is security
    (tmp_path / "agent.crt").write_bytes(b"half-written")
    assert security.refreshed() is security  # a broken set never replaces a working one
