"""Input files of ``amp4ec infer``: tensors from torch.save, NumPy, JSON or an image.

Chosen by suffix; every refusal is an InvalidSpec naming ``--input``, the file and, inside a
JSON file, the field (``inputs[0].shape``):

- ``.npy``: one array (``allow_pickle=False``: object arrays are refused);
- ``.json``: a v2 request body (``{"inputs": [{"name", "datatype", "shape", "data"}]}``, as
  ``curl`` sends to the front door; the names are not checked here) or a nested list of
  numbers, taken as one FP32 tensor of its nesting's shape;
- ``.png``, ``.jpg``, ``.jpeg``: one RGB image as a 1×3×H×W FP32 tensor scaled to [0, 1] (no
  resizing and no normalisation: the image must have the model's input size). Needs Pillow,
  which amp4ec does not install (``pip install pillow``);
- anything else: a ``torch.save`` file of a tensor or a tuple/list of tensors, loaded with
  ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from amp4ec.errors import InvalidSpec

__all__ = ["IMAGE_SUFFIXES", "load_input"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_input(path: Path) -> tuple[Any, ...]:
    """The tensors in ``path`` (see the module docstring for the formats)."""
    if not path.is_file():
        raise InvalidSpec(f"--input: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return (_npy(path),)
    if suffix == ".json":
        return _json(path)
    if suffix in IMAGE_SUFFIXES:
        return (_image(path),)
    return _torch(path)


def _npy(path: Path) -> Any:
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InvalidSpec(f"--input {path.name}: not a plain .npy array ({exc})") from None
    if array.dtype.kind not in "biuf":
        raise InvalidSpec(f"--input {path.name}: expected numbers, got an array of {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _json(path: Path) -> tuple[Any, ...]:
    import numpy as np
    import torch

    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"--input {path.name}: not valid JSON ({exc})") from None
    if isinstance(data, list):
        try:
            array = np.asarray(data, dtype=np.float32)
        except (ValueError, TypeError):
            raise InvalidSpec(
                f"--input {path.name}: expected a nested list of numbers of one shape (every row as long "
                "as the others), or a v2 request body with 'inputs'"
            ) from None
        return (torch.from_numpy(array),)
    if not isinstance(data, dict) or "inputs" not in data:
        raise InvalidSpec(f"--input {path.name}: expected a v2 request body with 'inputs', or a nested list")
    return _v2_inputs(path, data["inputs"])


def _v2_inputs(path: Path, inputs: Any) -> tuple[Any, ...]:
    from amp4ec.frontdoor.model import DATATYPES, V2Error
    from amp4ec.frontdoor.tensors import from_json

    if not isinstance(inputs, list) or not inputs:
        raise InvalidSpec(f"--input {path.name}: inputs: expected a non-empty list of input tensors")
    tensors = []
    for i, spec in enumerate(inputs):
        field = f"inputs[{i}]"
        if not isinstance(spec, dict):
            raise InvalidSpec(
                f"--input {path.name}: {field}: expected an object with datatype, shape and data"
            )
        datatype, shape = spec.get("datatype"), spec.get("shape")
        if datatype not in DATATYPES:
            raise InvalidSpec(
                f"--input {path.name}: {field}.datatype: expected one of {', '.join(DATATYPES)}, "
                f"got {datatype!r}"
            )
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidSpec(f"--input {path.name}: {field}.shape: expected a list of sizes, got {shape!r}")
        if "data" not in spec:
            raise InvalidSpec(
                f"--input {path.name}: {field}.data: missing (binary data needs the front door)"
            )
        try:
            tensors.append(from_json(spec["data"], datatype, shape, f"{field}.data"))
        except V2Error as exc:
            raise InvalidSpec(f"--input {path.name}: {exc}") from None
    return tuple(tensors)


def _image(path: Path) -> Any:
    import numpy as np
    import torch

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise InvalidSpec(
            f"--input {path.name}: reading images needs Pillow, which amp4ec does not install "
            "(pip install pillow), or save the tensor with torch.save or numpy.save"
        ) from None
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidSpec(f"--input {path.name}: not a readable image ({exc})") from None
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def _torch(path: Path) -> tuple[Any, ...]:
    import torch

    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # unpickling refused or not a torch file: one clear line
        raise InvalidSpec(
            f"--input {path.name}: not a tensor file saved with torch.save, nor .npy, .json, .png or "
            f".jpg ({exc})"
        ) from None
    tensors = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise InvalidSpec(f"--input {path.name}: must hold a tensor or a tuple/list of tensors")
    return tensors
