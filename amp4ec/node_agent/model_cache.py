"""The monitor's node-wide model cache on disk: one verified file per (namespace, sha256), LRU-bounded.

Layout: ``<root>/<namespace>/<sha256>``. An entry is written only by ``seal`` and ``commit``: the upload goes
to a temporary file in ``<root>/.partial`` (the same filesystem) and is renamed into place only
when every byte announced arrived and their SHA-256 is the entry's name, so a reader never sees
half a file or a file under another's digest. ``root`` is the node's hostPath (the chart's
``monitor.modelCache``); a restarted monitor indexes what is there (least recently used first,
by modification time, which every hit refreshes) and deletes what an interrupted upload left.

Entries are keyed by (namespace, sha256), never by digest alone: the namespace comes from the
caller's certificate (``authz.cache_namespace``), so a namespace that learns another's digest
still misses.

[Note: one fill per key] The first caller that misses a key holds its fill (``begin``) until it
uploads the file or goes away (``release``); callers of the same key meanwhile wait on
``Fill.done`` and then read the entry, or take over the fill when it failed. So shards of one
node that start together fetch from the store once. Room for an upload is reserved when its size
is announced (``offer``), evicting least recently used entries; an entry being read may be
evicted (its reader keeps the open file), so eviction never waits for a Pod.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["Fill", "Key", "ModelCache", "NoRoom", "UploadRefused"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(namespace, sha256)."""
SHA256 = re.compile(r"[0-9a-f]{64}")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PARTIAL = ".partial"


class UploadRefused(Exception):
    """The upload cannot become an entry; the message names the field at fault."""


class NoRoom(UploadRefused):
    """The upload does not fit: larger than the cache, or the room is reserved by other uploads."""


@dataclass(eq=False)
class Fill:
    """One caller's fill of a missing key: its upload, once it announced the size."""

    key: Key
    done: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the fill ends, stored or not: waiters then look again."""
    size: int = 0
    received: int = 0
    file: IO[bytes] | None = None
    tmp: Path | None = None
    """The upload's temporary file in ``<root>/.partial``."""
    digest: Any = field(default_factory=hashlib.sha256)


