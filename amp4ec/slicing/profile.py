"""Block profiling: what each block of a chain costs (FLOPs, bytes, measured time on one thread),
and the reference workload whose time on a node defines that node's speed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from amp4ec.planner.types import LayerProfile
from amp4ec.slicing.blocks import BlockChain, TensorSpec, _param_bytes
from amp4ec.slicing.tiles import row_maps

__all__ = ["chain_input_bytes", "profile_chain", "reference_workload_ms"]


def _sdpa_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *args: object, **kwargs: object
) -> int:
    """Q·Kᵀ and P·V: 2·batch·L·S·(E + Ev). FlopCounterMode has no formula for the CPU kernel."""
    *batch, length, embed = query
    numel = 1
    for d in batch:
        numel *= d
    return 2 * numel * length * key[-2] * (embed + value[-1])


# On CPU, scaled_dot_product_attention (e.g. inside nn.MultiheadAttention) runs this kernel,
# which torch's counter skips: ViT attention FLOPs would silently read as zero.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def profile_chain(
    chain: BlockChain,
    example_inputs: Sequence[torch.Tensor] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    tiles: bool = True,
    batch_sizes: Sequence[int] = (),
) -> list[LayerProfile]:
    """One LayerProfile per block, measured on a single thread (the planner's reference core).

    Each timed pass runs the whole chain in order, as a request does, and ``compute_ms`` is
    each block's median over ``repeats`` passes after ``warmup`` passes. Timing a block
    repeatedly on its own would flatter it: its weights and input stay in cache, and the sum
    of such times falls ~15% short of a real MobileNetV2 forward. With ``tiles``, the leading
    convolutional blocks carry their row geometry (``slicing.tiles.row_maps``).

    ``batch_sizes`` (the sizes a deployment's dynamic batching can use, ``Batching.profile_sizes``)
    times the same passes with each size's inputs stacked along dim 0, into ``batch_ms``; only
    for a batch-flexible chain (one the agent batches), so profiling without batching costs
    nothing more.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"expected repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    inputs = tuple(example_inputs if example_inputs is not None else chain.example_inputs)
    ms = _block_times(chain, inputs, repeats, warmup)
    profiles: list[LayerProfile] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            current = inputs
            for block, block_ms in zip(chain.blocks, ms, strict=True):
                # Counted on a separate pass: the counter's dispatch overhead must not be timed.
                with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
                    outputs = tuple(block.module(*current))
                in_bytes = _bytes(current)
                out_bytes = _bytes(outputs)
                profiles.append(
                    LayerProfile(
                        name=block.name,
                        flops=int(counter.get_total_flops()),
                        param_bytes=_param_bytes(block.module),
                        out_bytes=out_bytes,
                        compute_ms=block_ms,
                        act_bytes=in_bytes + out_bytes,
                    )
                )
                current = outputs
    finally:
        torch.set_num_threads(threads)
    sizes = sorted({int(b) for b in batch_sizes if b > 1}) if chain.batch_flexible else []
    if sizes:
        batched = [_block_times(chain, _stacked(inputs, b), repeats, warmup) for b in sizes]
        profiles = [
            replace(p, batch_ms=tuple(zip(sizes, (t[i] for t in batched), strict=True)))
            for i, p in enumerate(profiles)
        ]
    if tiles:
        geometry = row_maps(chain, inputs)
        profiles = [replace(p, tile=g) for p, g in zip(profiles, geometry, strict=True)]
    return profiles


def _stacked(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """``batch`` requests' inputs in one forward: each input repeated along dim 0."""
    return tuple(torch.cat([t] * batch) for t in inputs)


def _block_times(chain: BlockChain, inputs: Sequence[torch.Tensor], repeats: int, warmup: int) -> list[float]:
    """Each block's median time over ``repeats`` whole passes (after ``warmup``), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread = one reference core, whatever the host has
    times: list[list[float]] = [[] for _ in chain.blocks]
    try:
        with torch.inference_mode():
            for timed in [False] * warmup + [True] * repeats:
                current = tuple(inputs)
                for block, samples in zip(chain.blocks, times, strict=True):
                    t0 = time.perf_counter()
                    current = tuple(block.module(*current))
                    if timed:
                        samples.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return [statistics.median(samples) for samples in times]


def chain_input_bytes(chain: BlockChain) -> int:
    """Bytes the client sends into the first block (the model inputs, example batch)."""
    return chain.input_bytes


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    # Bytes as they cross the wire: numel × itemsize (a strided view is sent compacted).
    return sum(TensorSpec.of(t).nbytes for t in tensors)


def reference_workload_ms(cpu_limit: float | None = None, window_s: float = 0.5, windows: int = 2) -> float:
    """Milliseconds per unit of a fixed conv workload at the rate this process can sustain.

    [Note: CPU time, the fastest window] Each window measures the thread's CPU time per
    unit; the sustained wall time is that over ``min(cpu_limit, 1)``, the share of a core a
    CFS quota grants (one thread never uses more than one core). Wall time would be
    biased: a window gets whole quota bursts or misses them depending on where it falls in
    the 100 ms periods, and the fastest of several windows read ~10% high on a 0.3-CPU
    node. The fastest window still discards one that something else on the machine slowed
    down: capacity is what the node can do. ``cpu_limit`` None: an unconstrained process.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        conv = torch.nn.Conv2d(32, 32, 3, padding=1)
        x = torch.randn(1, 32, 28, 28)
        with torch.inference_mode():
            conv(x)
            for _ in range(windows):
                units, start, cpu = 0, time.perf_counter(), time.thread_time()
                while time.perf_counter() - start < window_s or units < 5:
                    conv(x)
                    units += 1
                best = min(best, 1000.0 * (time.thread_time() - cpu) / units)
    finally:
        torch.set_num_threads(previous)
    share = min(cpu_limit, 1.0) if cpu_limit is not None and cpu_limit > 0 else 1.0
    return best / share
