"""A .pt2 that would make torch.export.load unpickle is refused before torch reads it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from amp4ec.errors import InvalidSpec
from amp4ec.slicing import ModelSource, load_model
from amp4ec.slicing.archive import ensure_safe_archive


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _NotATensor:
    """weights_only=True cannot load an arbitrary class: only a full unpickle could."""


def _rewrite(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(_Small().eval(), (torch.randn(1, 4),)), path)
    return path


def test_plain_archive_passes_and_loads(archive: Path) -> None:
    ensure_safe_archive(archive)
    assert load_model(ModelSource(str(archive))).example_inputs[0].shape == (1, 4)


def test_pickled_weight_is_refused(archive: Path, tmp_path: Path) -> None:
    def mark_pickled(name: str, data: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    bad = tmp_path / "bad.pt2"
    _rewrite(archive, bad, mark_pickled)
    with pytest.raises(InvalidSpec, match="stored as a pickle"):
        load_model(ModelSource(str(bad)))


def test_sample_inputs_needing_pickle_are_refused(archive: Path, tmp_path: Path) -> None:
    import io
    import pickle

    payload = io.BytesIO()
    torch.save({"x": _NotATensor()}, payload, pickle_module=pickle)
    bad = tmp_path / "bad_inputs.pt2"
    _rewrite(archive, bad, lambda n, d: payload.getvalue() if "/data/sample_inputs/" in n else d)
    with pytest.raises(InvalidSpec, match="needs pickle"):
        ensure_safe_archive(bad)


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidSpec, match=r"not a torch\.export archive"):
        load_model(ModelSource(str(path)))
