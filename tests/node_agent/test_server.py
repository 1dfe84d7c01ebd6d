"""The shard servicer in-process: answers equal the monolith's, malformed frames are refused
with INVALID_ARGUMENT naming the field, and the agent keeps serving afterwards."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from amp4ec.node_agent import AgentSettings, StageConfig, create_server
from amp4ec.slicing import ModelSource, load_model
from amp4ec.wire import codec
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc, shard_pb2, shard_pb2_grpc

MODEL = "tests.model_zoo:residual_net"


@pytest.fixture(scope="module")
def monolith():
    loaded = load_model(ModelSource(MODEL))
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    return loaded.example_inputs, (out if isinstance(out, tuple) else (out,))


async def _agent(config: StageConfig | None = None):
    settings = AgentSettings(port=0, control_port=0, cpu_limit=1.0, allowed_factories=("tests.model_zoo",))
    agent = await create_server(settings)
    if config is not None:
        await agent.load(config)
    await agent.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
    return agent, channel


def _frame(request_id: str, tensors) -> shard_pb2.Frame:
    return shard_pb2.Frame(request_id=request_id, tensors=codec.encode_all(tensors))


async def _close(agent, channel) -> None:
    await channel.close()
    await agent.stop(0)


def test_infer_whole_model_equals_monolith(monolith) -> None:
    inputs, expected = monolith

    async def main() -> None:
        agent, channel = await _agent(StageConfig(MODEL, 0, -1))
        try:
            stub = shard_pb2_grpc.ShardStub(channel)
            answer = await stub.Infer(_frame("a", inputs))
            outputs = codec.decode_all(answer.tensors)
            torch.testing.assert_close(outputs, expected, rtol=1e-4, atol=1e-5)
            assert answer.request_id == "a" and len(answer.timings) == 1
            info = await stub.Describe(shard_pb2.DescribeRequest())
            assert info.first_block == 0 and info.last_block == info.num_blocks - 1
            assert list(info.inputs[0].shape) == list(inputs[0].shape)
        finally:
            await _close(agent, channel)

    asyncio.run(main())


def test_malformed_frames_get_invalid_argument_and_agent_keeps_serving(monolith) -> None:
    inputs, expected = monolith
    good = codec.encode(inputs[0])
    truncated = shard_pb2.Tensor(dtype=good.dtype, shape=good.shape, data=good.data[:-3])
    wrong_dtype = codec.encode(inputs[0].double())
    wrong_shape = codec.encode(torch.zeros(1, 3, 8, 8))
    unknown_dtype = shard_pb2.Tensor(dtype="float8", shape=good.shape, data=good.data)

    async def main() -> None:
        agent, channel = await _agent(StageConfig(MODEL, 0, -1))
        try:
            stub = shard_pb2_grpc.ShardStub(channel)
            cases = {
                "data": truncated,
                "expected float32": wrong_dtype,
                "expected": wrong_shape,
                "dtype": unknown_dtype,
            }
            for needle, tensor in cases.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Infer(shard_pb2.Frame(request_id="bad", tensors=[tensor]))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert needle in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(shard_pb2.Frame(request_id="none"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Still serving.
            answer = await stub.Infer(_frame("ok", inputs))
            torch.testing.assert_close(codec.decode_all(answer.tensors), expected, rtol=1e-4, atol=1e-5)
        finally:
            await _close(agent, channel)

    asyncio.run(main())


def test_stream_pipelines_requests_and_isolates_a_bad_one(monolith) -> None:
    inputs, expected = monolith

    async def main() -> None:
        agent, channel = await _agent(StageConfig(MODEL, 0, -1))
        try:
            call = shard_pb2_grpc.ShardStub(channel).Stream()
            for i in range(12):
                tensors = [torch.zeros(2, 2)] if i == 5 else list(inputs)
                await call.write(_frame(str(i), tensors))
            await call.done_writing()
            answers = {a.request_id: a async for a in call}
            assert set(answers) == {str(i) for i in range(12)}
            assert answers["5"].error.code == "INVALID_ARGUMENT"
            assert "expected" in answers["5"].error.message
            for i in range(12):
                if i != 5:
                    torch.testing.assert_close(
                        codec.decode_all(answers[str(i)].tensors), expected, rtol=1e-4, atol=1e-5
                    )
            assert await call.code() == grpc.StatusCode.OK
        finally:
            await _close(agent, channel)

    asyncio.run(main())


def test_no_stage_deadline_and_unreachable_next_hop(monolith) -> None:
    inputs, _ = monolith

    async def main() -> None:
        agent, channel = await _agent()
        try:
            stub = shard_pb2_grpc.ShardStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(_frame("x", inputs))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            control_channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.control_port}")
            control = agent_pb2_grpc.NodeAgentStub(control_channel)
            # A next hop nobody listens on: the request fails UNAVAILABLE, the agent lives on.
            with socket_port() as dead_port:
                info_reply = await control.LoadStage(
                    agent_pb2.StageSpec(
                        model=MODEL, first_block=0, last_block=0, next_hop=f"127.0.0.1:{dead_port}"
                    )
                )
            assert info_reply.last_block == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(_frame("y", inputs))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "stage 1 on 127.0.0.1:" in info.value.details()
            expired = _frame("z", inputs)
            expired.deadline_unix_ms = int(time.time() * 1000) - 1
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Infer(expired)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await control.LoadStage(
                    agent_pb2.StageSpec(model="no_such_model", first_block=0, last_block=0)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no_such_model" in info.value.details()
            capacity = await control.GetCapacity(agent_pb2.CapacityRequest())
            assert (
                capacity.cpu_limit == 1.0 and capacity.workload_ms > 0 and capacity.memory_available_bytes > 0
            )
            # Measured on the agent's own gRPC path: some CPU, far less than a forward.
            assert 0 < capacity.request_overhead_ms < 50
            await control_channel.close()
        finally:
            await _close(agent, channel)

    asyncio.run(main())


class socket_port:
    """A port that was free a moment ago and has nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


def test_cancelled_stream_drops_its_requests_and_agent_keeps_serving(monolith) -> None:
    inputs, expected = monolith

    async def main() -> None:
        agent, channel = await _agent(StageConfig(MODEL, 0, -1))
        try:
            stub = shard_pb2_grpc.ShardStub(channel)
            call = stub.Stream()
            for i in range(20):
                await call.write(_frame(str(i), inputs))
            first = await call.read()
            assert first.request_id == "0"
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()
            # A deadline on the stream ends it with DEADLINE_EXCEEDED, not a hang.
            slow = stub.Stream(timeout=0.5)
            await slow.write(_frame("late", inputs))  # never half-closed: only the deadline ends it
            assert await slow.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            answer = await stub.Infer(_frame("after", inputs))
            torch.testing.assert_close(codec.decode_all(answer.tensors), expected, rtol=1e-4, atol=1e-5)
        finally:
            await _close(agent, channel)

    asyncio.run(main())
