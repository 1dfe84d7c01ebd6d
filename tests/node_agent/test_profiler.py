"""The profiler role in-process: it profiles the model of its own arguments, for the operator only,
and nothing a request names instead; the monitor role profiles no model at all."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from amp4ec import pki
from amp4ec.node_agent import AgentSettings
from amp4ec.node_agent.authz import profiler_policy
from amp4ec.node_agent.profiler import MonitorServicer, create_profiler
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

MODEL = agent_pb2.StageSpec(model="tests.model_zoo:residual_net", seed=3)


def test_only_the_operator_may_call_a_profiler() -> None:
    profile = "/amp4ec.wire.v1.Monitor/Profile"
    assert profiler_policy(profile, frozenset({pki.OPERATOR}))
    for other in (pki.MONITOR, pki.profiler_identity("ml", "mine"), pki.client_identity("ml", "mine")):
        assert not profiler_policy(profile, frozenset({other}))
    assert profiler_policy("/grpc.health.v1.Health/Check", frozenset({pki.MONITOR}))


def test_a_profiler_profiles_its_own_model_and_refuses_any_other() -> None:
    settings = AgentSettings(control_port=0, cpu_limit=1.0, allowed_factories=("tests.model_zoo",))

    async def main() -> None:
        profiler = await create_profiler(settings, MODEL)
        await profiler.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{profiler.control_port}") as channel:
                stub = agent_pb2_grpc.MonitorStub(channel)
                other = agent_pb2.ProfileRequest(model=agent_pb2.StageSpec(model="mobilenet_v2"))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Profile(other, timeout=60)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "only its own model" in (refused.value.details() or "")
                answer = await stub.Profile(agent_pb2.ProfileRequest(repeats=1), timeout=120)
                assert answer.model == MODEL.model and len(answer.blocks) >= 2
                assert answer.reference_workload_ms > 0
                assert all(not b.batch_ms for b in answer.blocks)  # batch 1 only unless asked
                batched = await stub.Profile(
                    agent_pb2.ProfileRequest(repeats=1, batch_sizes=[4, 2]), timeout=120
                )
                for b in batched.blocks:  # the sizes asked for, in increasing order
                    assert [(t.batch, t.ms > 0) for t in b.batch_ms] == [(2, True), (4, True)]
                # No NodeAgent service (LoadStage, Echo, …) on a profiler: Profile only.
                with pytest.raises(grpc.aio.AioRpcError) as absent:
                    await agent_pb2_grpc.NodeAgentStub(channel).Echo(agent_pb2.Probe(), timeout=10)
                assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await profiler.stop(0)

    asyncio.run(main())


def test_a_monitor_checks_the_bounds_then_refuses_every_model() -> None:
    servicer = MonitorServicer(AgentSettings(allowed_factories=("tests.model_zoo",)), models=False)

    class Context:
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise grpc.aio.AbortError(f"{code.name}: {details}")

    for request, expected in (
        (agent_pb2.ProfileRequest(model=MODEL), "PERMISSION_DENIED: this monitor profiles no model"),
        (agent_pb2.ProfileRequest(model=MODEL, repeats=10**6), "INVALID_ARGUMENT: repeats"),
        (agent_pb2.ProfileRequest(model=MODEL, batch_sizes=[2, 1]), r"INVALID_ARGUMENT: batch_sizes\[1\]"),
        (agent_pb2.ProfileRequest(model=MODEL, batch_sizes=[65]), r"INVALID_ARGUMENT: batch_sizes\[0\]"),
        (agent_pb2.ProfileRequest(model=MODEL, batch_sizes=[2] * 9), "INVALID_ARGUMENT: batch_sizes: "),
    ):
        with pytest.raises(grpc.aio.AbortError, match=expected):
            asyncio.run(servicer.Profile(request, Context()))  # type: ignore[arg-type]
