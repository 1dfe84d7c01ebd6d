"""What this node offers: CPU limit and memory from the cgroup, speed from a fixed workload, load."""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = [
    "LoadMeter",
    "cgroup_cpu_limit",
    "memory_available_bytes",
    "node_memory_available_bytes",
]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup(controller: str) -> Path | None:
    """This process's cgroup v1 directory for ``controller``, or the v2 one ("")."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return _CGROUP_ROOT / controller / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return _CGROUP_ROOT / line[3:].lstrip("/")
    return None


def cgroup_cpu_limit() -> float:
    """CPU cores this process may use: the cgroup quota when one is set, else the core count."""
    cores = float(len(os.sched_getaffinity(0)))
    group = _own_cgroup("cpu")
    if group is None:
        return cores
    try:
        if (group / "cpu.cfs_quota_us").exists():
            quota = int((group / "cpu.cfs_quota_us").read_text())
            period = int((group / "cpu.cfs_period_us").read_text())
        else:  # cgroup v2: "max 100000" or "40000 100000"
            q, p = (group / "cpu.max").read_text().split()
            quota, period = (-1 if q == "max" else int(q)), int(p)
    except (OSError, ValueError):
        return cores
    return cores if quota <= 0 else min(cores, quota / period)


def node_memory_available_bytes() -> int:
    """The node's MemAvailable, whatever this process's own cgroup allows (the monitor role's
    figure: its memory limit bounds the monitor, not what a shard on the node may use)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_available_bytes() -> int:
    """Memory still available to this process: the cgroup limit's headroom or MemAvailable."""
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    group = _own_cgroup("memory")
    if group is not None and (group / "memory.limit_in_bytes").exists():
        try:
            limit = int((group / "memory.limit_in_bytes").read_text())
            usage = int((group / "memory.usage_in_bytes").read_text())
            if limit < (1 << 60):
                available = min(available or limit, limit - usage)
        except (OSError, ValueError):
            pass
    return max(available, 0)


class LoadMeter:
    """CPU utilisation of this process since the last reading, as a fraction of its limit."""

    def __init__(self, cpu_limit: float) -> None:
        self._limit = max(cpu_limit, 1e-6)
        self._last = (time.monotonic(), time.process_time())

    def read(self) -> float:
        now = (time.monotonic(), time.process_time())
        wall, cpu = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return 0.0 if wall <= 0 else min(1.0, cpu / wall / self._limit)
