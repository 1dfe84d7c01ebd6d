"""Per-node CPU (and memory) limits for local agent processes, with cgroup v1 where permitted.

[Note: why cgroup v1 and a 100 ms period] The paper's nodes are Docker containers with
``--cpus``, which is a CFS quota over a 100 ms period: the same mechanism, so a 0.4-CPU
node here behaves like the paper's 0.4-CPU container (bursts of 40 ms per 100 ms).

[Note: why a short CFS period] A 100 ms period is honest about throughput but not about one
request: a 0.4-CPU node runs a 20 ms forward at full speed while its 40 ms quota lasts, so
an idle slow node looks as fast as a full core. Measured on this machine, a 20 ms
single-core job in a 0.4-CPU cgroup took 26-40 ms with a 100 ms period and 46-51 ms with a
5 ms period (a real slow device is slow on every request: 50 ms). Local mode and the bench
therefore default to a 5 ms period (``--cfs-period short``); ``--cfs-period docker`` restores
the paper's 100 ms. Shorter periods cost scheduler overhead; the kernel allows 1 ms and up.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from amp4ec.nodes import CFS_PERIODS, DEFAULT_CFS_PERIOD

__all__ = ["PERIOD_US", "NodeCgroup", "cgroups_available", "effective_period_us", "remove_stale"]

_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = CFS_PERIODS[DEFAULT_CFS_PERIOD]
_MIN_QUOTA_US = 1000


def effective_period_us(cpu: float, period_us: int) -> int:
    """``period_us``, lengthened where ``cpu`` would get a quota under the kernel's 1 ms minimum
    (a 0.1-CPU node under a 5 ms period runs on a 10 ms one); at most the kernel's 1 s."""
    return min(1_000_000, max(period_us, math.ceil(_MIN_QUOTA_US / cpu)))


def _own_path(controller: str) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return _ROOT / controller / path.lstrip("/")
    raise OSError(f"no cgroup v1 {controller} controller mounted")


def cgroups_available() -> bool:
    """True when this process may create cgroup v1 CPU quotas (root with the cpu controller)."""
    try:
        parent = _own_path("cpu")
    except OSError:
        return False
    return (parent / "cpu.cfs_quota_us").exists() and os.access(parent, os.W_OK)


class NodeCgroup:
    """One node's cgroups (cpu, and memory when a limit is given), created on demand."""

    def __init__(
        self, name: str, cpu: float, memory_bytes: int | None = None, period_us: int = PERIOD_US
    ) -> None:
        self.name = name
        self.dirs: list[Path] = []
        cpu_dir = _own_path("cpu") / name
        cpu_dir.mkdir(exist_ok=True)
        self.dirs.append(cpu_dir)
        self.period_us = effective_period_us(cpu, period_us)
        (cpu_dir / "cpu.cfs_period_us").write_text(str(self.period_us))
        (cpu_dir / "cpu.cfs_quota_us").write_text(str(round(cpu * self.period_us)))
        if memory_bytes:
            mem_dir = _own_path("memory") / name
            mem_dir.mkdir(exist_ok=True)
            self.dirs.append(mem_dir)
            (mem_dir / "memory.limit_in_bytes").write_text(str(memory_bytes))

    def add(self, pid: int) -> None:
        """Move process ``pid`` into these cgroups (right after starting it: see
        [Note: no preexec_fn] in ``amp4ec.children``)."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    @property
    def _memory_dir(self) -> Path | None:
        return next((d for d in self.dirs if (d / "memory.stat").exists()), None)

    def resident_bytes(self) -> int | None:
        """What the node's processes hold as its memory cgroup counts it (anonymous memory and
        mapped files); None without a memory limit."""
        d = self._memory_dir
        if d is None:
            return None
        fields = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
        return sum(int(fields.get(f"total_{k}", fields.get(k, "0"))) for k in ("rss", "mapped_file"))

    def set_memory_limit(self, limit_bytes: int) -> None:
        d = self._memory_dir
        if d is None:
            raise ValueError(f"cgroup {self.name} has no memory limit to change")
        (d / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this node's memory cgroup (0: none or unknown)."""
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                for line in (d / "memory.oom_control").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def remove(self) -> None:
        """Remove the cgroups; their processes must have exited."""
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


def remove_stale(prefix: str) -> None:
    """Remove empty cgroups left by an earlier run that was killed before it could clean up."""
    for controller in ("cpu", "memory"):
        with contextlib.suppress(OSError):
            for d in _own_path(controller).glob(f"{prefix}*"):
                pid = d.name.split("-")[1] if d.name.count("-") >= 2 else ""
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    with contextlib.suppress(OSError):
                        d.rmdir()
