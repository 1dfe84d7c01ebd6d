"""Preparing a model once in this process: load, cut into blocks, profile, and keep the
monolith's output for comparison. ``amp4ec plan``, ``run``, ``serve`` and the bench share it;
none of it needs node agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from amp4ec import planner
from amp4ec.compression import Compression
from amp4ec.slicing.blocks import BlockChain, split_model
from amp4ec.slicing.compression import profile_codecs
from amp4ec.slicing.profile import profile_chain, reference_workload_ms
from amp4ec.slicing.sources import LoadedModel, ModelSource, load_model

__all__ = ["Prepared", "compression_options", "monolith_outputs", "prepare"]


@dataclass
class Prepared:
    """The model, cut and profiled once in this process (unconstrained, one thread)."""

    loaded: LoadedModel
    chain: BlockChain
    profiles: list[planner.LayerProfile]
    reference_ms: float
    expected: tuple[torch.Tensor, ...]
    codecs: tuple[planner.CodecProfile, ...] = ()
    """Each codec measured at every cut (``prepare(..., codecs=True)``), for the planner."""

    def max_abs_diff(self, outputs: Sequence[torch.Tensor]) -> float:
        """How far distributed ``outputs`` are from the monolith's (the largest element-wise gap)."""
        return max(
            (float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
            for a, b in zip(outputs, self.expected, strict=True)
        )


def prepare(source: ModelSource, codecs: bool = False, batch_sizes: Sequence[int] = ()) -> Prepared:
    """Load, cut and profile the model; with ``codecs``, measure every codec at every cut too
    (``compression.profile_codecs``: about one more forward per block and codec); with
    ``batch_sizes`` (``Batching.profile_sizes()``), each block's time at those batches too."""
    loaded = load_model(source)
    chain = split_model(loaded)
    profiles = profile_chain(chain, loaded.example_inputs, batch_sizes=batch_sizes)
    measured = profile_codecs(chain, loaded.example_inputs) if codecs else ()
    expected = monolith_outputs(loaded, loaded.example_inputs)
    return Prepared(loaded, chain, profiles, reference_workload_ms(), expected, measured)


def monolith_outputs(loaded: LoadedModel, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The whole model's outputs for ``inputs``, as a tuple."""
    with torch.inference_mode():
        out = loaded.module(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compression_options(policy: Compression, prepared: Prepared) -> dict[str, Any]:
    """The planner arguments of a deployment's compression policy (none when off)."""
    if not policy.enabled:
        return {}
    return {"codecs": prepared.codecs, "max_error": policy.max_error}
