"""Tensors survive the wire bit for bit; malformed tensors are refused naming the field."""

import pytest
import torch

from amp4ec.errors import ShapeMismatch
from amp4ec.wire import codec
from amp4ec.wire.v1 import shard_pb2


@pytest.mark.parametrize("dtype", list(codec.DTYPES.values()))
def test_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 4) * 10).to(dtype)
    back = codec.decode(codec.encode(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_round_trip_non_contiguous_scalar_and_empty() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(t)), t)
    assert torch.equal(codec.decode(codec.encode(torch.tensor(3.5))), torch.tensor(3.5))
    assert codec.decode(codec.encode(torch.empty(0, 4))).shape == (0, 4)


def test_raw_bytes_not_repeated_floats() -> None:
    message = codec.encode(torch.zeros(1, 32, 112, 112))
    assert len(message.data) == 32 * 112 * 112 * 4
    assert message.ByteSize() < len(message.data) + 64


def test_wrong_byte_count_names_field() -> None:
    message = codec.encode(torch.zeros(2, 3))
    message.data = message.data[:-1]
    with pytest.raises(
        ShapeMismatch, match=r"tensors\[0\]\.data: expected 24 bytes for float32\[2, 3\], actual 23"
    ):
        codec.decode_all([message])


def test_unknown_dtype_and_negative_shape() -> None:
    with pytest.raises(ShapeMismatch, match=r"tensor\.dtype: expected one of .*actual 'complex32'"):
        codec.decode(shard_pb2.Tensor(dtype="complex32", shape=[1], data=b"\0" * 8))
    with pytest.raises(ShapeMismatch, match=r"shape: expected non-negative"):
        codec.decode(shard_pb2.Tensor(dtype="float32", shape=[-1], data=b""))
