"""How the agent executes: heap settings, forward workers, and its per-request overhead."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from amp4ec.errors import InvalidSpec
from amp4ec.node_agent import AgentSettings, metrics
from amp4ec.node_agent.calibrate import request_overhead_ms
from amp4ec.node_agent.executor import LoadedStage, StageConfig, StageExecutor
from amp4ec.slicing.blocks import Block, Shard, TensorSpec
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2

FAULTS = """
import resource, sys, torch
from amp4ec.allocator import keep_activation_memory
assert keep_activation_memory()
torch.set_num_threads(1)
net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(6)]).eval()
x = torch.randn(1, 32, 112, 112)  # 1.6 MB activations: above glibc's default mmap threshold
with torch.inference_mode():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap settings")
def test_activation_memory_is_kept_between_forwards() -> None:
    # Without the settings every forward faults its activations back in (thousands of pages).
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 50


class _Rendezvous(nn.Module):
    """Returns only once two forwards run at the same time (or fails after a timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        self.barrier.wait()
        return (x + 1,)


def _stage(module: nn.Module) -> LoadedStage:
    spec = TensorSpec((1, 4), torch.float32)
    shard = Shard([Block(0, "b", module)], (spec,), (spec,))  # type: ignore[arg-type]
    return LoadedStage(StageConfig(model="test", first_block=0, last_block=0), shard, num_blocks=1)


def test_two_workers_serve_two_requests_side_by_side() -> None:
    stage = _stage(_Rendezvous())
    frame = shard_pb2.Frame(tensors=codec.encode_all([torch.zeros(1, 4)]))

    async def main() -> None:
        executor = StageExecutor(cpu_limit=2.0, workers=2)
        try:
            results = await asyncio.gather(*(executor.run(stage, frame, 0.0) for _ in range(2)))
        finally:
            executor.shutdown()
        for tensors, _ in results:
            assert torch.equal(codec.decode_all(tensors)[0], torch.ones(1, 4))

    asyncio.run(main())


def test_one_worker_runs_requests_one_at_a_time() -> None:
    stage = _stage(_Rendezvous())
    stage.shard.blocks[0].barrier = threading.Barrier(2, timeout=0.5)  # type: ignore[union-attr]
    frame = shard_pb2.Frame(tensors=codec.encode_all([torch.zeros(1, 4)]))

    async def main() -> None:
        executor = StageExecutor(cpu_limit=1.0)
        try:
            with pytest.raises(threading.BrokenBarrierError):
                await asyncio.gather(*(executor.run(stage, frame, 0.0) for _ in range(2)))
        finally:
            executor.shutdown()

    asyncio.run(main())


def test_workers_must_be_positive() -> None:
    with pytest.raises(InvalidSpec, match="workers"):
        StageExecutor(cpu_limit=1.0, workers=0)


def test_overhead_calibration_measures_cpu_and_leaves_the_metrics_alone() -> None:
    def served() -> float:
        samples = [s for m in metrics.REQUESTS.collect() for s in m.samples]
        return sum(s.value for s in samples if s.name.endswith("_total"))

    before = served()
    overhead = asyncio.run(request_overhead_ms(AgentSettings(node="calibration-test"), requests=20, warmup=2))
    assert 0 < overhead < 50
    assert served() == before


def test_reference_workload_reports_the_rate_a_cpu_share_sustains() -> None:
    from amp4ec.slicing.profile import reference_workload_ms

    # CPU time per unit, over the share: a quarter of a core is four times slower, wherever
    # the measurement falls in the quota's periods (here there is no quota at all).
    full = reference_workload_ms(window_s=0.2)
    quarter = reference_workload_ms(0.25, window_s=0.2)
    assert 2.8 < quarter / full < 5.2
    assert reference_workload_ms(4.0, window_s=0.1) < 2 * full  # one thread uses one core at most
