"""``amp4ec infer`` input files: torch.save, .npy, JSON (a v2 request body or a nested list) and
PNG/JPEG images; each refusal names the file and the field. (What the command does with the
tensors is unchanged and runs end to end in tests/operator.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from amp4ec.cli.inputs import load_input
from amp4ec.errors import InvalidSpec

PIL = pytest.importorskip("PIL.Image", reason="Pillow reads the images (amp4ec does not install it)")


def _pixels(h: int = 16, w: int = 16) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_npy_and_torch_files(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    np.save(tmp_path / "x.npy", x)
    (got,) = load_input(tmp_path / "x.npy")
    torch.testing.assert_close(got, torch.from_numpy(x))
    torch.save((torch.ones(2), torch.zeros(3, dtype=torch.int64)), tmp_path / "pair.pt")
    a, b = load_input(tmp_path / "pair.pt")
    assert a.tolist() == [1.0, 1.0] and b.dtype == torch.int64
    np.save(tmp_path / "objects.npy", np.array(["a", "b"]))
    with pytest.raises(InvalidSpec, match=r"--input objects.npy: expected numbers, got an array of <U1"):
        load_input(tmp_path / "objects.npy")


def test_json_v2_body_and_nested_list(tmp_path: Path) -> None:
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2, 2], "data": [[[1, 2], [3, 4]]]},
            {"name": "n", "datatype": "INT64", "shape": [2], "data": [7, 8]},
        ]
    }
    (tmp_path / "body.json").write_text(json.dumps(body))
    x, n = load_input(tmp_path / "body.json")
    assert x.dtype == torch.float32 and x.shape == (1, 2, 2) and x.flatten().tolist() == [1, 2, 3, 4]
    assert n.dtype == torch.int64 and n.tolist() == [7, 8]
    (tmp_path / "list.json").write_text("[[[0.5, 1.5], [2.5, 3.5]]]")
    (t,) = load_input(tmp_path / "list.json")
    assert t.shape == (1, 2, 2) and t.dtype == torch.float32 and t[0, 1, 1] == 3.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "--input bad.json: not valid JSON"),
        ("[[1, 2], [3]]", "--input bad.json: expected a nested list of numbers of one shape"),
        ('{"x": 1}', "--input bad.json: expected a v2 request body with 'inputs', or a nested list"),
        ('{"inputs": []}', "--input bad.json: inputs: expected a non-empty list"),
        (
            '{"inputs": [{"datatype": "FP8", "shape": [1], "data": [1]}]}',
            "--input bad.json: inputs[0].datatype: expected one of BOOL, UINT8",
        ),
        ('{"inputs": [{"datatype": "FP32", "shape": "1", "data": [1]}]}', "inputs[0].shape: expected a list"),
        ('{"inputs": [{"datatype": "FP32", "shape": [2]}]}', "inputs[0].data: missing"),
        (
            '{"inputs": [{"datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]}',
            "--input bad.json: inputs[0].data: expected 3 elements for shape [1, 3], actual 2",
        ),
    ],
)
def test_json_refusals_name_the_file_and_the_field(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(InvalidSpec) as info:
        load_input(tmp_path / "bad.json")
    assert message in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_images_are_rgb_1x3xhxw_in_0_1(tmp_path: Path, suffix: str) -> None:
    pixels = _pixels(8, 12)
    PIL.fromarray(pixels).save(tmp_path / f"cat{suffix}", quality=100)
    (x,) = load_input(tmp_path / f"cat{suffix}")
    assert x.shape == (1, 3, 8, 12) and x.dtype == torch.float32
    with PIL.open(tmp_path / f"cat{suffix}") as decoded:  # PNG: the pixels; JPEG: what it kept of them
        rgb = np.asarray(decoded.convert("RGB"), dtype=np.float32)
    if suffix == ".png":
        assert (rgb == pixels).all()
    torch.testing.assert_close(x, torch.from_numpy(rgb.transpose(2, 0, 1) / 255)[None])
    PIL.fromarray(pixels[:, :, 0]).save(tmp_path / "grey.png")  # grey: converted to RGB
    assert load_input(tmp_path / "grey.png")[0].shape == (1, 3, 8, 12)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InvalidSpec, match=r"--input broken.png: not a readable image"):
        load_input(tmp_path / "broken.png")
