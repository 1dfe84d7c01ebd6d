"""What this node offers: CPU limit and memory from the cgroup, speed from a fixed workload, load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

__all__ = [
    "LoadMeter",
    "cgroup_cpu_limit",
    "memory_available_bytes",
    "node_memory_available_bytes",
    "reference_workload_ms",
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


def reference_workload_ms(cpu_limit: float | None = None, window_s: float = 0.5, windows: int = 2) -> float:
    """Milliseconds per unit of a fixed conv workload at the rate this process can sustain.

    [Note: CPU time, the fastest window] Each window measures the thread's CPU time per
    unit; the sustained wall time is that over ``min(cpu_limit, 1)``, the share of a core a
    CFS quota grants (one thread never uses more than one core). Wall time would be
    biased: a window gets whole quota bursts or misses them depending on where it falls in
    the 100 ms periods, and the fastest of several windows read ~10% high on a 0.3-CPU
    node. The fastest window still discards one that something else on the machine slowed
    down: capacity is what the node can do. ``cpu_limit`` None: an unconstrained process.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        conv = torch.nn.Conv2d(32, 32, 3, padding=1)
        x = torch.randn(1, 32, 28, 28)
        with torch.inference_mode():
            conv(x)
            for _ in range(windows):
                units, start, cpu = 0, time.perf_counter(), time.thread_time()
                while time.perf_counter() - start < window_s or units < 5:
                    conv(x)
                    units += 1
                best = min(best, 1000.0 * (time.thread_time() - cpu) / units)
    finally:
        torch.set_num_threads(previous)
    share = min(cpu_limit, 1.0) if cpu_limit is not None and cpu_limit > 0 else 1.0
    return best / share


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
