"""The agent's per-request overhead, measured on its own data path.

A stage costs more than its blocks: the frame is received and decoded, the result encoded
and sent on, and the answer relayed back upstream. The planner adds this figure to every
stage, so a plan of many short stages is priced what it costs.

The measurement relays small frames from a ShardStream (what a stage uses to reach its
next hop) to this agent's own ShardServicer, serving a one-block relay stage, on a throwaway
loopback server: one request costs one hop's receive side and one hop's send side, what a
middle stage pays. CPU time (all threads), not wall time, so a CPU quota or a busy machine
does not distort it. On the benchmark machine it reads ~0.5 ms. What grows with the bytes
(~1 ms of CPU per MB, both ends together) is not in it: the planner prices bytes through the
measured link bandwidth, which charges the receiving stage only, so a stage that sends a
large activation reads 1–2 ms faster than it runs on MobileNetV2 (see docs/benchmarks.md).
"""

from __future__ import annotations

import time

import torch
from grpc_health.v1 import health
from torch import fx, nn

from amp4ec.node_agent.authz import data_policy
from amp4ec.node_agent.executor import LoadedStage, StageExecutor
from amp4ec.node_agent.repository import StageRepository
from amp4ec.node_agent.servicer import ShardServicer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.slicing.blocks import Block, Shard, TensorSpec
from amp4ec.wire import codec, transport
from amp4ec.wire.stage import StageConfig
from amp4ec.wire.stream import ShardStream
from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

__all__ = ["request_overhead_ms"]

PAYLOAD = (1, 1024)
"""A small activation (4 KB): the overhead is what a request costs whatever its size; the
per-byte part is the link's bandwidth, which the link probes measure."""


class _Relay(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)


def _relay_stage(identity: str) -> LoadedStage:
    spec = TensorSpec(PAYLOAD, torch.float32)
    block = Block(0, "relay", fx.symbolic_trace(_Relay()))
    # Under mutual TLS the agent calls itself with its own certificate: TLS is part of the cost.
    config = StageConfig(model="calibration", first_block=0, last_block=0, accept_from=(identity,))
    return LoadedStage(config, Shard([block], (spec,), (spec,)), num_blocks=1)


async def request_overhead_ms(settings: AgentSettings, requests: int = 60, warmup: int = 10) -> float:
    """CPU milliseconds one request costs a stage on this node beyond its blocks (median of 3 runs)."""
    repository = StageRepository(settings, health.aio.HealthServicer())
    security = settings.security
    repository.serve(_relay_stage(security.identity))
    executor = StageExecutor(cpu_limit=1.0)
    server = transport.server(security, data_policy(repository), settings.grpc_options())
    shard_pb2_grpc.add_ShardServicer_to_server(
        ShardServicer(settings, repository, executor, observe=False), server
    )
    port = transport.add_port(server, "127.0.0.1:0", security)
    await server.start()
    stream = ShardStream(f"127.0.0.1:{port}", settings.grpc_options(), security, security.identity)
    frame = shard_pb2.Frame(tensors=codec.encode_all([torch.zeros(PAYLOAD)]))
    try:
        for _ in range(warmup):
            await _checked(stream, frame)
        runs = []
        for _ in range(3):
            start = time.process_time()
            for _ in range(requests):
                await _checked(stream, frame)
            runs.append(1000.0 * (time.process_time() - start) / requests)
    finally:
        await stream.close()
        await server.stop(None)
        executor.shutdown()
    return sorted(runs)[1]


async def _checked(stream: ShardStream, frame: shard_pb2.Frame) -> None:
    answer = await stream.call(frame)
    if answer.error.code:
        raise RuntimeError(f"overhead calibration failed: {answer.error.code}: {answer.error.message}")
