"""torch.Tensor ⇄ wire Tensor: dtype name, shape and row-major bytes, validated on the way in.

Activation codecs (the ``Codec`` enum of shard.proto): ``raw`` (the bytes as in memory),
``fp16`` (float32 as half precision, half the bytes) and ``int8`` (one uint8 per element with a
scale and zero point per channel, a quarter). The sender picks one per cut (the plan says which);
the receiver reads the codec from the frame and restores float32. Only float32 tensors are
compressed: others, empty ones, ones a codec cannot carry (fp16 overflow, non-finite values)
and ones int8 would not shrink (one element per channel) travel raw, so a codec never changes
an answer's meaning, only its precision.

[Note: int8 scheme] Asymmetric, per channel of dim 1 (NCHW channels; tokens for [B, N, D]):
the range [min(lo, 0), max(hi, 0)] of each channel maps onto 0..255, so zero (half of a ReLU's
outputs) is exact, and every element is within scale / 2 of its value (scale = range / 255).

[Note: byte order] Data travels as the sender's native bytes. Every platform amp4ec
targets (x86-64, arm64) is little-endian, so no swap is done; a big-endian host would
need one here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from amp4ec.errors import ShapeMismatch
from amp4ec.wire.codec_names import CODECS, codec_name, codec_value
from amp4ec.wire.v1 import shard_pb2

__all__ = [
    "CODECS",
    "DTYPES",
    "MAX_DIMS",
    "codec_name",
    "codec_value",
    "decode",
    "decode_all",
    "describe",
    "encode",
    "encode_all",
    "saved_bytes",
    "signatures",
    "spec_of",
]

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

_CODEC_NAMES = {v: k for k, v in CODECS.items()}
_WIRE_ITEMSIZE = {shard_pb2.CODEC_FP16: 2, shard_pb2.CODEC_INT8: 1}
_FP16_MAX = 65504.0


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


def _bytes_of(t: torch.Tensor) -> bytes:
    # Viewing as uint8 works for every dtype, bfloat16 and bool included (numpy has no bfloat16).
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode(tensor: torch.Tensor, codec: str = "raw") -> shard_pb2.Tensor:
    """One tensor as bytes in ``codec`` (a contiguous CPU copy when it is not one already);
    raw when the codec cannot carry it (see the module docstring)."""
    t = tensor.detach().cpu().contiguous()
    message = shard_pb2.Tensor(dtype=dtype_name(t.dtype), shape=list(t.shape))
    value = codec_value(codec)
    if value != shard_pb2.CODEC_RAW and t.dtype == torch.float32 and t.numel():
        if value == shard_pb2.CODEC_FP16 and _encode_fp16(t, message):
            return message
        if value == shard_pb2.CODEC_INT8 and _encode_int8(t, message):
            return message
    message.data = _bytes_of(t)
    return message


def _encode_fp16(t: torch.Tensor, message: shard_pb2.Tensor) -> bool:
    # One pass for the range check: beyond fp16's range (or NaN) the tensor goes raw.
    if not float(t.abs().max()) <= _FP16_MAX:
        return False
    message.codec = shard_pb2.CODEC_FP16
    message.data = _bytes_of(t.to(torch.float16))
    return True


def _channels(shape: Sequence[int]) -> int:
    return int(shape[1]) if len(shape) >= 2 else 1


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """[channels, rest] view of a contiguous tensor (channels = dim 1, or one below 2 dims)."""
    if t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(0, 1).reshape(t.shape[1], -1)


def _encode_int8(t: torch.Tensor, message: shard_pb2.Tensor) -> bool:
    # Per channel, a scale and a zero point cost ~5 bytes: with few elements per channel (a
    # [1, 1000] logits row) they outweigh what quantising saves, so such a tensor goes raw.
    if 3 * t.numel() <= 5 * _channels(t.shape):
        return False
    shape = [1, -1, *([1] * (t.dim() - 2))] if t.dim() >= 2 else [1]
    lo, hi = torch.aminmax(_per_channel(t), dim=1)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # zero stays exact
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        return False
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel
    if not bool(torch.isfinite(scale).all()):  # hi - lo overflowed float32
        return False
    zero = torch.round(-lo / scale).clamp(0, 255)
    q = torch.round(t / scale.reshape(shape)).add_(zero.reshape(shape)).clamp_(0, 255).to(torch.uint8)
    message.codec = shard_pb2.CODEC_INT8
    message.data = _bytes_of(q)
    message.scales.extend(scale.tolist())
    message.zero_points.extend(int(z) for z in zero.tolist())
    return True


def spec_of(dtype: torch.dtype, shape: Sequence[int]) -> shard_pb2.Tensor:
    """A data-less Tensor message describing a signature (used by Describe)."""
    return shard_pb2.Tensor(dtype=dtype_name(dtype), shape=list(shape))


def signatures(messages: Sequence[shard_pb2.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each wire tensor's dtype and shape as a meta tensor (nothing allocated), its header
    checked as ``decode`` checks it: a stage compares these with its inputs before decoding,
    so a frame's decoded size (4x an int8 frame's bytes) is bounded by what the stage takes."""
    out = []
    for i, m in enumerate(messages):
        dtype, shape = _header(m, f"tensors[{i}]")
        out.append(torch.empty(shape, dtype=dtype, device="meta"))
    return tuple(out)


