"""Preparing a model once in this process: load, cut into blocks, profile, and keep the
monolith's output for comparison. ``amp4ec plan``, ``run``, ``serve`` and the bench share it;
none of it needs node agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amp4ec import planner
from amp4ec.slicing.blocks import BlockChain, split_model
from amp4ec.slicing.profile import profile_chain, reference_workload_ms
from amp4ec.slicing.sources import LoadedModel, ModelSource, load_model

__all__ = ["Prepared", "prepare"]


@dataclass
class Prepared:
    """The model, cut and profiled once in this process (unconstrained, one thread)."""

    loaded: LoadedModel
    chain: BlockChain
    profiles: list[planner.LayerProfile]
    reference_ms: float
    expected: tuple[torch.Tensor, ...]

    def max_abs_diff(self, outputs: Sequence[torch.Tensor]) -> float:
        """How far distributed ``outputs`` are from the monolith's (the largest element-wise gap)."""
        return max(
            (float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
            for a, b in zip(outputs, self.expected, strict=True)
        )


def prepare(source: ModelSource) -> Prepared:
    loaded = load_model(source)
    chain = split_model(loaded)
    profiles = profile_chain(chain, loaded.example_inputs)
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    expected = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return Prepared(loaded, chain, profiles, reference_workload_ms(), expected)
