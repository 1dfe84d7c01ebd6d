"""torch.Tensor ⇄ wire Tensor: dtype name, shape and raw row-major bytes, validated on the way in.

[Note: byte order] Data travels as the sender's native bytes. Every platform amp4ec
targets (x86-64, arm64) is little-endian, so no swap is done; a big-endian host would
need one here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from amp4ec.errors import ShapeMismatch
from amp4ec.wire.v1 import shard_pb2

__all__ = ["DTYPES", "MAX_DIMS", "decode", "decode_all", "describe", "encode", "encode_all", "spec_of"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 16
_MAX_BYTES = 1 << 62


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ShapeMismatch(
            f"dtype {dtype} cannot travel on the wire; supported: {', '.join(DTYPES)}"
        ) from None


def describe(dtype: str | torch.dtype, shape: Sequence[int]) -> str:
    """Render a tensor signature the way errors print it: ``float32[1, 3, 224, 224]``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return f"{name}[{', '.join(str(int(d)) for d in shape)}]"


def encode(tensor: torch.Tensor) -> shard_pb2.Tensor:
    """One tensor as raw bytes (a contiguous CPU copy when it is not one already)."""
    t = tensor.detach().cpu().contiguous()
    # Viewing as uint8 works for every dtype, bfloat16 and bool included (numpy has no bfloat16).
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return shard_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape), data=raw)


def spec_of(dtype: torch.dtype, shape: Sequence[int]) -> shard_pb2.Tensor:
    """A data-less Tensor message describing a signature (used by Describe)."""
    return shard_pb2.Tensor(dtype=dtype_name(dtype), shape=list(shape))


def decode(message: shard_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """A wire tensor back to torch, or ShapeMismatch naming ``field`` and what was wrong."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise ShapeMismatch(f"{field}.dtype: expected one of {', '.join(DTYPES)}, actual {message.dtype!r}")
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS:
        raise ShapeMismatch(f"{field}.shape: expected at most {MAX_DIMS} dims, actual {len(shape)}")
    if any(d < 0 for d in shape):
        raise ShapeMismatch(f"{field}.shape: expected non-negative sizes, actual {list(shape)}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    # torch computes sizes and strides in int64, zero dims or not: [0, 2**62, 2**62] overflows there.
    if math.prod(max(d, 1) for d in shape) * itemsize >= _MAX_BYTES:
        raise ShapeMismatch(f"{field}.shape: expected a byte count below 2**62, actual {list(shape)}")
    numel = math.prod(shape)
    expected = numel * itemsize
    if len(message.data) != expected:
        raise ShapeMismatch(
            f"{field}.data: expected {expected} bytes for {describe(message.dtype, shape)}, "
            f"actual {len(message.data)}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: torch.frombuffer needs a writable buffer; this is the one copy decode makes.
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)


def encode_all(tensors: Sequence[torch.Tensor]) -> list[shard_pb2.Tensor]:
    return [encode(t) for t in tensors]


def decode_all(messages: Sequence[shard_pb2.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(decode(m, f"tensors[{i}]") for i, m in enumerate(messages))
