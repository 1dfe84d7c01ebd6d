"""fp16 and int8 activation codecs: round-trip error bounds (property tests), fallbacks to raw,
and hostile compressed tensors refused naming the field."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amp4ec.errors import InvalidSpec
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4)
scales = st.floats(1e-3, 1e4)


def _tensor(shape: list[int], seed: int, scale: float, relu: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * scale + torch.randn((), generator=g) * scale
    return t.relu() if relu else t


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**31), scales, st.booleans())
def test_fp16_round_trip_within_half_precision(shape, seed, scale, relu) -> None:
    t = _tensor(shape, seed, scale, relu)
    message = codec.encode(t, "fp16")
    assert message.codec == shard_pb2.CODEC_FP16 and len(message.data) == 2 * t.numel()
    back = codec.decode(message)
    assert back.dtype == torch.float32 and back.shape == t.shape
    # Round to nearest: relative error ≤ 2^-11 for normal numbers, absolute ≤ 2^-25 below them.
    assert bool(((back - t).abs() <= t.abs() * 2**-11 + 2**-25).all())


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 2**31), scales, st.booleans())
def test_int8_round_trip_within_half_a_step_per_channel(shape, seed, scale, relu) -> None:
    t = _tensor(shape, seed, scale, relu)
    message = codec.encode(t, "int8")
    channels = shape[1] if len(shape) >= 2 else 1
    if 3 * t.numel() <= 5 * channels:  # scales would outweigh the saving: raw, exact
        assert message.codec == shard_pb2.CODEC_RAW and torch.equal(codec.decode(message), t)
        return
    assert message.codec == shard_pb2.CODEC_INT8 and len(message.data) == t.numel()
    assert len(message.scales) == len(message.zero_points) == channels
    back = codec.decode(message)
    assert back.dtype == torch.float32 and back.shape == t.shape
    step = torch.tensor(list(message.scales))
    view = [1, -1, *([1] * (t.dim() - 2))] if t.dim() >= 2 else [1]
    bound = step.reshape(view) * 0.5 * (1 + 1e-3) + t.abs() * 1e-6
    assert bool(((back - t).abs() <= bound).all())
    # Each channel's step is its range over 255 (the range always includes zero).
    if t.dim() >= 2:
        flat = t.reshape(t.shape[0], channels, -1).transpose(0, 1).reshape(channels, -1)
    else:
        flat = t.reshape(1, -1)
    width = flat.amax(1).clamp(min=0) - flat.amin(1).clamp(max=0)
    expected = torch.where(width > 0, width / 255, torch.ones_like(width))
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=0)


def test_zero_stays_exact_under_int8() -> None:
    t = torch.randn(2, 4, 6, 6).relu()
    back = codec.decode(codec.encode(t, "int8"))
    assert bool((back[t == 0] == 0).all())


def test_what_a_codec_cannot_carry_travels_raw() -> None:
    cases = {
        "int64": torch.arange(6).reshape(2, 3),
        "huge for fp16": torch.full((2, 3), 1e6),
        "nan": torch.tensor([[1.0, float("nan")]]),
        "inf": torch.tensor([[1.0, float("inf")]]),
        "empty": torch.empty(0, 3),
        "float64": torch.randn(2, 3, dtype=torch.float64),
        "one element per channel": torch.randn(1, 1000),
    }
    for name, t in cases.items():
        for kind in ("fp16", "int8"):
            if (name, kind) in {("huge for fp16", "int8"), ("one element per channel", "fp16")}:
                continue  # int8 carries any finite range; fp16 halves any float32
            message = codec.encode(t, kind)
            assert message.codec == shard_pb2.CODEC_RAW, (name, kind)
            back = codec.decode(message)
            assert back.dtype == t.dtype and torch.equal(back.isnan(), t.isnan())


def test_bytes_saved() -> None:
    t = torch.randn(1, 8, 4, 4)
    assert codec.saved_bytes([codec.encode(t)]) == 0
    assert codec.saved_bytes([codec.encode(t, "fp16")]) == t.numel() * 2
    int8 = codec.encode(t, "int8")
    assert codec.saved_bytes([int8]) == t.numel() * 3 - 4 * 8 - 8


def _int8(shape=(1, 3, 2, 2)) -> shard_pb2.Tensor:
    return codec.encode(torch.randn(shape), "int8")


def _hostile() -> dict[str, tuple[shard_pb2.Tensor, str]]:
    few = _int8()
    del few.scales[-1]
    few_zero = _int8()
    few_zero.zero_points.append(3)
    nan = _int8()
    nan.scales[1] = math.nan
    negative = _int8()
    negative.scales[2] = -1.0
    inf = _int8()
    inf.scales[0] = math.inf
    zero_out = _int8()
    zero_out.zero_points[1] = 300
    short = _int8()
    short.data = short.data[:-1]
    fp16_short = codec.encode(torch.randn(2, 3), "fp16")
    fp16_short.data = fp16_short.data + b"\0"
    fp16_scales = codec.encode(torch.randn(2, 3), "fp16")
    fp16_scales.scales.append(1.0)
    raw_scales = codec.encode(torch.randn(2, 3))
    raw_scales.zero_points.append(0)
    unknown = codec.encode(torch.randn(2, 3))
    unknown.codec = 7  # type: ignore[assignment]
    as_int = _int8()
    as_int.dtype = "int64"
    t0 = r"tensors\[0\]\."
    return {
        "scale count": (few, t0 + r"scales: expected 3 \(one per channel of dim 1\) .*, actual 2"),
        "zero point count": (few_zero, r"tensors\[0\]\.zero_points: expected 3 .*actual 4"),
        "nan scale": (nan, r"tensors\[0\]\.scales\[1\]: expected a finite positive scale, actual nan"),
        "negative scale": (negative, t0 + r"scales\[2\]: expected a finite positive scale, actual -1"),
        "inf scale": (inf, r"tensors\[0\]\.scales\[0\]: .*actual inf"),
        "zero point range": (zero_out, r"tensors\[0\]\.zero_points\[1\]: expected 0\.\.255, actual 300"),
        "int8 size": (short, t0 + r"data: expected 12 bytes for float32\[1, 3, 2, 2\] in .*int8, actual 11"),
        "fp16 size": (fp16_short, r"tensors\[0\]\.data: expected 12 bytes .* in codec fp16, actual 13"),
        "fp16 scales": (fp16_scales, r"tensors\[0\]\.scales: expected none for codec fp16, actual 1"),
        "raw zero points": (raw_scales, r"tensors\[0\]\.zero_points: expected none for codec raw, actual 1"),
        "unknown codec": (unknown, r"tensors\[0\]\.codec: expected one of raw, fp16, int8, got 7"),
        "dtype": (as_int, r"tensors\[0\]\.dtype: codec int8 restores float32 only, actual 'int64'"),
    }


HOSTILE = _hostile()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_compressed_tensor_names_the_field(case: str) -> None:
    message, pattern = HOSTILE[case]
    with pytest.raises(Exception, match=pattern) as info:
        codec.decode_all([message])
    assert isinstance(info.value, InvalidSpec)  # INVALID_ARGUMENT on the wire


def test_huge_channel_count_is_refused_before_allocating() -> None:
    message = shard_pb2.Tensor(
        dtype="float32", shape=[0, 2**40], codec=shard_pb2.CODEC_INT8, scales=[1.0], zero_points=[0]
    )
    with pytest.raises(InvalidSpec, match=r"scales: expected 1099511627776"):
        codec.decode(message)
