"""Dynamic batching in the node agent: batched answers equal unbatched ones, each request keeps
its own error, deadline and cancellation, and batches stay within the agent's bounds."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from prometheus_client import REGISTRY
from torch import nn

from amp4ec.errors import DeadlineExceeded, InvalidSpec, ShapeMismatch
from amp4ec.node_agent import AgentSettings, create_server
from amp4ec.node_agent.batching import StreamShare, stream_share
from amp4ec.node_agent.executor import LoadedStage, StageExecutor, build_stage
from amp4ec.node_agent.limits import check_stage_spec
from amp4ec.slicing.blocks import Block, Shard, TensorSpec
from amp4ec.wire import codec
from amp4ec.wire.stage import StageConfig
from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

MODEL = "tests.model_zoo:residual_net"


def _frame(request_id: str, *tensors: torch.Tensor, deadline_unix_ms: int = 0) -> shard_pb2.Frame:
    return shard_pb2.Frame(
        request_id=request_id, tensors=codec.encode_all(tensors), deadline_unix_ms=deadline_unix_ms
    )


async def _run_together(executor: StageExecutor, stage: LoadedStage, frames: list[shard_pb2.Frame]) -> list:
    """Queue every frame before the workers look (one event-loop turn), then collect the outcomes."""
    return await asyncio.gather(
        *(executor.run(stage, f, time.perf_counter()) for f in frames), return_exceptions=True
    )


@pytest.fixture(scope="module")
def residual() -> LoadedStage:
    stage = build_stage(StageConfig(MODEL, 0, -1, max_batch_requests=4))
    assert stage.shard.batch_flexible
    return stage


def test_batched_outputs_equal_unbatched_ones(residual: LoadedStage) -> None:
    torch.manual_seed(0)
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(7)]
    with torch.inference_mode():
        alone = [residual.shard(x)[0] for x in inputs]
    sizes: list[int] = []

    async def main() -> list:
        executor = StageExecutor(cpu_limit=1.0, on_batch=sizes.append)
        try:
            return await _run_together(executor, residual, [_frame(str(i), x) for i, x in enumerate(inputs)])
        finally:
            executor.shutdown()

    outcomes = asyncio.run(main())
    assert sizes == [4, 3]  # max_batch_requests=4: seven waiting requests make two forwards
    for (tensors, _), expected in zip(outcomes, alone, strict=True):
        torch.testing.assert_close(codec.decode_all(tensors)[0], expected, rtol=1e-4, atol=1e-5)
    assert [t.batch for _, t in outcomes] == [4] * 4 + [3] * 3


def test_an_idle_stage_runs_a_request_alone_at_once(residual: LoadedStage) -> None:
    async def main() -> shard_pb2.StageTiming:
        executor = StageExecutor(cpu_limit=1.0)
        try:
            _, timing = await executor.run(
                residual, _frame("a", torch.randn(1, 3, 16, 16)), time.perf_counter()
            )
        finally:
            executor.shutdown()
        return timing

    assert asyncio.run(main()).batch == 1  # no queue: nothing to wait for (max_queue_delay_ms 0)


def test_batches_stay_within_the_agents_rows(residual: LoadedStage) -> None:
    sizes: list[int] = []
    two_rows = [_frame(str(i), torch.randn(2, 3, 16, 16)) for i in range(4)]

    async def main() -> list:
        executor = StageExecutor(cpu_limit=1.0, max_rows=5, on_batch=sizes.append)
        try:
            return await _run_together(executor, residual, two_rows)
        finally:
            executor.shutdown()

    outcomes = asyncio.run(main())
    assert sizes == [2, 2]  # a third request would make 6 rows, over --max-batch 5
    assert all(codec.decode_all(tensors)[0].shape == (2, 10) for tensors, _ in outcomes)


class _FailsOnNaN(nn.Module):
    """A block that refuses any batch holding a NaN (as a model can fail on one bad input)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if torch.isnan(x).any():
            raise ValueError("NaN in the input")
        return (x * 2,)


