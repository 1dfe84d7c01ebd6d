"""What a model's callers see of it: the names of its inputs (the v2 protocol's tensor names)."""

from __future__ import annotations

import inspect

from torch import nn

__all__ = ["input_names"]


def input_names(module: nn.Module, count: int) -> tuple[str, ...]:
    """The forward's positional parameter names when they can be read and match ``count``,
    else ``input_<i>`` (an exported program's module has ``*args``)."""
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) == count and len(set(params)) == count:
        return tuple(params)
    return tuple(f"input_{i}" for i in range(count))
