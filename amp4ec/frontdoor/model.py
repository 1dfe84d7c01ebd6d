"""What a model looks like to v2 clients, and the checks a request passes before it is sent.

[Note: v2 errors] Every refusal is a ``V2Error`` with a kind that maps to one HTTP status
(REST) and one gRPC status code (gRPC), and a message naming the field, e.g.
``inputs[0].shape: expected [-1, 3, 224, 224], actual [1, 3, 224]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from amp4ec.slicing.signature import input_names

__all__ = ["DATATYPES", "ModelMeta", "TensorMeta", "V2Error", "datatype_of", "meta_of_specs", "model_meta"]

DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
"""The protocol's datatypes that amp4ec's wire carries (UINT16..UINT64 and BYTES it does not)."""
_NAMES = {v: k for k, v in DATATYPES.items()}

_HTTP = {
    "invalid": 400,
    "not_found": 404,
    "too_large": 413,
    "busy": 429,
    "unavailable": 503,
    "deadline": 504,
}


class V2Error(Exception):
    """A refused or failed v2 request (see [Note: v2 errors])."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def http_status(self) -> int:
        return _HTTP.get(self.kind, 500)


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise V2Error("invalid", f"dtype {dtype} has no v2 datatype amp4ec serves") from None


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 = any size (the batch dimension when the model's cuts are batch-generic)."""

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelMeta:
    name: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    platform: str = "amp4ec_pytorch"
    version: str = "1"
    max_batch: int = 64
    """Bound on a -1 dimension: the agents' --max-batch."""

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    def check_name(self, name: str, version: str = "") -> None:
        if name != self.name:
            raise V2Error("not_found", f"model {name!r} is not served here; this server serves {self.name!r}")
        if version and version != self.version:
            raise V2Error("not_found", f"model {name!r} has no version {version!r}; versions: {self.version}")

    def check_input(self, i: int, name: str, datatype: str, shape: Sequence[int]) -> TensorMeta:
        """The metadata of input ``i`` once ``name``, ``datatype`` and ``shape`` fit it (shape
        first: it bounds how many elements the request may carry)."""
        field = f"inputs[{i}]"
        if i >= len(self.inputs):
            raise V2Error("invalid", f"inputs: {self.name} takes {len(self.inputs)} input(s), got more")
        meta = self.inputs[i]
        if name != meta.name:
            raise V2Error("invalid", f"{field}.name: expected {meta.name!r}, actual {name!r}")
        if datatype != meta.datatype:
            raise V2Error("invalid", f"{field}.datatype: expected {meta.datatype}, actual {datatype!r}")
        shape = list(shape)
        fits = len(shape) == len(meta.shape) and all(
            (e == -1 and 1 <= a <= self.max_batch) or a == e for a, e in zip(shape, meta.shape, strict=True)
        )
        if not fits:
            bound = f" (-1: 1..{self.max_batch})" if -1 in meta.shape else ""
            raise V2Error("invalid", f"{field}.shape: expected {list(meta.shape)}{bound}, actual {shape}")
        return meta

    def check_inputs(self, count: int) -> None:
        if count != len(self.inputs):
            names = ", ".join(t.name for t in self.inputs)
            raise V2Error("invalid", f"inputs: expected {len(self.inputs)} ({names}), actual {count}")

    def output_index(self, name: str, field: str) -> int:
        for i, t in enumerate(self.outputs):
            if t.name == name:
                return i
        names = ", ".join(t.name for t in self.outputs)
        raise V2Error("invalid", f"{field}: no output {name!r}; outputs: {names}")


def model_meta(
    name: str,
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    batch_flexible: bool,
    max_batch: int = 64,
) -> ModelMeta:
    """A model's v2 metadata from its example inputs and the outputs they give (the plan's
    model inputs and final outputs); dim 0 is -1 where the model accepts any batch."""
    return meta_of_specs(
        name,
        input_names(module, len(inputs)),
        [(tuple(t.shape), t.dtype) for t in inputs],
        [(tuple(t.shape), t.dtype) for t in outputs],
        batch_flexible,
        max_batch,
    )


Spec = tuple[Sequence[int], torch.dtype]


def meta_of_specs(
    name: str,
    names: Sequence[str],
    inputs: Sequence[Spec],
    outputs: Sequence[Spec],
    batch_flexible: bool,
    max_batch: int = 64,
) -> ModelMeta:
    """``model_meta`` from (shape, dtype) pairs: what an agent knows of a model it cut on the
    meta device (its chain's first and last cut)."""

    def shape(dims: Sequence[int]) -> tuple[int, ...]:
        dims = tuple(int(d) for d in dims)
        return (-1, *dims[1:]) if batch_flexible and dims else dims

    return ModelMeta(
        name=name,
        inputs=tuple(
            TensorMeta(n, datatype_of(dtype), shape(dims))
            for n, (dims, dtype) in zip(names, inputs, strict=True)
        ),
        outputs=tuple(
            TensorMeta(f"output_{i}", datatype_of(dtype), shape(dims))
            for i, (dims, dtype) in enumerate(outputs)
        ),
        max_batch=max_batch,
    )


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)
