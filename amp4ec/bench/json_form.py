"""The JSON form of frozen dataclasses: a field's name is its key (``bench/results.py``'s format).

``to_json`` walks the fields; ``from_json`` walks the type hints back, so a results type says
once what its JSON is. A union of results is resolved by each member's ``accepts(data)``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = ["OMIT", "from_json", "to_json"]

OMIT = {"omit_none": True}
"""Field metadata: left out of the JSON when None (the key is absent in that case)."""

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """Dataclasses → dicts keyed by field name (``OMIT`` fields left out when None), tuples → lists."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = to_json(item)
        return out
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type[T], data: Any, where: str = "results") -> T:
    """The ``cls`` that ``data`` (parsed JSON) describes; ``ValueError`` naming the field when it
    does not fit."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where}.{f.name}: missing")
            continue
        kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _decode(tp: Any, data: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if data is None and len(members) < len(get_args(tp)):
            return None
        if len(members) == 1:
            return _decode(members[0], data, where)
        for member in members:  # a union of results: each says which JSON it is
            if isinstance(data, Mapping) and member.accepts(data):
                return _decode(member, data, where)
        raise ValueError(f"{where}: none of {', '.join(m.__name__ for m in members)} fits")
    if origin is tuple:
        if not isinstance(data, list):
            raise ValueError(f"{where}: expected a list, got {type(data).__name__}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], x, f"{where}[{i}]") for i, x in enumerate(data))
        return tuple(_decode(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, data, strict=True)))
    if origin is dict:
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        _, value = get_args(tp)
        return {str(k): _decode(value, v, f"{where}.{k}") for k, v in data.items()}
    if is_dataclass(tp):
        return from_json(tp, data, where)
    if tp is float:
        if data is None:  # write_json writes non-finite floats as null
            return float("nan")
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ValueError(f"{where}: expected a number, got {data!r}")
        return float(data)
    if tp in (int, str, bool) and not isinstance(data, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {data!r}")
    return data