def _nan_stage(flexible: bool = True) -> LoadedStage:
    spec = TensorSpec((1, 4), torch.float32)
    shard = Shard([Block(0, "b", _FailsOnNaN())], (spec,), (spec,), batch_flexible=flexible)  # type: ignore[arg-type]
    return LoadedStage(StageConfig("test", 0, 0, max_batch_requests=8), shard, num_blocks=1)


def test_a_bad_request_inside_a_batch_fails_alone() -> None:
    stage = _nan_stage()
    nan = torch.full((1, 4), float("nan"))
    frames = [
        _frame("0", torch.ones(1, 4)),
        _frame("wrong shape", torch.ones(1, 5)),  # refused before the forward
        _frame("2", torch.ones(1, 4) * 2),
        _frame("nan", nan),  # breaks the batched forward: the others are run again alone
        _frame("4", torch.ones(1, 4) * 4),
    ]
    sizes: list[int] = []

    async def main() -> list:
        executor = StageExecutor(cpu_limit=1.0, on_batch=sizes.append)
        try:
            return await _run_together(executor, stage, frames)
        finally:
            executor.shutdown()

    outcomes = asyncio.run(main())
    assert sizes == [5]
    assert isinstance(outcomes[1], ShapeMismatch) and "expected" in str(outcomes[1])
    assert isinstance(outcomes[3], ValueError)
    for i in (0, 2, 4):
        tensors, timing = outcomes[i]
        torch.testing.assert_close(codec.decode_all(tensors)[0], torch.ones(1, 4) * 2 * max(i, 1))
        assert timing.batch == 4  # the requests that reached the forward (the NaN one too)


def test_a_deadline_or_a_cancelled_wait_inside_a_batch_fails_alone() -> None:
    stage = _nan_stage()
    past = int(time.time() * 1000) - 1000
    sizes: list[int] = []

    async def main() -> tuple[list, bool]:
        executor = StageExecutor(cpu_limit=1.0, on_batch=sizes.append)
        try:
            gone = asyncio.ensure_future(executor.run(stage, _frame("gone", torch.ones(1, 4)), 0.0))
            await asyncio.sleep(0)  # queued, not yet taken by the worker
            gone.cancel()  # the caller gave up (the servicer cancels on its deadline or a dropped stream)
            frames = [
                _frame("0", torch.ones(1, 4)),
                _frame("late", torch.ones(1, 4), deadline_unix_ms=past),
                _frame("2", torch.ones(1, 4)),
            ]
            outcomes = await _run_together(executor, stage, frames)
        finally:
            executor.shutdown()
        return outcomes, gone.cancelled()

    outcomes, cancelled = asyncio.run(main())
    assert cancelled and sizes == [3]  # the cancelled request never reached a forward
    assert isinstance(outcomes[1], DeadlineExceeded) and "deadline" in str(outcomes[1])
    assert [o[1].batch for i, o in enumerate(outcomes) if i != 1] == [2, 2]


def test_a_stage_without_batch_flexible_inputs_runs_requests_alone() -> None:
    fixed = _nan_stage(flexible=False)
    sizes: list[int] = []

    async def main() -> None:
        executor = StageExecutor(cpu_limit=1.0, on_batch=sizes.append)
        try:
            await _run_together(executor, fixed, [_frame(str(i), torch.ones(1, 4)) for i in range(3)])
        finally:
            executor.shutdown()

    asyncio.run(main())
    assert sizes == [1, 1, 1]


