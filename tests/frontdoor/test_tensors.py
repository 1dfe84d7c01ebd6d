"""v2 tensors ⇄ torch without a server: every datatype both ways, and refusals naming the field."""

from __future__ import annotations

import pytest
import torch

from amp4ec.frontdoor import tensors
from amp4ec.frontdoor.model import DATATYPES, ModelMeta, TensorMeta, V2Error, model_meta
from amp4ec.wire.oip import grpc_predict_v2_pb2 as pb


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_raw_and_json(datatype: str) -> None:
    t = (
        (torch.arange(6) % 2 if datatype == "BOOL" else torch.arange(6) - 2)
        .to(DATATYPES[datatype])
        .reshape(2, 3)
    )
    if datatype.startswith("UINT"):
        t = t.abs()
    assert torch.equal(tensors.from_raw(tensors.to_raw(t), datatype, [2, 3], "f"), t)
    assert torch.equal(tensors.from_json(tensors.to_json(t), datatype, [2, 3], "f"), t)


def test_typed_contents_use_the_datatype_field_only() -> None:
    got = tensors.from_contents(
        pb.InferTensorContents(int64_contents=[1, 2]), "INT64", [2], "inputs[0].contents"
    )
    assert got.dtype == torch.int64 and got.tolist() == [1, 2]
    with pytest.raises(
        V2Error, match=r"inputs\[0\]\.contents\.fp32_contents: a INT64 tensor's data goes in int64"
    ):
        tensors.from_contents(pb.InferTensorContents(fp32_contents=[1.0]), "INT64", [1], "inputs[0].contents")
    with pytest.raises(V2Error, match="FP16 travels only in raw_input_contents"):
        tensors.from_contents(pb.InferTensorContents(), "FP16", [1], "inputs[0].contents")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("abc", r"f: expected a JSON array, actual str"),
        ([1, 2, 3], r"f: expected 4 elements for shape \[2, 2\], actual 3"),
        ([["a", "b"], ["c", "d"]], r"f: expected FP32 values"),
    ],
)
def test_json_data_refusals(data: object, message: str) -> None:
    with pytest.raises(V2Error, match=message) as info:
        tensors.from_json(data, "FP32", [2, 2], "f")
    assert info.value.http_status == 400


def test_raw_byte_count_is_checked() -> None:
    with pytest.raises(V2Error, match=r"f: expected 16 bytes for FP32\[2, 2\], actual 15"):
        tensors.from_raw(bytes(15), "FP32", [2, 2], "f")


def test_metadata_comes_from_the_forward_and_bounds_the_batch() -> None:
    class Two(torch.nn.Module):
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return image * mask

    x = torch.zeros(1, 4)
    meta = model_meta("two", Two(), [x, x.long()], [x], batch_flexible=True, max_batch=8)
    assert meta.inputs == (TensorMeta("image", "FP32", (-1, 4)), TensorMeta("mask", "INT64", (-1, 4)))
    assert meta.check_input(1, "mask", "INT64", [8, 4]).name == "mask"
    with pytest.raises(
        V2Error, match=r"inputs\[0\]\.shape: expected \[-1, 4\] \(-1: 1\.\.8\), actual \[9, 4\]"
    ):
        meta.check_input(0, "image", "FP32", [9, 4])
    fixed = model_meta("two", Two(), [x, x], [x], batch_flexible=False)
    assert fixed.inputs[0].shape == (1, 4)
    with pytest.raises(V2Error) as info:
        ModelMeta("a", (), ()).check_name("b")
    assert info.value.kind == "not_found" and info.value.http_status == 404