def _header(message: shard_pb2.Tensor, field: str) -> tuple[torch.dtype, tuple[int, ...]]:
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
    if message.codec != shard_pb2.CODEC_RAW:
        name = codec_name(message.codec, f"{field}.codec")
        if dtype != torch.float32:
            raise ShapeMismatch(
                f"{field}.dtype: codec {name} restores float32 only, actual {message.dtype!r}"
            )
    return dtype, shape


def decode(message: shard_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """A wire tensor back to torch, or ShapeMismatch naming ``field`` and what was wrong."""
    dtype, shape = _header(message, field)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    kind = message.codec
    if kind == shard_pb2.CODEC_RAW:
        _no_parameters(message, field, "raw")
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
    name = codec_name(kind)
    expected = numel * _WIRE_ITEMSIZE[kind]
    if len(message.data) != expected:
        raise ShapeMismatch(
            f"{field}.data: expected {expected} bytes for {describe(message.dtype, shape)} in codec "
            f"{name}, actual {len(message.data)}"
        )
    if kind == shard_pb2.CODEC_FP16:
        _no_parameters(message, field, name)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(message.data), dtype=torch.float16).reshape(shape).float()
    scale, zero = _int8_parameters(message, shape, field)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    q = torch.frombuffer(bytearray(message.data), dtype=torch.uint8).reshape(shape)
    view = [1, -1, *([1] * (len(shape) - 2))] if len(shape) >= 2 else [1]
    return ((q.float() - zero.reshape(view)) * scale.reshape(view)).reshape(shape)


def _no_parameters(message: shard_pb2.Tensor, field: str, name: str) -> None:
    for what in ("scales", "zero_points"):
        if count := len(getattr(message, what)):
            raise ShapeMismatch(f"{field}.{what}: expected none for codec {name}, actual {count}")


def _int8_parameters(
    message: shard_pb2.Tensor, shape: Sequence[int], field: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scales and zero points, checked: one each per channel, scales finite and
    positive, zero points in 0..255 (the first bad one named by index)."""
    channels = _channels(shape)
    for what in ("scales", "zero_points"):
        count = len(getattr(message, what))
        if count != channels:
            raise ShapeMismatch(
                f"{field}.{what}: expected {channels} (one per channel of dim 1) for codec int8, "
                f"actual {count}"
            )
    scale = torch.tensor(message.scales, dtype=torch.float32)
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ShapeMismatch(
            f"{field}.scales[{i}]: expected a finite positive scale, actual {float(scale[i])}"
        )
    zero = torch.tensor(message.zero_points, dtype=torch.int64)
    bad = (zero < 0) | (zero > 255)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ShapeMismatch(f"{field}.zero_points[{i}]: expected 0..255, actual {int(zero[i])}")
    return scale, zero.float()


def encode_all(tensors: Sequence[torch.Tensor], codec: str = "raw") -> list[shard_pb2.Tensor]:
    return [encode(t, codec) for t in tensors]


def saved_bytes(messages: Sequence[shard_pb2.Tensor]) -> int:
    """Bytes the codecs saved on these tensors: raw size less the data (and scales) sent."""
    saved = 0
    for m in messages:
        if m.codec != shard_pb2.CODEC_RAW:
            raw = math.prod(m.shape) * 4  # only float32 is compressed
            saved += raw - len(m.data) - 4 * len(m.scales) - len(m.zero_points)
    return max(saved, 0)


def decode_all(messages: Sequence[shard_pb2.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(decode(m, f"tensors[{i}]") for i, m in enumerate(messages))