def test_batching_bounds_are_checked_naming_the_field() -> None:
    settings = AgentSettings(max_batch=8)
    check_stage_spec(
        StageConfig("mobilenet_v2", max_batch_requests=8, max_queue_delay_ms=5).to_message(), settings
    )
    for spec, field in [
        (StageConfig("mobilenet_v2", max_batch_requests=9), "max_batch_requests"),
        (StageConfig("mobilenet_v2", max_queue_delay_ms=-1.0), "max_queue_delay_ms"),
        (StageConfig("mobilenet_v2", max_queue_delay_ms=float("nan")), "max_queue_delay_ms"),
        (StageConfig("mobilenet_v2", max_queue_delay_ms=5000.0), "max_queue_delay_ms"),
    ]:
        with pytest.raises(InvalidSpec, match=field):
            check_stage_spec(spec.to_message(), settings)


def _batched(node: str) -> float:
    """Requests the agent's forwards have run, from its exported batch sizes."""
    return REGISTRY.get_sample_value("amp4ec_stage_batch_size_sum", {"node": node}) or 0.0


def test_a_stream_of_requests_is_batched_by_the_agent() -> None:
    """Over gRPC: four requests written at once on one stream wait up to 1 s for each other, so
    they meet in one forward; a malformed one among them fails alone; the batch is exported."""
    torch.manual_seed(1)
    inputs = [torch.randn(1, 3, 16, 16) for _ in range(3)]
    with torch.inference_mode():
        module = build_stage(StageConfig(MODEL, 0, -1)).shard
        expected = [module(x)[0] for x in inputs]
    node = "batching-test"

    async def main() -> dict[str, shard_pb2.Frame]:
        settings = AgentSettings(node=node, port=0, cpu_limit=1.0, allowed_factories=("tests.model_zoo",))
        agent = await create_server(settings)
        await agent.load(StageConfig(MODEL, 0, -1, max_batch_requests=4, max_queue_delay_ms=1000))
        await agent.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
        try:
            call = shard_pb2_grpc.ShardStub(channel).Stream()
            for i, x in enumerate(inputs[:2]):
                await call.write(_frame(str(i), x))
            await call.write(_frame("bad", torch.zeros(1, 3, 8, 8)))
            await call.write(_frame("2", inputs[2]))
            await call.done_writing()
            return {a.request_id: a async for a in call}
        finally:
            await channel.close()
            await agent.stop(0)

    before = _batched(node)
    answers = asyncio.run(main())
    assert answers["bad"].error.code == "INVALID_ARGUMENT"
    for i, x in enumerate(expected):
        answer = answers[str(i)]
        torch.testing.assert_close(codec.decode_all(answer.tensors)[0], x, rtol=1e-4, atol=1e-5)
        assert answer.timings[0].batch == 3
    assert _batched(node) - before == 4  # one forward of the four requests, exported


def test_a_streams_share_holds_a_running_and_a_waiting_batch_and_follows_the_stage() -> None:
    assert stream_share(workers=1, batch=1) == 1  # unbatched: as before, one per worker
    assert stream_share(workers=2, batch=4) == 16
    limit = [2]

    async def main() -> tuple[list[str], list[int]]:
        share = StreamShare(lambda: limit[0])
        order: list[str] = []
        holding: list[int] = []
        inside = 0
        release = asyncio.Event()

        async def hold(name: str) -> None:
            nonlocal inside
            async with share:
                inside += 1
                order.append(name)
                holding.append(inside)
                await release.wait()
                await asyncio.sleep(0)
                inside -= 1

        tasks = {n: asyncio.create_task(hold(n)) for n in ("a", "b", "c", "d", "e")}
        await asyncio.sleep(0)  # a and b enter; c, d, e wait
        assert order == ["a", "b"]
        tasks["c"].cancel()  # a waiter whose caller gave up is skipped
        limit[0] = 1  # a stage loaded without batching: read on entry, one at a time from now
        release.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return order, holding

    order, holding = asyncio.run(main())
    assert order[:2] == ["a", "b"] and sorted(order[2:]) == ["d", "e"]
    assert holding[:2] == [1, 2] and holding[2:] == [1, 1]  # never two at once after the change
