"""The forwarder pool: one stream per (address, identity), replaced when the leaf is renewed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amp4ec import pki
from amp4ec.node_agent import forwarders
from amp4ec.node_agent.forwarders import ForwarderPool
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.wire import transport
from tests.security.leaves import write_leaf

AGENT = pki.agent_identity("n0")
NEXT = pki.agent_identity("n1")


def test_the_pool_shares_streams_and_replaces_them_after_a_renewal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_leaf(pki.CertificateAuthority.create("old"), tmp_path, AGENT)
    security = transport.TransportSecurity.from_files(
        tmp_path / "ca.crt", tmp_path / "agent.crt", tmp_path / "agent.key"
    )

    async def main() -> None:
        pool = ForwarderPool(AgentSettings(security=security))
        try:
            first = pool.forwarder("127.0.0.1:1", NEXT, "stage 1 on n1")
            assert pool.forwarder("127.0.0.1:1", NEXT) is first
            assert pool.forwarder("127.0.0.1:1", pki.agent_identity("n2")) is not first
            assert first.peer == "stage 1 on n1"
            monkeypatch.setattr(forwarders, "RENEWAL_CHECK_S", 0.0)
            assert pool.forwarder("127.0.0.1:1", NEXT) is first  # files unchanged: kept
            write_leaf(pki.CertificateAuthority.create("new"), tmp_path, AGENT)
            renewed = pool.forwarder("127.0.0.1:1", NEXT)
            assert renewed is not first
            assert pool.forwarder("127.0.0.1:1", NEXT) is renewed
        finally:
            await pool.close()

    asyncio.run(main())
