"""AgentSettings: one typed settings object per node agent process, built once at the edge."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AgentSettings"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class AgentSettings:
    """How a node agent serves; every field documented with its unit and why it defaults so."""

    node: str = "node"
    """Name the planner knows this node by (the Kubernetes node name in a cluster)."""
    host: str = "127.0.0.1"
    """Address to bind. 127.0.0.1 in local mode; ``[::]`` in a Pod so peers can reach it."""
    port: int = 0
    """gRPC port; 0 picks a free one (tests and local mode read it back)."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint; None serves none."""
    cpu_limit: float | None = None
    """CPU limit in cores when it cannot be read from the cgroup (None = detect)."""
    emulate_cpu: bool = False
    """Emulate ``cpu_limit`` by idling after each forward (duty cycle) where no cgroup quota
    can be set. Honest for throughput, coarser than a quota for latency; the runner says
    which one it used."""
    threads: int | None = None
    """torch intra-op threads; None = floor(cpu_limit), at least 1. One thread under a
    fractional quota: more threads only burn the quota on synchronisation."""
    workers: int = 1
    """Forward threads running requests side by side. One keeps arrival order and suits a
    share of one core or less; a node of several cores serving a whole small model at batch
    1 uses them better with a worker per core than with intra-op threads."""
    window: int = 16
    """Requests one inbound stream may have in this stage and beyond it at once. When it is
    full the agent stops reading the stream, and gRPC flow control pushes back upstream."""
    max_message_bytes: int = 256 * MiB
    """gRPC send/receive limit on both ends; an activation larger than this is refused."""
    grace_s: float = 5.0
    """Seconds in-flight requests get to finish on SIGTERM before the server stops."""
    memory_bytes: int | None = None
    """Memory available to shards, reported to the planner (None = read from the cgroup
    limit or the machine's available memory)."""

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
