"""Shard-only materialisation: a zoo model built on the meta device, each tensor made from its name.

[Note: why weights are a function of (seed, name)] An agent that serves blocks a..b of a
model larger than its memory must never hold the whole model. The model is built on the
meta device (shapes, no storage), cut into blocks there, and only the chosen shard's
tensors are made real. For every process to agree on the weights without building them
all, each tensor depends only on the seed and its own parameter name:

- ``*.running_mean`` zeros, ``*.running_var`` ones, ``*.num_batches_tracked`` zero;
- a tensor of two or more dims: normal with std ``gain/sqrt(fan_in)``, drawn from a
  generator seeded by (seed, name). Fan-in scaling keeps activations at their scale through
  linear layers; convolutions (4 dims) get ``CONV_GAIN`` = 1.15 to offset the ReLUs between
  them without letting deep residual stacks grow: every zoo model's output std stays
  within 0.1..10 (MobileNetV2 about 0.2, ResNet-50 about 8, ViT about 1);
- a vector named ``weight`` (a norm's scale) ones; any other vector (a bias) zeros.

With a weights file the tensors come from it instead: ``torch.load(mmap=True)`` maps the
file and only the shard's keys are read. A block keeps its parameters under their names in
the whole model (``features.3.conv.0.weight``), which is what makes this work per block.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from amp4ec.errors import InvalidSpec, ModelNotFound, one_line

__all__ = [
    "CONV_GAIN",
    "KNOWN_BUFFERS",
    "init_tensor",
    "load_state",
    "materialise",
    "supports_meta",
    "weights_load_error",
]

CONV_GAIN = 1.15

KNOWN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
"""Buffers whose value is known without running the factory; a model with others is built eagerly."""


def supports_meta(module: nn.Module) -> bool:
    """True when every buffer of ``module`` is one whose initial value is known (BatchNorm's)."""
    return all(name.rpartition(".")[2] in KNOWN_BUFFERS for name, _ in module.named_buffers())


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_tensor(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """The seeded initial value of the tensor called ``name`` (shape and dtype of ``like``)."""
    leaf = name.rpartition(".")[2]
    shape, dtype = tuple(like.shape), like.dtype
    if leaf in ("running_mean", "num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var":
        return torch.ones(shape, dtype=dtype)
    if len(shape) >= 2:
        fan_in = shape[1] * math.prod(shape[2:])
        gen = torch.Generator().manual_seed(_seed(seed, name))
        gain = CONV_GAIN if len(shape) >= 4 else 1.0
        return torch.randn(shape, generator=gen, dtype=dtype).mul_(gain / math.sqrt(max(1, fan_in)))
    return torch.ones(shape, dtype=dtype) if leaf == "weight" else torch.zeros(shape, dtype=dtype)


def load_state(path: str, expected: Iterable[str], model: str) -> Mapping[str, torch.Tensor]:
    """A state_dict file, memory-mapped (tensors are read only when used), its keys checked."""
    if not Path(path).is_file():
        raise ModelNotFound(f"weights: file {path} does not exist; expected a local state_dict file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:
        raise weights_load_error(path, e) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidSpec(f"weights: {path} is not a state_dict; expected a mapping of names to tensors")
    wanted = set(expected)
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        parts = [
            f"{label} {len(keys)} keys ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})"
            for label, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise InvalidSpec(f"weights: {path} does not match model {model}: " + ", ".join(parts))
    return state


_PICKLED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def weights_load_error(path: str, error: BaseException) -> InvalidSpec:
    """torch.load's refusal as one clean line: no terminal escapes, whole sentences, and for a
    pickled object (a whole model saved with ``torch.save(model)``) what to save instead."""
    text = one_line(str(error))
    pickled = _PICKLED.search(" ".join(str(error).split()))
    if pickled:
        return InvalidSpec(
            f"weights: {path} holds a pickled object ({pickled[1]}), not a state_dict; --weights loads "
            "tensors only (weights_only=True, no pickled code runs): save `model.state_dict()` instead"
        )
    return InvalidSpec(f"weights: cannot load {path} as a state_dict ({type(error).__name__}: {text or '?'})")


def materialise(
    modules: Iterable[nn.Module], seed: int, state: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Make every meta tensor of ``modules`` real, in place, named as in the whole model.

    A tensor shared by several modules (a parameter copied into two blocks) becomes one
    real tensor shared the same way.
    """
    made: dict[int, torch.Tensor] = {}
    for module in modules:
        for kind in ("_parameters", "_buffers"):
            for owner_path, owner in module.named_modules(remove_duplicate=False):
                table = getattr(owner, kind)
                for leaf, tensor in list(table.items()):
                    if tensor is None or not tensor.is_meta:
                        continue
                    if id(tensor) not in made:
                        name = f"{owner_path}.{leaf}" if owner_path else leaf
                        made[id(tensor)] = _real(name, tensor, seed, state, kind == "_parameters")
                    table[leaf] = made[id(tensor)]


def _real(
    name: str, like: torch.Tensor, seed: int, state: Mapping[str, torch.Tensor] | None, parameter: bool
) -> torch.Tensor:
    if state is not None:
        value = state[name]
        if tuple(value.shape) != tuple(like.shape):
            raise InvalidSpec(
                f"weights: {name} has shape {list(value.shape)}, expected {list(like.shape)} for the model"
            )
        value = value.to(like.dtype).clone()
    else:
        value = init_tensor(name, like, seed)
    return nn.Parameter(value, requires_grad=like.requires_grad) if parameter else value
