"""glibc heap settings for processes that run forwards: keep activation memory, free it on demand.

[Note: activation page faults] With glibc's defaults a forward's large activations (a
MobileNetV2 layer at batch 1 is up to 4.8 MB) are mmapped and unmapped, or trimmed off the
heap top, on every request, so every request faults its activations back in: ~2,500 minor
faults, which cost a third of MobileNetV2's forward time (22 ms instead of 16 ms on one
core). Fixing the mmap threshold at its 32 MiB ceiling and the trim threshold above it keeps
those pages between requests; ``release_memory`` still hands the heap back explicitly when a
stage is swapped, so a node's memory limit holds only what the planner counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

__all__ = ["keep_activation_memory", "release_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest allowed mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)."""
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""What glibc itself would pick (twice the mmap threshold) after freeing a chunk that large."""


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


def keep_activation_memory() -> bool:
    """Stop glibc returning activation memory between requests; True when the settings took."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_memory() -> None:
    """Collect garbage (fx graphs sit in reference cycles) and hand freed heap back to the OS.

    [Note: malloc_trim] glibc keeps freed heap pages (all the more with
    ``keep_activation_memory``), so without a trim an agent that swapped stages keeps the old
    one's memory resident and a cgroup memory limit kills it for memory it no longer uses.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
