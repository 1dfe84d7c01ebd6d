"""Refuse a torch.export archive that would make torch.export.load unpickle anything.

[Note: why a guard] torch.export.load (torch 2.13) falls back to ``pickle``/``weights_only=False``
for weights or constants marked ``use_pickle``, for custom and opaque objects, and for sample
inputs that ``weights_only=True`` cannot read. An archive that needs none of these is plain
JSON plus raw tensor bytes; this guard checks that before torch sees the file, so a .pt2 from
an untrusted source can execute no code while loading.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from amp4ec.errors import InvalidSpec

__all__ = ["ensure_safe_archive"]

_UNSAFE_PREFIXES = ("custom_obj", "opaque_obj")


def ensure_safe_archive(path: str | Path) -> None:
    """Raise InvalidSpec naming the entry when loading ``path`` would unpickle something."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise InvalidSpec(f"model: {path} is not a torch.export archive ({e})") from None
    with archive:
        for name in archive.namelist():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                _check_config(path, name, archive.read(name))
            elif "/data/sample_inputs/" in name and name.endswith(".pt"):
                try:  # torch would retry with weights_only=False on failure; we refuse instead
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:
                    raise InvalidSpec(
                        f"model: {path}: {name} needs pickle to load ({type(e).__name__}); "
                        "refusing an archive that could run code"
                    ) from None


def _check_config(path: str | Path, name: str, raw: bytes) -> None:
    try:
        entries = json.loads(raw)["config"]
    except (ValueError, KeyError, TypeError):
        raise InvalidSpec(f"model: {path}: {name} is not a valid payload config") from None
    for fqn, meta in entries.items():
        if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(_UNSAFE_PREFIXES):
            raise InvalidSpec(
                f"model: {path}: {fqn!r} is stored as a pickle; refusing an archive that could run "
                "code (re-export it with plain tensor weights and constants)"
            )
