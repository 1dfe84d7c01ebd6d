"""Argument checks that run before anything heavy (torch, a model build, agents): a bad flag is
refused in well under a second. Nothing here imports torch."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from amp4ec.errors import InvalidSpec

__all__ = ["check_at_least", "check_writable_file", "missing_extra", "write_json"]


def check_at_least(value: int | None, flag: str, minimum: int = 1) -> None:
    """``value`` (None: the default) is at least ``minimum``."""
    if value is not None and value < minimum:
        raise InvalidSpec(f"{flag}: expected at least {minimum}, got {value}")


def check_writable_file(path: Path | None, flag: str) -> None:
    """``path`` can be written when the results are ready: its folder exists and is writable."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidSpec(f"{flag}: {path} is a folder; expected a file name")
    if not folder.is_dir():
        raise InvalidSpec(f"{flag}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidSpec(f"{flag}: {path} is not writable")


def write_json(path: Path, data: Any, flag: str) -> None:
    """Write ``data``; a failure (disk full, folder removed meanwhile) is one line naming ``flag``."""
    try:
        path.write_text(json.dumps(data, indent=2))
    except OSError as e:
        raise InvalidSpec(
            f"{flag}: could not write {path} ({e.strerror or e}); the results are printed above"
        ) from None


def missing_extra(module: str) -> bool:
    """Whether an optional dependency is absent (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True