class ModelCache:
    """Entries under ``root``, at most ``max_bytes`` of them together (see the module's docstring)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"--model-cache-size: expected a positive size, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, int] = OrderedDict()
        """Key → size in bytes, least recently used first."""
        self._fills: dict[Key, Fill] = {}
        self._reserved = 0
        partial = root / _PARTIAL
        partial.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in partial.iterdir():  # an upload a crash or restart interrupted
            leftover.unlink(missing_ok=True)
        found = [
            (path.stat().st_mtime_ns, (ns.name, path.name), path.stat().st_size)
            for ns in root.iterdir()
            if ns.is_dir() and _NAMESPACE.fullmatch(ns.name)
            for path in ns.iterdir()
            if SHA256.fullmatch(path.name) and path.is_file()
        ]
        for _, key, size in sorted(found):
            self._entries[key] = size
        self._evict(0)  # a smaller bound than the last run's
        log.info("model cache %s: %d entries, %d of %d bytes", root, len(self._entries), self.used, max_bytes)

    @property
    def used(self) -> int:
        return sum(self._entries.values())

    def path(self, key: Key) -> Path:
        return self.root / key[0] / key[1]

    def keys(self) -> list[Key]:
        """The entries, least recently used first."""
        return list(self._entries)

    def open(self, key: Key) -> tuple[IO[bytes], int] | None:
        """The entry's file, open for reading, and its size (it is now the most recently used);
        None on a miss."""
        if key not in self._entries:
            return None
        path = self.path(key)
        try:
            f = path.open("rb")
        except FileNotFoundError:  # removed behind the monitor's back
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        os.utime(path)  # the order a restarted monitor reads back
        return f, os.fstat(f.fileno()).st_size

    def drop(self, key: Key, reader: IO[bytes]) -> None:
        """Remove the entry ``reader`` read (its bytes no longer match its name), unless a new
        file replaced it meanwhile."""
        path = self.path(key)
        try:
            if os.stat(path).st_ino == os.fstat(reader.fileno()).st_ino:
                path.unlink()
                self._entries.pop(key, None)
        except FileNotFoundError:
            self._entries.pop(key, None)

    def filling(self, key: Key) -> Fill | None:
        """The fill in progress for ``key``, if a caller holds one."""
        return self._fills.get(key)

    def begin(self, key: Key) -> Fill:
        """Hold the fill of a missing key (see [Note: one fill per key]); ``release`` ends it."""
        assert key not in self._fills and key not in self._entries
        fill = self._fills[key] = Fill(key)
        return fill

    def offer(self, fill: Fill, size: int) -> None:
        """Reserve room for ``size`` bytes (evicting least recently used entries) and open the
        upload's temporary file; NoRoom when it cannot fit."""
        if fill.file is not None:
            raise UploadRefused("size: announced twice")
        if size <= 0:
            raise UploadRefused(f"size: expected a positive number of bytes, got {size}")
        if size > self.max_bytes:
            raise NoRoom(f"size: {size} bytes is more than the whole cache ({self.max_bytes} bytes)")
        self._evict(size)
        if self.used + self._reserved + size > self.max_bytes:
            raise NoRoom(f"size: no room for {size} bytes while other uploads hold {self._reserved}")
        self._reserved += size
        fill.size = size
        fd, name = tempfile.mkstemp(dir=self.root / _PARTIAL)
        fill.file, fill.tmp = os.fdopen(fd, "wb"), Path(name)

    def write(self, fill: Fill, chunk: bytes) -> None:
        """Append ``chunk`` to the upload (blocking: run it off the event loop)."""
        if fill.file is None:
            raise UploadRefused("size: announce the file's size before its chunks")
        if fill.received + len(chunk) > fill.size:
            raise UploadRefused(f"chunk: more bytes than the {fill.size} announced")
        fill.file.write(chunk)
        fill.digest.update(chunk)
        fill.received += len(chunk)

    def seal(self, fill: Fill) -> None:
        """Check that the upload is complete and its SHA-256 is the key's, and put it on disk
        (blocking: run it off the event loop); ``commit`` then names it."""
        if fill.file is None:
            raise UploadRefused("size: nothing was uploaded")
        if fill.received != fill.size:
            raise UploadRefused(f"end: {fill.received} of the {fill.size} bytes announced arrived")
        actual = fill.digest.hexdigest()
        if actual != fill.key[1]:
            raise UploadRefused(f"sha256: the upload's is {actual}, not {fill.key[1]} it was offered under")
        fill.file.flush()
        os.fsync(fill.file.fileno())  # on disk before it has a name: a crash leaves no torn entry
        fill.file.close()

    def commit(self, fill: Fill) -> None:
        """Make the sealed upload the entry."""
        assert fill.tmp is not None and fill.file is not None and fill.file.closed
        target = self.path(fill.key)
        target.parent.mkdir(exist_ok=True, mode=0o700)
        os.replace(fill.tmp, target)
        fill.tmp = None
        self._entries[fill.key] = fill.size
        self._reserved -= fill.size
        log.info("model cache: stored %s/%s (%d bytes)", *fill.key, fill.size)
        fill.size = 0  # nothing reserved any more

    def release(self, fill: Fill) -> None:
        """End the fill, stored or not: drop a temporary file left and the room it reserved,
        and wake the callers waiting for it."""
        if fill.file is not None:
            fill.file.close()
        if fill.tmp is not None:
            fill.tmp.unlink(missing_ok=True)
        self._reserved -= fill.size
        fill.size = 0
        if self._fills.get(fill.key) is fill:
            del self._fills[fill.key]
        fill.done.set()

    def _evict(self, size: int) -> None:
        """Remove least recently used entries until ``size`` more bytes fit beside the reserved room."""
        while self._entries and self.used + self._reserved + size > self.max_bytes:
            key, _ = self._entries.popitem(last=False)
            self.path(key).unlink(missing_ok=True)
            log.info("model cache: evicted %s/%s", *key)
