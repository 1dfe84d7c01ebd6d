"""Crafted .pt2 archives are refused before torch reads them, naming the entry, and no code runs.

Every payload writes a marker file when it runs. The control tests hand the same payloads to
``torch.export.load`` directly and see the marker appear, so a refusal here is not vacuous.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from amp4ec.errors import InvalidSpec
from amp4ec.slicing import ModelSource, load_model

Edit = Callable[[dict[str, bytes]], None]


class _Net(torch.nn.Module):
    """Parameters, a buffer and a tensor constant: every payload kind of the plain layout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.bn = torch.nn.BatchNorm1d(2)
        self.register_buffer("scale", torch.full((2,), 2.0))
        self.offset = torch.tensor([1.0, -1.0])  # a lifted tensor constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x)) * self.scale + self.offset


class _RunsCode:
    """Unpickling this writes ``marker``: what an attacker's pickle would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A plain archive with a dynamic batch dim (so its program carries shape expressions)."""
    path = tmp_path / "archive.pt2"  # torch names the root folder after the file
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(_Net().eval(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def _craft(src: Path, dst: Path, edit: Edit) -> Path:
    with zipfile.ZipFile(src) as zin:
        entries = {name: zin.read(name) for name in zin.namelist()}
    edit(entries)
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in entries.items():
            zout.writestr(name, data)
    return dst


def _pickled_payload(config: str, payload_dir: str, marker: Path) -> Edit:
    def edit(entries: dict[str, bytes]) -> None:
        doc = json.loads(entries[config])
        meta = next(iter(doc["config"].values()))
        meta["use_pickle"] = True
        entries[config] = json.dumps(doc).encode()
        entries[payload_dir + meta["path_name"]] = pickle.dumps(_RunsCode(marker))

    return edit


def _opaque_constant(marker: Path) -> Edit:
    def edit(entries: dict[str, bytes]) -> None:
        config = "archive/data/constants/model_constants_config.json"
        doc = json.loads(entries[config])
        meta = next(iter(doc["config"].values()))
        meta.update(path_name="opaque_obj_0", use_pickle=True)
        entries[config] = json.dumps(doc).encode()
        entries["archive/data/constants/opaque_obj_0"] = pickle.dumps(_RunsCode(marker))

    return edit


def _program_edit(edit_text: Callable[[str], str]) -> Edit:
    def edit(entries: dict[str, bytes]) -> None:
        entries["archive/models/model.json"] = edit_text(
            entries["archive/models/model.json"].decode()
        ).encode()

    return edit


def _sympy_eval(marker: Path) -> Edit:
    """torch parses shape expressions with sympy.sympify, i.e. eval."""
    code = f"__import__('builtins').exec(\\\"open({str(marker)!r}, 'w').write('ran')\\\")"

    def swap(text: str) -> str:
        doc = json.loads(text)
        found = []

        def walk(node: object) -> None:
            if isinstance(node, dict):
                if isinstance(node.get("expr_str"), str):
                    found.append(node)
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(doc)
        assert found, "the fixture must carry a shape expression"
        for node in found:
            node["expr_str"] = json.loads(f'"{code}"')
        return json.dumps(doc)

    return _program_edit(swap)


def _native_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared object whose constructor writes the marker (placeholder bytes without gcc)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return b"\x7fELF not really"
    src = tmp_path / "evil.c"
    src.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void run(void) "
        f'{{ FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }} }}\n'
    )
    out = tmp_path / "evil.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


def _legacy_layout(marker: Path) -> Edit:
    """torch's pre-2.8 layout: a JSON program beside pickled state, constants and inputs."""

    def edit(entries: dict[str, bytes]) -> None:
        program = entries["archive/models/model.json"]
        entries.clear()
        entries["version"] = b"8.0"
        entries["serialized_exported_program.json"] = program
        for name in ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt"):
            entries[name] = pickle.dumps(_RunsCode(marker))

    return edit


def _payloads(tmp_path: Path, marker: Path) -> dict[str, tuple[Edit, str]]:
    """Payload name → (edit, the entry the refusal must name)."""
    weights = "archive/data/weights/model_weights_config.json"
    constants = "archive/data/constants/model_constants_config.json"
    so = _native_library(tmp_path, marker)
    evil = pickle.dumps(_RunsCode(marker))
    return {
        "pickled weight": (_pickled_payload(weights, "archive/data/weights/", marker), weights),
        "pickled constant": (_pickled_payload(constants, "archive/data/constants/", marker), constants),
        "opaque constant": (_opaque_constant(marker), "archive/data/constants/opaque_obj_0"),
        "pickled sample inputs": (
            lambda e: e.update({"archive/data/sample_inputs/model.pt": evil}),
            "archive/data/sample_inputs/model.pt",
        ),
        "legacy pickled state dict": (
            lambda e: e.update({"archive/data/weights/model.pt": evil}),
            "archive/data/weights/model.pt",
        ),
        "legacy layout": (_legacy_layout(marker), "version"),
        "AOTInductor shared object": (
            lambda e: e.update({"archive/data/aotinductor/model/model.so": so}),
            "archive/data/aotinductor/model/model.so",
        ),
        "sympy eval in a shape": (_sympy_eval(marker), "archive/models/model.json"),
        "graph calls os.system": (
            _program_edit(
                lambda t: t.replace('"torch.ops.aten.linear.default"', '"torch.serialization.os.system"')
            ),
            "archive/models/model.json",
        ),
        "unknown entry": (
            lambda e: e.update({"archive/extra/readme.txt": b"hi"}),
            "archive/extra/readme.txt",
        ),
    }


def test_plain_archive_with_params_buffers_and_constants_passes_and_loads(archive: Path) -> None:
    loaded = load_model(ModelSource(str(archive)))
    assert loaded.example_inputs[0].shape == (1, 4)  # the dynamic batch materialised as 1
    assert loaded.module(loaded.example_inputs[0]).shape == (1, 2)


@pytest.mark.parametrize("spec", ["mobilenet_v2", "vit_tiny"])
def test_zoo_models_exported_by_torch_pass(spec: str, tmp_path: Path) -> None:
    model = load_model(ModelSource(spec))
    path = tmp_path / f"{spec}.pt2"
    torch.export.save(torch.export.export(model.module, model.example_inputs), path)
    loaded = load_model(ModelSource(str(path)))
    torch.testing.assert_close(loaded.module(*model.example_inputs), model.module(*model.example_inputs))


def test_the_checked_archive_loads_without_unpickling(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the check torch reads raw tensor records and weights_only sample inputs only."""
    calls: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads during load"))
    load_model(ModelSource(str(archive)))
    assert calls and all(w is True for w in calls), calls


def test_each_crafted_payload_is_refused_naming_its_entry_and_runs_nothing(
    archive: Path, tmp_path: Path, marker: Path
) -> None:
    for name, (edit, entry) in _payloads(tmp_path, marker).items():
        bad = _craft(archive, tmp_path / f"{name.replace(' ', '_')}.pt2", edit)
        with pytest.raises(InvalidSpec) as refused:
            load_model(ModelSource(str(bad)))
        assert repr(entry) in str(refused.value), (name, str(refused.value))
        assert not marker.exists(), f"{name}: code ran"


@pytest.mark.parametrize(
    "name", ["pickled weight", "pickled constant", "opaque constant", "sympy eval in a shape"]
)
def test_control_torch_alone_runs_these_payloads(
    archive: Path, tmp_path: Path, marker: Path, name: str
) -> None:
    """Without the guard the same archives run code: the refusals above are the guard's doing."""
    edit, _ = _payloads(tmp_path, marker)[name]
    bad = _craft(archive, tmp_path / "control.pt2", edit)
    with contextlib.suppress(Exception):  # it may fail after the payload ran; the marker tells
        torch.export.load(bad)
    assert marker.exists()


def test_duplicate_entries_are_refused(archive: Path, tmp_path: Path) -> None:
    bad = tmp_path / "dup.pt2"
    shutil.copy(archive, bad)
    with zipfile.ZipFile(bad, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("archive/data/weights/weight_0", b"\0" * 32)
    with pytest.raises(InvalidSpec, match="appears twice"):
        load_model(ModelSource(str(bad)))


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidSpec, match=r"not a torch\.export archive"):
        load_model(ModelSource(str(path)))


def test_entries_read_whole_are_bounded(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small zip may inflate to gigabytes: entries the check reads have a size bound (256 MiB;
    lowered here so the test needs no big file)."""
    from amp4ec.slicing import archive as guard

    monkeypatch.setattr(guard, "_MAX_READ_BYTES", 1000)
    with pytest.raises(InvalidSpec, match=r"'archive/data/weights/model_weights_config.json' is larger than"):
        load_model(ModelSource(str(archive)))
