"""What compressing each cut of a chain costs and changes, measured here for the pure planner,
and the error a deployed plan's codecs introduce into the final outputs.

``profile_codecs`` runs the chain once, keeps the tensors crossing every cut, and per codec
and cut measures the bytes on the wire, the CPU of encoding and decoding beyond the raw
codec's (median of a few runs on one thread, the planner's reference core), and the relative
L2 error of the final outputs when only that cut is compressed (the rest of the chain run
on the restored tensors). ``output_error`` compares a deployment's answers with the
monolith's: relative L2 error and top-1 agreement over a fixed set of inputs (``fixed_inputs``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from amp4ec.planner.types import CodecProfile
from amp4ec.slicing.blocks import BlockChain
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2

__all__ = ["LOSSY_CODECS", "OutputError", "fixed_inputs", "output_error", "profile_codecs", "relative_l2"]

LOSSY_CODECS = ("fp16", "int8")


def relative_l2(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """‖outputs − reference‖ / ‖reference‖ over every floating-point tensor together."""
    num = den = 0.0
    for a, b in zip(outputs, reference, strict=True):
        if b.is_floating_point():
            num += float((a.double() - b.double()).pow(2).sum())
            den += float(b.double().pow(2).sum())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def _wire_bytes(messages: Sequence[shard_pb2.Tensor]) -> int:
    # The data plus each int8 scale (4 bytes) and zero point (~1 byte); framing aside.
    return sum(len(m.data) + 4 * len(m.scales) + len(m.zero_points) for m in messages)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(samples)


def profile_codecs(
    chain: BlockChain,
    example_inputs: Sequence[torch.Tensor] | None = None,
    names: Sequence[str] = LOSSY_CODECS,
    repeats: int = 3,
) -> tuple[CodecProfile, ...]:
    """One CodecProfile per codec in ``names``, every cut measured (see the module docstring).

    Cut 0 (the model's input) is never compressed by the client: it is recorded raw, free and
    exact. Costs ``len(names)`` × about half a forward per cut, on one thread."""
    inputs = tuple(example_inputs if example_inputs is not None else chain.example_inputs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            cuts = [inputs]
            for block in chain.blocks:
                cuts.append(tuple(block.module(*cuts[-1])))
            reference = cuts[-1]
            raw = [codec.encode_all(t) for t in cuts]
            raw_enc = [_median_ms(lambda t=t: codec.encode_all(t), repeats) for t in cuts]
            raw_dec = [_median_ms(lambda m=m: codec.decode_all(m), repeats) for m in raw]
            return tuple(
                _profile_one(chain, cuts, reference, raw, raw_enc, raw_dec, name, repeats) for name in names
            )
    finally:
        torch.set_num_threads(threads)


def _profile_one(
    chain: BlockChain,
    cuts: list[tuple[torch.Tensor, ...]],
    reference: tuple[torch.Tensor, ...],
    raw: list[list[shard_pb2.Tensor]],
    raw_enc: list[float],
    raw_dec: list[float],
    name: str,
    repeats: int,
) -> CodecProfile:
    wire, enc, dec, err = [_wire_bytes(raw[0])], [0.0], [0.0], [0.0]
    for j in range(1, len(cuts)):
        messages = codec.encode_all(cuts[j], name)
        wire.append(_wire_bytes(messages))
        if all(m.codec == codec.CODECS["raw"] for m in messages):  # nothing here it can shrink
            enc.append(0.0)
            dec.append(0.0)
            err.append(0.0)
            continue
        enc.append(max(0.0, _median_ms(lambda j=j: codec.encode_all(cuts[j], name), repeats) - raw_enc[j]))
        dec.append(max(0.0, _median_ms(lambda m=messages: codec.decode_all(m), repeats) - raw_dec[j]))
        current = codec.decode_all(messages)
        for block in chain.blocks[j:]:
            current = tuple(block.module(*current))
        err.append(relative_l2(current, reference))
    return CodecProfile(name, tuple(wire), tuple(enc), tuple(dec), tuple(err))


def fixed_inputs(
    example_inputs: Sequence[torch.Tensor], count: int, seed: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` inputs shaped like the examples, the same on every run: the example itself
    first, then standard-normal draws of a seeded generator for floating-point inputs (other
    dtypes, token ids say, repeat the example)."""
    g = torch.Generator().manual_seed(seed)
    out = [tuple(example_inputs)]
    for _ in range(count - 1):
        out.append(
            tuple(
                torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t
                for t in example_inputs
            )
        )
    return out


@dataclass(frozen=True)
class OutputError:
    """How far a deployment's answers are from the monolith's over a fixed set of inputs."""

    inputs: int
    rel_l2_max: float
    """The worst input's relative L2 error of the final outputs."""
    rel_l2_mean: float
    top1_agreement: float
    """Fraction of inputs whose arg-max over the last dim of the first output matches the
    monolith's on every row (1.0 when the output is not floating point)."""

    def to_json(self) -> dict[str, float | int]:
        return {
            "inputs": self.inputs,
            "rel_l2_max": self.rel_l2_max,
            "rel_l2_mean": self.rel_l2_mean,
            "top1_agreement": self.top1_agreement,
        }


def output_error(
    answers: Sequence[Sequence[torch.Tensor]], references: Sequence[Sequence[torch.Tensor]]
) -> OutputError:
    errors = [relative_l2(a, r) for a, r in zip(answers, references, strict=True)]
    agree = 0
    for a, r in zip(answers, references, strict=True):
        first, ref = a[0], r[0]
        if not ref.is_floating_point() or ref.dim() == 0:
            agree += 1
            continue
        agree += bool(torch.equal(first.argmax(dim=-1), ref.argmax(dim=-1)))
    return OutputError(
        inputs=len(errors),
        rel_l2_max=max(errors, default=0.0),
        rel_l2_mean=statistics.fmean(errors) if errors else 0.0,
        top1_agreement=agree / len(errors) if errors else 1.0,
    )
