"""The storage initializer: fetch a model file (https:// or a mounted pvc://) and verify its SHA-256.

Runs as a shard Pod's init container (``python -m amp4ec.operator.fetch``, the operator
image), KServe's storage-initializer pattern: the shard only starts once the file is in
place and its digest matches. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import urllib.request
from pathlib import Path

__all__ = ["fetch", "main"]

PVC_MOUNT = Path("/mnt/pvc")


class FetchError(Exception):
    """The file could not be fetched, or its digest differs from the expected one."""


def fetch(
    uri: str, out: Path, sha256: str | None = None, pvc_mount: Path = PVC_MOUNT, timeout_s: float = 600
) -> str:
    """Copy ``uri`` to ``out`` (atomically) and return its hex SHA-256; raise FetchError on a mismatch."""
    tmp = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        if uri.startswith("pvc://"):
            _, _, path = uri[len("pvc://") :].partition("/")
            source = (pvc_mount / path).resolve()
            if pvc_mount.resolve() not in source.parents:
                raise FetchError(f"{uri}: path escapes the claim")
            stream = source.open("rb")
        elif uri.startswith(("https://", "http://")):
            stream = urllib.request.urlopen(uri, timeout=timeout_s)
        else:
            raise FetchError(f"{uri}: expected pvc:// or https://")
        with stream as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: {exc}") from None
    actual = digest.hexdigest()
    if sha256 and actual != sha256:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: sha256 expected {sha256}, actual {actual}")
    shutil.move(tmp, out)
    return actual


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m amp4ec.operator.fetch", description=__doc__)
    p.add_argument("--uri", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sha256")
    a = p.parse_args(argv)
    try:
        print(f"{fetch(a.uri, a.out, a.sha256)}  {a.out}")
    except FetchError as exc:
        print(f"storage initializer: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
