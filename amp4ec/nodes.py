"""Nodes as the command line gives them (``1.0,0.6:512M``) for local mode and the bench: parsed
without torch or gRPC, so a bad ``--nodes`` is refused before anything heavy runs.

[Note: agent baseline] A node's memory limit covers its agent process, not only the shard.
Measured under a cgroup v1 memory limit (torch 2.13 CPU, 10 requests through one stage): an
agent holds 220 MiB before its stage's parameters (Python, torch, gRPC, the model traced on
the meta device), and its forwards add 26-36 MiB more that stays (oneDNN workspace, the
activation heap kept between requests: ``amp4ec.allocator``) — MobileNetV2 whole 266 MiB,
ResNet-50 blocks 11..17 (50 MiB of parameters) 307 MiB, ViT-B/16 blocks 0..4 (84 MiB) 337
MiB; its VmRSS, shared libraries included, reads 335-350 MB. ``AGENT_BASELINE_BYTES`` covers
those 250 MiB plus in-flight frames; the planner is offered the limit less it, so
``amp4ec plan`` refuses what ``amp4ec run`` would run out of memory on (MobileNetV2 whole:
killed at a 256 MiB limit, served at 288 MiB; the plan now asks it for 303 MiB).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from amp4ec.errors import InvalidSpec

__all__ = [
    "AGENT_BASELINE_BYTES",
    "CFS_PERIODS",
    "DEFAULT_CFS_PERIOD",
    "FaultSpec",
    "NodeSpec",
    "check_faults",
    "check_node_count",
    "mib",
    "parse_bytes",
    "parse_cfs_period",
    "parse_fault",
    "parse_nodes",
    "usable_memory",
]

AGENT_BASELINE_BYTES = 288 * 2**20
"""Memory a node agent needs before its shard: see [Note: agent baseline]."""


CFS_PERIODS = {"short": 5_000, "docker": 100_000}
"""Named CFS periods in microseconds: see [Note: why a short CFS period] in ``amp4ec.local.cgroups``."""
DEFAULT_CFS_PERIOD = "short"


def parse_cfs_period(text: str) -> int:
    """``--cfs-period``: ``short`` (5 ms), ``docker`` (100 ms, Docker's ``--cpus``) or a number of
    milliseconds (1 to 1000, the kernel's bounds) → microseconds."""
    t = text.strip().lower()
    if t in CFS_PERIODS:
        return CFS_PERIODS[t]
    try:
        ms = float(t.removesuffix("ms"))
    except ValueError:
        ms = float("nan")
    if not 1 <= ms <= 1000:
        raise InvalidSpec(
            "--cfs-period: expected short, docker or milliseconds between 1 and 1000 (e.g. 5ms), "
            f"got {text!r}"
        )
    return round(ms * 1000)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: float
    """CPU limit in cores."""
    memory_bytes: int | None = None
    """Memory limit (enforced by cgroup where possible); None = unlimited."""
    threads: int | None = None
    """torch intra-op threads of its agent; None = the agent's default (floor of the share)."""
    workers: int = 1
    """Forward threads of its agent (requests served side by side)."""


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "KI": 1024, "MI": 1024**2, "GI": 1024**3}


def mib(nbytes: float) -> str:
    """Bytes as MiB, the unit ``--nodes`` memory is given in (``M`` = MiB)."""
    return f"{nbytes / 2**20:.0f} MiB"


def parse_bytes(text: str, field: str) -> int:
    """``512M``, ``1G``, ``1.5Gi`` or plain bytes → bytes (K, M, G are binary: M = MiB)."""
    t = text.strip().upper().removesuffix("B")
    number = t.rstrip("KMGI")
    unit = t[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise InvalidSpec(f"{field}: expected a size such as 512M or 1G, got {text!r}") from None
    if not value > 0:
        raise InvalidSpec(f"{field}: expected a size > 0, got {text!r}")
    return int(value)


def usable_memory(node: NodeSpec) -> int | None:
    """What a shard on ``node`` may use: its limit less its agent's baseline (None: unlimited)."""
    return None if node.memory_bytes is None else node.memory_bytes - AGENT_BASELINE_BYTES


def parse_nodes(text: str) -> list[NodeSpec]:
    """``"1.0,0.6:512M,0.4:512M"`` → nodes node0..node2 with those CPU shares (and memory limits)."""
    nodes = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        share, _, memory = part.partition(":")
        try:
            cpu = float(share)
        except ValueError:
            raise InvalidSpec(f"--nodes[{i}]: expected a CPU share such as 0.4, got {part!r}") from None
        if not 0 < cpu < float("inf"):
            raise InvalidSpec(f"--nodes[{i}]: expected a CPU share > 0, got {part!r}")
        mem = parse_bytes(memory, f"--nodes[{i}] memory") if memory else None
        if mem is not None and mem <= AGENT_BASELINE_BYTES:
            raise InvalidSpec(
                f"--nodes[{i}] memory: {mib(mem)} leaves nothing for a shard: the node agent itself "
                f"needs about {mib(AGENT_BASELINE_BYTES)} (Python, torch, gRPC); give more, e.g. "
                f"{share}:512M"
            )
        nodes.append(NodeSpec(f"node{i}", cpu, mem))
    if not nodes:
        raise InvalidSpec("--nodes: expected at least one CPU share, e.g. 1.0,0.6,0.4")
    return nodes


def check_node_count(nodes: int, blocks: int, model: str) -> None:
    """At most one node per block, in ``plan`` and ``run`` alike: a stage holds at least one
    block, so a split can use no more nodes than there are blocks; the rest could only hold
    whole replicas, which local mode would pay for with one agent process each."""
    if nodes > blocks:
        raise InvalidSpec(
            f"--nodes: {nodes} nodes but {model} has only {blocks} blocks; give at most {blocks} "
            "(a stage holds at least one block, so a split uses at most one node per block)"
        )


@dataclass(frozen=True)
class FaultSpec:
    node: str
    kind: str
    """``kill`` (SIGKILL) or ``hang`` (SIGSTOP)."""
    at_s: float
    """Seconds after the measured requests start."""

    def __str__(self) -> str:
        return f"{self.node}:{self.kind}@{self.at_s:g}s"


_FAULT = re.compile(r"^(?P<node>[\w.-]+):(?P<kind>kill|hang)@(?P<at>\d+(\.\d*)?)s?$")


def parse_fault(text: str) -> FaultSpec:
    """``node1:kill@5s`` or ``node2:hang@2.5`` → FaultSpec."""
    m = _FAULT.match(text.strip())
    if not m:
        raise InvalidSpec(
            f"--fault: expected NODE:kill@SECONDS or NODE:hang@SECONDS, e.g. node1:kill@5s, got {text!r}"
        )
    return FaultSpec(m["node"], m["kind"], float(m["at"]))


def check_faults(faults: Sequence[FaultSpec], nodes: Sequence[NodeSpec]) -> None:
    """Every ``--fault`` names one of the nodes."""
    names = [n.name for n in nodes]
    for f in faults:
        if f.node not in names:
            raise InvalidSpec(f"--fault {f}: no node {f.node!r}; the nodes are {', '.join(names)}")
