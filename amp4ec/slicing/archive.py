"""Accept a torch.export archive only in the data-only layout ``torch.export.save`` writes.

[Note: archive allow-list] torch.export.load (torch 2.13) runs code for many archives: it
unpickles (``weights_only=False``) weights or constants marked ``use_pickle``, custom and
opaque objects, sample inputs that ``weights_only=True`` cannot read and every payload of
the pre-2.8 layout; it loads AOTInductor shared objects; it evaluates every symbolic shape
expression with ``sympy.sympify`` (Python ``eval``); and a graph node may name any callable
reachable from ``torch``, which then runs on the first forward. So an archive is accepted
only when every entry is one the plain ExportedProgram layout has, payloads are raw tensor
bytes, sample inputs load with ``weights_only=True``, shape expressions use only sympy's
constructors, and graph nodes call only ATen/prims operators or plain arithmetic. The
caller hands torch the same open file it checked (``open_checked``), not the path again.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import torch

from amp4ec.errors import InvalidSpec

__all__ = ["ensure_safe_archive"]

Refuse = Callable[[str, str], NoReturn]

# Entries below the archive's one root folder (torch writes "archive/").
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_REQUIRED = {"archive_format", "archive_version", "models/model.json", "data/sample_inputs/model.pt"}
_PAYLOAD = {"data/weights/": re.compile(r"weight_\d+"), "data/constants/": re.compile(r"tensor_\d+")}
_CONFIGS = {
    "data/weights/model_weights_config.json": "data/weights/",
    "data/constants/model_constants_config.json": "data/constants/",
}
# Why an entry a known-unsafe producer writes is refused, by prefix (after the root).
_KNOWN_UNSAFE = {
    "data/aotinductor/": "an AOTInductor package (compiled native code)",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia": "an MTIA package",
    "xl_model_weights/": "externally stored weights",
    "data/constants/custom_obj_": "a pickled custom object",
    "data/constants/opaque_obj_": "a pickled opaque object",
    "data/weights/model.pt": "a pickled state dict (torch's pre-2.8 layout)",
    "data/constants/model.pt": "pickled constants (torch's pre-2.8 layout)",
}
_LEGACY = {
    "version",
    "serialized_exported_program.json",
    "serialized_state_dict.pt",
    "serialized_constants.pt",
    "serialized_example_inputs.pt",
}

# Graph node targets a data-only program calls; anything else (any callable reachable from
# ``torch``, e.g. ``torch.serialization.os.system``) would run on the first forward.
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.(?!__)\w+\.(?!__)\w+")
_OPERATORS = ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg")
_SYM_FUNCTIONS = ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum")
_PLAIN_TARGETS = (
    {f"_operator.{n}" for n in _OPERATORS}
    | {f"torch.{n}" for n in _SYM_FUNCTIONS}
    | {f"math.{n}" for n in ("ceil", "floor", "trunc")}
)
# Symbolic shape expressions are sympy ``srepr`` text, which torch passes to sympify (eval):
# only sympy constructors, assumption flags, quoted symbol names and small integers pass.
_EXPR_NAMES = {
    "Symbol", "Integer", "Rational", "Add", "Mul", "Min", "Max", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "oo", "True", "False",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "even", "odd",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilDiv", "CeilToInt", "FloorToInt",
    "IntTrueDiv", "FloatTrueDiv", "TruncToInt", "TruncToFloat", "Identity", "ToFloat", "RoundToInt",
}  # fmt: skip
_EXPR_TOKEN = re.compile(r"\s+|'[A-Za-z]\w{0,15}'|[A-Za-z_]\w*|\d{1,19}(?!\d)|[(),=+\-*/]")
_MAX_EXPR_CHARS = 4096
_MAX_READ_BYTES = 256 << 20


def ensure_safe_archive(source: str | Path | IO[bytes], name: str | None = None) -> None:
    """Raise InvalidSpec naming the entry unless ``source`` is a data-only torch.export archive.

    ``source`` may be a path or an open binary file (then pass ``name`` for messages; the
    file is left wherever reading it ended, so seek before handing it on).
    """
    shown = name or str(source)
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as e:
        raise InvalidSpec(f"model: {shown} is not a torch.export archive ({e})") from None
    with archive:
        entries = _entries(archive, shown)
        refuse = _refuser(shown)
        for rel, full in entries.items():
            _check_entry(rel, full, refuse)
        for rel in sorted(_REQUIRED - entries.keys()):
            refuse(rel, "is missing; expected the layout torch.export.save writes")
        for rel, value in (("archive_format", b"pt2"), ("archive_version", b"0")):
            if _read(archive, entries[rel], refuse).strip() != value:
                refuse(entries[rel], f"expected {value.decode()!r}")
        for rel, payload_dir in _CONFIGS.items():
            if rel in entries:
                _check_config(archive, entries[rel], payload_dir, entries, refuse)
        _check_program(archive, entries["models/model.json"], refuse)
        _check_sample_inputs(archive, entries["data/sample_inputs/model.pt"], refuse)


def _refuser(shown: str) -> Refuse:
    def refuse(entry: str, why: str) -> NoReturn:
        raise InvalidSpec(
            f"model: {shown}: archive entry {entry!r} {why}; refusing an archive that could run code "
            "(only plain torch.export.save archives of an ExportedProgram are accepted)"
        )

    return refuse


def _entries(archive: zipfile.ZipFile, shown: str) -> dict[str, str]:
    """Entry path below the root folder → full name; one root, no duplicates, no escapes."""
    names = archive.namelist()
    refuse = _refuser(shown)
    if not names:
        raise InvalidSpec(f"model: {shown} is an empty archive; expected a torch.export archive")
    entries: dict[str, str] = {}
    root = names[0].split("/", 1)[0]
    for full in names:
        head, sep, rel = full.partition("/")
        if not sep:
            if full in _LEGACY:
                refuse(full, "belongs to torch's pre-2.8 archive layout, which loads with pickle")
            refuse(full, "is outside the archive's root folder")
        if head != root or ".." in full.split("/") or full.startswith("/") or "\\" in full:
            refuse(full, f"is outside the archive's root folder {root!r}")
        if rel in entries:  # zip readers may disagree on which duplicate wins
            refuse(full, "appears twice")
        entries[rel] = full
    return entries


def _check_entry(rel: str, full: str, refuse: Refuse) -> None:
    if rel in _FIXED or rel.endswith("/"):
        return
    for prefix, pattern in _PAYLOAD.items():
        if rel.startswith(prefix) and pattern.fullmatch(rel[len(prefix) :]):
            return
    for prefix, what in _KNOWN_UNSAFE.items():
        if rel.startswith(prefix):
            refuse(full, f"is {what}")
    if rel.endswith((".so", ".dll", ".dylib", ".pkl", ".pickle")):
        refuse(full, "is native code or a pickle")
    refuse(full, "is not part of the data-only layout")


def _read(archive: zipfile.ZipFile, full: str, refuse: Refuse) -> bytes:
    """An entry the check reads whole, bounded: a small zip may inflate to gigabytes."""
    if archive.getinfo(full).file_size > _MAX_READ_BYTES:
        refuse(full, f"is larger than {_MAX_READ_BYTES >> 20} MiB uncompressed")
    return archive.read(full)


def _check_config(
    archive: zipfile.ZipFile, full: str, payload_dir: str, entries: dict[str, str], refuse: Refuse
) -> None:
    raw = _read(archive, full, refuse)
    try:
        config = json.loads(raw)["config"]
        items = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        refuse(full, "is not a valid payload config")
    for fqn, meta in items:
        if not isinstance(meta, dict):
            refuse(full, f"has a malformed entry for {fqn!r}")
        path_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            refuse(full, f"stores {fqn!r} as a pickle ({path_name})")
        if not _PAYLOAD[payload_dir].fullmatch(path_name) or payload_dir + path_name not in entries:
            refuse(full, f"points {fqn!r} at {path_name!r}, not a raw tensor entry of the archive")
        if not isinstance(meta.get("tensor_meta"), dict):
            refuse(full, f"has no tensor metadata for {fqn!r}")


def _check_program(archive: zipfile.ZipFile, full: str, refuse: Refuse) -> None:
    raw = _read(archive, full, refuse)
    try:
        program = json.loads(raw)
    except ValueError:
        refuse(full, "is not valid JSON")
    for key, value in _strings(program):
        if key == "target" and not (_OP_TARGET.fullmatch(value) or value in _PLAIN_TARGETS):
            refuse(full, f"calls {value[:80]!r}, not an ATen/prims operator")
        if key == "expr_str" and not _plain_expression(value):
            refuse(full, f"has a shape expression that is not plain sympy: {value[:80]!r}")


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string value) in a JSON document, iteratively (documents may nest deep)."""
    stack: list[tuple[str, Any]] = [(key, node)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, str):
            yield key, node
        elif isinstance(node, dict):
            stack.extend(node.items())
        elif isinstance(node, list):
            stack.extend((key, v) for v in node)


def _plain_expression(text: str) -> bool:
    if len(text) > _MAX_EXPR_CHARS:
        return False
    pos = 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None:
            return False
        token = m.group()
        if (token[0].isalpha() or token[0] == "_") and token not in _EXPR_NAMES:
            return False
        pos = m.end()
    return True


def _check_sample_inputs(archive: zipfile.ZipFile, full: str, refuse: Refuse) -> None:
    # torch retries with weights_only=False when this fails; refuse instead.
    raw = _read(archive, full, refuse)
    try:
        torch.load(io.BytesIO(raw), weights_only=True)
    except Exception as e:
        refuse(full, f"needs pickle to load ({type(e).__name__})")
