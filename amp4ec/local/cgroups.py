"""Per-node CPU (and memory) limits for local agent processes, with cgroup v1 where permitted.

[Note: why cgroup v1 and a 100 ms period] The paper's nodes are Docker containers with
``--cpus``, which is a CFS quota over a 100 ms period: the same mechanism, so a 0.4-CPU
node here behaves like the paper's 0.4-CPU container (bursts of 40 ms per 100 ms).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["NodeCgroup", "cgroups_available", "remove_stale"]

_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


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

    def __init__(self, name: str, cpu: float, memory_bytes: int | None = None) -> None:
        self.name = name
        self.dirs: list[Path] = []
        cpu_dir = _own_path("cpu") / name
        cpu_dir.mkdir(exist_ok=True)
        self.dirs.append(cpu_dir)
        (cpu_dir / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (cpu_dir / "cpu.cfs_quota_us").write_text(str(max(1000, round(cpu * PERIOD_US))))
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
