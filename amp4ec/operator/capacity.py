"""Node capacity and links from Prometheus (PromQL over the HTTP API) → planner inputs.

Standard series answer first where they exist (kube-state-metrics' allocatable CPU,
node-exporter's MemAvailable with ``instance`` relabelled to the node name, as
kube-prometheus does); the monitor agent's ``amp4ec_*`` series fill in what no standard
exporter has: the CPU share a shard gets, speed on the reference workload, and links.

A node whose series are missing or older than ``max_age_s`` is reported in
``Capacity.missing``; an unreachable Prometheus raises ``CapacityUnavailable``. The caller
decides what that means for the current plan (keep it, say so in a condition).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from amp4ec.planner.types import Link, NodeCapacity, measured_node

__all__ = ["QUERIES", "Capacity", "CapacityUnavailable", "Prometheus"]

QUERIES: Mapping[str, str] = {
    # The shard's CPU share: the monitor's measured cgroup limit, else the node's allocatable cores.
    "cpu": (
        "max by (node) (amp4ec_node_cpu_limit_cores)"
        ' or max by (node) (kube_node_status_allocatable{resource="cpu",unit="core"})'
    ),
    "memory": (
        "max by (node) (amp4ec_node_memory_available_bytes)"
        ' or max by (node) (label_replace(node_memory_MemAvailable_bytes, "node", "$1", "instance", "(.+)"))'
    ),
    "workload_ms": "max by (node) (amp4ec_node_workload_ms)",
    "overhead_ms": "max by (node) (amp4ec_node_request_overhead_ms)",
    "age_s": "max by (node) (time() - timestamp(amp4ec_node_workload_ms))",
    "rtt_s": "max by (src, dst) (amp4ec_link_rtt_seconds)",
    "bandwidth": "max by (src, dst) (amp4ec_link_bandwidth_bytes_per_second)",
}
"""PromQL per quantity; every result is labelled by ``node`` (or ``src``/``dst`` for links)."""


class CapacityUnavailable(Exception):
    """Prometheus could not be queried (unreachable, timeout, or an error answer)."""


@dataclass(frozen=True)
class Capacity:
    """What Prometheus says about the nodes asked for."""

    nodes: dict[str, NodeCapacity] = field(default_factory=dict)
    """Nodes with fresh, complete metrics (speed is relative to ``reference_ms``)."""
    links: tuple[Link, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)
    """Node → why it was left out ("no metrics", "metrics 300 s old")."""


class Prometheus:
    """A PromQL client over aiohttp (one per operator, in memo)."""

    def __init__(self, url: str, timeout_s: float = 5.0, queries: Mapping[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._queries = dict(QUERIES, **(queries or {}))
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant vector query → (labels, value) pairs."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(f"{self.url}/api/v1/query", params={"query": promql}) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CapacityUnavailable(
                f"Prometheus at {self.url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(data, dict) or data.get("status") != "success":
            error = data.get("error") if isinstance(data, dict) else data
            raise CapacityUnavailable(f"Prometheus at {self.url} answered an error: {error}")
        result = data["data"]["result"]
        return [(r["metric"], float(r["value"][1])) for r in result]

    async def _by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        out = {}
        for labels, value in await self.query(self._queries[name]):
            if all(k in labels for k in keys) and math.isfinite(value):
                out[tuple(labels[k] for k in keys)] = value
        return out

    async def capacity(self, nodes: list[str], reference_ms: float, max_age_s: float) -> Capacity:
        """Capacity of ``nodes``; speed = ``reference_ms`` / the node's reference workload time."""
        cpu = await self._by("cpu", "node")
        memory = await self._by("memory", "node")
        workload = await self._by("workload_ms", "node")
        overhead = await self._by("overhead_ms", "node")
        age = await self._by("age_s", "node")
        rtt = await self._by("rtt_s", "src", "dst")
        bandwidth = await self._by("bandwidth", "src", "dst")
        found: dict[str, NodeCapacity] = {}
        missing: dict[str, str] = {}
        for node in nodes:
            key = (node,)
            if key not in cpu or key not in memory:
                missing[node] = "no capacity metrics"
                continue
            if key in age and age[key] > max_age_s:
                missing[node] = f"capacity metrics {age[key]:.0f} s old (max {max_age_s:g} s)"
                continue
            found[node] = measured_node(
                node,
                cpu=cpu[key],
                memory_bytes=memory[key],
                workload_ms=workload.get(key, 0.0),
                reference_ms=reference_ms,
                overhead_cpu_ms=overhead.get(key, 0.0),
            )
        links = tuple(
            Link(src, dst, rtt_ms=1000.0 * value, bandwidth_bytes_per_s=bandwidth[(src, dst)])
            for (src, dst), value in sorted(rtt.items())
            if src in found and dst in found and bandwidth.get((src, dst), 0) > 0
        )
        return Capacity(nodes=found, links=links, missing=missing)
