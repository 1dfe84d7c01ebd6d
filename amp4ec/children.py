"""Helper processes (local agents, link proxies) that die with the process that started them.

[Note: no preexec_fn] A child started with ``preexec_fn`` is forked, and the fork runs
gRPC's at-fork handlers: with grpcio ≥ 1.81 they restart a poller thread in the child,
which aborts on EBADF once ``close_fds`` closes its epoll descriptor (grpc/grpc#43055), so a
parent holding gRPC channels loses children at random. Without ``preexec_fn`` CPython starts
the child with vfork, which runs no at-fork handlers. What ``preexec_fn`` did moves into the
child itself (``die_with_parent``, first thing in its ``main``) or to the parent after the
start (writing the child's pid into its cgroups).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Mapping

__all__ = ["PARENT_ENV", "child_env", "die_with_parent"]

PARENT_ENV = "AMP4EC_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must not outlive this process."""
    return {**(os.environ if base is None else base), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """In a child started with ``child_env``: ask the kernel for SIGTERM when the parent dies
    (Linux prctl), and exit now if it already has. Does nothing outside such a child."""
    parent = os.environ.get(PARENT_ENV, "")
    if not parent.isdigit():
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the request took effect
        sys.exit(1)
