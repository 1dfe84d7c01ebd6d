"""v2 tensor data ⇄ torch: JSON ``data``, raw bytes (the binary extension and gRPC's
``raw_input_contents``) and gRPC's typed ``contents``. Every conversion checks the element or
byte count against the shape and names the field it refuses.

Raw bytes are row-major and little-endian (the protocol's layout and every platform amp4ec
targets: see [Note: byte order] in amp4ec/wire/codec.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from amp4ec.frontdoor.model import DATATYPES, V2Error

__all__ = ["CONTENTS_FIELD", "from_contents", "from_json", "from_raw", "to_json", "to_raw"]

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
"""gRPC's typed field per datatype; FP16 and BF16 travel only as raw bytes (the protocol's rule)."""

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "BF16": np.float32,  # numpy has no bfloat16: parsed as float32, then rounded by torch
    "FP32": np.float32,
    "FP64": np.float64,
}


def _from_values(values: Any, datatype: str, shape: Sequence[int], field: str) -> torch.Tensor:
    try:
        array = np.asarray(values, dtype=_NUMPY[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as e:
        raise V2Error("invalid", f"{field}: expected {datatype} values, {e}") from None
    if array.size != math.prod(shape):
        raise V2Error(
            "invalid",
            f"{field}: expected {math.prod(shape)} elements for shape {list(shape)}, actual {array.size}",
        )
    return torch.from_numpy(array.copy()).reshape(tuple(shape)).to(DATATYPES[datatype])


def from_json(data: Any, datatype: str, shape: Sequence[int], field: str) -> torch.Tensor:
    """JSON ``data`` (flat or nested, row-major) → a tensor of ``shape``."""
    if not isinstance(data, list):
        raise V2Error("invalid", f"{field}: expected a JSON array, actual {type(data).__name__}")
    return _from_values(data, datatype, shape, field)


def from_raw(raw: bytes | memoryview, datatype: str, shape: Sequence[int], field: str) -> torch.Tensor:
    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(raw) != expected:
        raise V2Error(
            "invalid", f"{field}: expected {expected} bytes for {datatype}{list(shape)}, actual {len(raw)}"
        )
    if not expected:
        return torch.empty(tuple(shape), dtype=dtype)
    # bytearray: torch.frombuffer needs a writable buffer; the one copy made.
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(tuple(shape))


def from_contents(contents: Any, datatype: str, shape: Sequence[int], field: str) -> torch.Tensor:
    """gRPC ``InferTensorContents`` → a tensor; only the datatype's own field may be set."""
    own = CONTENTS_FIELD.get(datatype)
    if own is None:
        raise V2Error("invalid", f"{field}: {datatype} travels only in raw_input_contents")
    others = [f.name for f, _ in contents.ListFields() if f.name != own]
    if others:
        raise V2Error("invalid", f"{field}.{others[0]}: a {datatype} tensor's data goes in {own}")
    return _from_values(list(getattr(contents, own)), datatype, shape, f"{field}.{own}")


def to_raw(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def to_json(tensor: torch.Tensor) -> list[Any]:
    """Flat, row-major (what the protocol's responses carry)."""
    return tensor.detach().cpu().reshape(-1).tolist()
