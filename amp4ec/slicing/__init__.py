"""Slicing: load a model from a spec, cut it into a chain of blocks, profile each block.

Importing this package imports torch; the planner and operator stay torch-free.
"""

from __future__ import annotations

from amp4ec.slicing.blocks import Block, BlockChain, Shard, TensorSpec, split_model
from amp4ec.slicing.profile import chain_input_bytes, profile_chain
from amp4ec.slicing.sources import LoadedModel, ModelSource, load_model

__all__ = [
    "Block",
    "BlockChain",
    "LoadedModel",
    "ModelSource",
    "Shard",
    "TensorSpec",
    "chain_input_bytes",
    "load_model",
    "profile_chain",
    "split_model",
]
