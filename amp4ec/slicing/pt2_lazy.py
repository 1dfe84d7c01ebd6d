"""A torch.export archive with its weights left on the meta device, each read by name on demand.

[Note: shard-only loading of a .pt2] ``torch.export.load`` reads every weight of an archive
before it returns, so a shard serving two blocks of a large model held the whole model while
loading. The archive's layout (the only one ``archive.py`` accepts) names each weight's
record, dtype, sizes and strides in ``data/weights/model_weights_config.json``; the program
is deserialized here with a meta tensor in place of each weight, cut into blocks on the meta
device like a zoo model, and ``ArchiveWeights[name]`` then reads only the shard's records
(``materialise``). Constants (lifted tensors, usually small) load as torch loads them. What is
reused from torch is its own deserializer (``torch._export.serde``, private, pinned with torch
in pyproject.toml); a change there fails tests/slicing/test_slicing_pt2_lazy.py, not a user.
Two names of one record (tied weights) become two tensors: the shard holds it twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import (
    ExportedProgramDeserializer,
    _bytes_to_dataclass,
    deserialize_scalar_type,
    deserialize_size,
    deserialize_storage_offset,
    deserialize_stride,
)
from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_payload_config

__all__ = ["ArchiveWeights", "load_meta_program"]

_MODEL = "model"  # torch.export.save's one program (archive.py accepts no other)
_WEIGHTS_DIR = "data/weights/"
_CONFIG = f"{_WEIGHTS_DIR}model_weights_config.json"


class ArchiveWeights(Mapping[str, torch.Tensor]):
    """Weight name → its tensor, read from the archive's record when asked (and only then)."""

    def __init__(self, reader: PT2ArchiveReader, config: schema.PayloadConfig, file: IO[bytes]) -> None:
        self._reader = reader
        self._file = file  # open while the weights may be read: the file checked, not the path
        self._config = config.config
        self.read: list[str] = []
        """The names read so far (a test's witness that a shard reads only its own)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        meta = self._config[name]
        tm = meta.tensor_meta
        assert tm is not None  # archive.py refuses pickled payloads
        dtype = deserialize_scalar_type(tm.dtype)
        record = _WEIGHTS_DIR + meta.path_name
        nbytes = self._reader.archive_file.get_record_size(record)
        numel = nbytes // torch._utils._element_size(dtype)
        raw = self._reader.archive_file.get_storage_from_record(record, numel, dtype)
        flat = torch.empty(0, dtype=dtype)
        flat.set_(raw.untyped_storage(), 0, (numel,), (1,))  # as torch's own loader wraps it
        self.read.append(name)
        return torch.as_strided(
            flat,
            deserialize_size(tm.sizes),
            deserialize_stride(tm.strides),
            deserialize_storage_offset(tm.storage_offset),
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def __len__(self) -> int:
        return len(self._config)


def _meta_state(config: schema.PayloadConfig) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, meta in config.config.items():
        tm = meta.tensor_meta
        assert tm is not None
        like = torch.empty_strided(
            deserialize_size(tm.sizes),
            deserialize_stride(tm.strides),
            dtype=deserialize_scalar_type(tm.dtype),
            device="meta",
        )
        state[name] = torch.nn.Parameter(like, requires_grad=tm.requires_grad) if meta.is_param else like
    return state


def load_meta_program(file: IO[bytes]) -> tuple[torch.export.ExportedProgram, ArchiveWeights]:
    """The archive in ``file`` (already checked by ``ensure_safe_archive``) as a program whose
    weights are meta tensors, and the weights to read by name from the same open file."""
    reader = PT2ArchiveReader(file)  # the file checked, not the path again
    config = _load_payload_config(reader, _CONFIG)
    program_bytes = reader.read_bytes(f"models/{_MODEL}.json")
    samples = reader.read_bytes(f"data/sample_inputs/{_MODEL}.pt")
    constants: Any = _load_constants(reader, _MODEL)
    program = ExportedProgramDeserializer(None).deserialize(
        _bytes_to_dataclass(schema.ExportedProgram, program_bytes), _meta_state(config), constants, samples
    )
    return program, ArchiveWeights(reader, config, file)
