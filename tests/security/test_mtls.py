"""Mutual TLS and the closed control plane, tried as an attacker would: real agent processes,
real TLS, real certificates (issue 10, items 2, 3 and 8).

One local cluster of two agents (node0 → node1) serves every test; after each attack a
legitimate request is answered, so the agents are alive and serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from amp4ec import pki
from amp4ec.client import Client
from amp4ec.local.cluster import CLIENT_IDENTITY, LocalCluster, NodeSpec
from amp4ec.slicing import ModelSource, load_model, split_model
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2, shard_pb2_grpc

pytestmark = pytest.mark.slow
SOURCE = ModelSource("mobilenet_v2", input_shape=(1, 3, 32, 32))
SHARD = "/amp4ec.wire.v1.Shard/Stream"


class Scenario:
    """The cluster, its event loop and the model's cut, shared by the module's tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        loaded = load_model(SOURCE)
        self.inputs = loaded.example_inputs
        with torch.inference_mode():
            self.expected = loaded.module(*self.inputs)
        self.cut = len(split_model(loaded)) // 2
        self.cluster = LocalCluster([NodeSpec("node0", 1.0), NodeSpec("node1", 1.0)], limit_mode="none")
        self.run(self.cluster.start())
        self.run(self.deploy(self.cluster.address("node1")))

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def spec(self, stage: int, next_hop: str = "", **identities: object) -> agent_pb2.StageSpec:
        first, last = (0, self.cut - 1) if stage == 0 else (self.cut, -1)
        defaults: dict[str, object] = {
            "next_hop_identity": self.cluster.identity("node1") if next_hop else "",
            "accept_from": [CLIENT_IDENTITY if stage == 0 else self.cluster.identity("node0")],
        }
        defaults.update(identities)
        return agent_pb2.StageSpec(
            model=SOURCE.spec,
            input_shape=list(SOURCE.input_shape or ()),
            first_block=first,
            last_block=last,
            next_hop=next_hop,
            stage=stage,
            **defaults,  # type: ignore[arg-type]
        )

    async def deploy(self, next_hop: str) -> None:
        await self.cluster.load("node1", self.spec(1))
        await self.cluster.load("node0", self.spec(0, next_hop))

    async def serves(self) -> None:
        """A legitimate client is answered with the monolith's output."""
        async with self.cluster.client(["node0"]) as client:
            result = await client.infer(self.inputs)
        torch.testing.assert_close(result.outputs[0], self.expected, rtol=1e-4, atol=1e-5)
        assert [t.stage for t in result.timings] == [0, 1]

    def close(self) -> None:
        self.run(self.cluster.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    s = Scenario()
    try:
        yield s
    finally:
        s.close()


def _frame(s: Scenario) -> shard_pb2.Frame:
    from amp4ec.wire import codec

    return shard_pb2.Frame(request_id="attack", tensors=codec.encode_all(s.inputs))


async def _infer_with(channel: grpc.aio.Channel, s: Scenario) -> shard_pb2.Frame:
    async with channel:
        return await shard_pb2_grpc.ShardStub(channel).Infer(_frame(s), timeout=10)


def test_mutual_tls_pipeline_equals_monolith(scenario: Scenario) -> None:
    assert scenario.cluster.secure
    scenario.run(scenario.serves())


@pytest.mark.parametrize("port", ["data", "control"])
def test_plaintext_client_is_refused(scenario: Scenario, port: str) -> None:
    agent = scenario.cluster.agents["node0"]
    target = agent.address if port == "data" else agent.control_address

    async def attack() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent_pb2_grpc.NodeAgentStub(channel).LoadStage(
                    scenario.spec(0, "10.0.0.1:1"), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await shard_pb2_grpc.ShardStub(channel).Infer(_frame(scenario), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await scenario.serves()

    scenario.run(attack())


def test_certificate_from_another_ca_is_refused(scenario: Scenario) -> None:
    """The right names, signed by the attacker's own CA: the handshake fails both ways."""
    rogue_ca = pki.CertificateAuthority.create("rogue")
    for identity in (CLIENT_IDENTITY, pki.OPERATOR):
        pair = rogue_ca.issue(identity)
        # The attacker trusts the real CA (public) so only the agent's check can refuse it.
        rogue = transport.TransportSecurity(scenario.cluster.security.ca_pem, pair.cert_pem, pair.key_pem)
        agent = scenario.cluster.agents["node0"]

        async def attack(rogue: transport.TransportSecurity = rogue, agent=agent) -> None:  # type: ignore[no-untyped-def]
            node0 = scenario.cluster.identity("node0")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _infer_with(transport.channel(agent.address, rogue, expect_identity=node0), scenario)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            async with transport.channel(agent.control_address, rogue, expect_identity=node0) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await agent_pb2_grpc.NodeAgentStub(channel).UnloadStage(
                        agent_pb2.UnloadRequest(), timeout=10
                    )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await scenario.serves()

        scenario.run(attack())


@pytest.mark.parametrize("who", ["client", "shard", "monitor"])
def test_data_plane_identities_cannot_steer_the_control_plane(scenario: Scenario, who: str) -> None:
    """Valid certificates of the same CA, but not the operator's: every control call but a
    monitor's Echo is PERMISSION_DENIED, naming the caller and the method."""
    identity = {
        "client": CLIENT_IDENTITY,
        "shard": scenario.cluster.identity("node1"),
        "monitor": pki.MONITOR,
    }[who]
    security = scenario.cluster.issue(identity)
    agent = scenario.cluster.agents["node0"]

    async def attack() -> None:
        async with transport.channel(
            agent.control_address, security, expect_identity=scenario.cluster.identity("node0")
        ) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            calls = {
                "LoadStage": stub.LoadStage(scenario.spec(0, "10.0.0.1:1"), timeout=10),
                "UnloadStage": stub.UnloadStage(agent_pb2.UnloadRequest(), timeout=10),
                "GetCapacity": stub.GetCapacity(agent_pb2.CapacityRequest(), timeout=10),
                "Echo": stub.Echo(agent_pb2.Probe(reply_bytes=1), timeout=10),
            }
            for method, call in calls.items():
                if who == "monitor" and method == "Echo":
                    assert (await call).payload == b"\0"  # link probes between monitors
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
                assert identity in info.value.details() and method in info.value.details()
        await scenario.serves()

    scenario.run(attack())


def test_a_stage_accepts_frames_only_from_its_previous_stage(scenario: Scenario) -> None:
    """The client may call the entry, not stage 1 directly; stage 0's identity may not call
    the entry (it is not a client); a shard refuses Stream and Describe alike."""
    cluster = scenario.cluster
    cases = [
        ("node1", CLIENT_IDENTITY),  # skipping the entry stage
        ("node0", cluster.identity("node0")),  # a shard posing as a client
        ("node1", cluster.identity("node1")),  # itself
        ("node0", pki.OPERATOR),  # the control identity is not a data-plane one
    ]

    async def attack() -> None:
        for node, identity in cases:
            channel = transport.channel(
                cluster.address(node), cluster.issue(identity), expect_identity=cluster.identity(node)
            )
            async with channel:
                stub = shard_pb2_grpc.ShardStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Infer(_frame(scenario), timeout=10)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (node, identity)
                assert identity in info.value.details()
                call = stub.Stream(timeout=10)
                with contextlib.suppress(grpc.aio.AioRpcError):  # the call may end before this
                    await call.done_writing()
                code = await call.code()
                assert code == grpc.StatusCode.PERMISSION_DENIED, (code, await call.details())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Describe(shard_pb2.DescribeRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await scenario.serves()

    scenario.run(attack())


class _Forger(shard_pb2_grpc.ShardServicer):
    """A next hop that answers every frame with zeros, and counts what it was sent."""

    def __init__(self) -> None:
        self.frames = 0

    async def Stream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for frame in request_iterator:
            self.frames += 1
            yield shard_pb2.Frame(request_id=frame.request_id)


@pytest.mark.parametrize("forgery", ["wrong identity", "right identity, rogue CA"])
def test_a_forged_next_hop_is_refused_by_the_forwarding_shard(scenario: Scenario, forgery: str) -> None:
    """The operator named node1's identity as the next hop; a server at the next hop's address
    with a valid certificate of another identity (or node1's name from another CA) never gets
    a frame, the request fails UNAVAILABLE rather than answered by the forger."""
    cluster = scenario.cluster
    if forgery == "wrong identity":
        security = cluster.issue("agent.forger.amp4ec")
    else:
        pair = pki.CertificateAuthority.create("rogue").issue(cluster.identity("node1"))
        security = transport.TransportSecurity(cluster.security.ca_pem, pair.cert_pem, pair.key_pem)
    forger = _Forger()

    async def attack() -> None:
        server = transport.server(security, None)
        shard_pb2_grpc.add_ShardServicer_to_server(forger, server)
        port = transport.add_port(server, "127.0.0.1:0", security)
        await server.start()
        try:
            await cluster.load("node0", scenario.spec(0, f"127.0.0.1:{port}"))
            async with cluster.client(["node0"]) as client:
                with pytest.raises(Exception, match="UNAVAILABLE") as info:
                    await client.infer(scenario.inputs)
            assert "stage 1 on" in str(info.value)  # the forwarding shard refused its next hop
        finally:
            await server.stop(None)
            await scenario.deploy(cluster.address("node1"))
        assert forger.frames == 0
        await scenario.serves()

    scenario.run(attack())


def test_a_stage_without_identities_is_not_loaded_under_mutual_tls(scenario: Scenario) -> None:
    async def attempt() -> None:
        stub = scenario.cluster.agent_stub("node0")
        for spec, field in [
            (scenario.spec(0, scenario.cluster.address("node1"), next_hop_identity=""), "next_hop_identity"),
            (scenario.spec(0, scenario.cluster.address("node1"), accept_from=[]), "accept_from"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.LoadStage(spec, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(field)
        await scenario.serves()

    scenario.run(attempt())


def test_private_keys_on_disk_are_0600_in_a_0700_directory(scenario: Scenario) -> None:
    agent = scenario.cluster.agents["node0"]
    workdir = agent.port_file.parent
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
    keys = list(workdir.glob("*.key"))
    assert len(keys) == 2
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_client_without_identities_is_refused_before_dialling(scenario: Scenario) -> None:
    with pytest.raises(Exception, match="needs the identity its server must present"):
        Client([scenario.cluster.address("node0")], scenario.cluster.client_security)


def test_keys_written_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        pair = pki.CertificateAuthority.create().issue("client.d.ns.amp4ec")
        (tmp_path / "tls.key").write_bytes(b"old")
        (tmp_path / "tls.key").chmod(0o644)  # an older, world-readable file is replaced, not reused
        cert, key = pair.write(tmp_path, "tls")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == pair.key_pem and cert.read_bytes() == pair.cert_pem
