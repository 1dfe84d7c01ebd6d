"""The node agent's monitor role: export node capacity and link metrics; ``Monitor.Profile``.

One monitor runs per node (a DaemonSet in a cluster). It exports only what no standard
exporter gives (speed on the reference workload, the CPU share a shard gets, link RTT and
bandwidth to its peers) as Prometheus gauges (``metrics.py``), refreshed every ``interval`` seconds. It
profiles no model (``MonitorServicer(models=False)`` refuses): the operator learns block costs
without importing torch from a profiler (``profiler.py``, where ``MonitorServicer`` lives), a
short-lived Pod in the deployment's namespace that serves it with models.

[Note: capacity override] ``override`` names a JSON file re-read on every refresh whose keys
(``cpu_limit``, ``workload_ms``, ``request_overhead_ms``, ``memory_available_bytes``) replace
the measured values. It lets an operator drain or slow a node by hand and lets tests change
capacity for real, through the same metrics and Prometheus path a cluster uses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.node_agent import metrics
from amp4ec.node_agent.calibrate import request_overhead_ms
from amp4ec.node_agent.capacity import node_memory_available_bytes
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.model_cache_server import CacheOptions
from amp4ec.node_agent.profiler import MonitorServicer
from amp4ec.node_agent.server import AgentServer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.slicing.profile import reference_workload_ms
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["Monitor"]

log = logging.getLogger(__name__)

_PROBE_BYTES = 1 << 20


@dataclass
class Monitor:
    """Refreshes this node's capacity gauges and probes its peers every ``interval`` seconds."""

    settings: AgentSettings
    cpu_limit: float
    interval: float = 10.0
    """Seconds between refreshes; Prometheus scrapes whatever the last refresh set."""
    peers: Mapping[str, str] = field(default_factory=dict)
    """Peer node name → gRPC address of its monitor, for link RTT/bandwidth probes."""
    override: Path | None = None
    """JSON file whose keys replace measured values (see the module's note)."""
    model_cache: CacheOptions | None = None
    """The node-wide model cache this monitor keeps (``model_cache_server``); None keeps none."""
    _workload_ms: float | None = None
    overhead_ms: float = 0.0
    """The agent's per-request CPU overhead; ``run`` measures it once before refreshing."""
    _task: asyncio.Task[None] | None = None

    def refresh(self) -> dict[str, float]:
        """Measure (the reference workload only once) and set the gauges; returns what was set."""
        if self._workload_ms is None:
            self._workload_ms = reference_workload_ms(self.cpu_limit)
        values = {
            "cpu_limit": self.cpu_limit,
            "workload_ms": self._workload_ms,
            "request_overhead_ms": self.overhead_ms,
            "memory_available_bytes": float(self.settings.memory_bytes or node_memory_available_bytes()),
        }
        if self.override is not None and self.override.exists():
            try:
                values.update({k: float(v) for k, v in json.loads(self.override.read_text()).items()})
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring capacity override %s: %s", self.override, exc)
        node = self.settings.node
        metrics.NODE_CPU_LIMIT.labels(node).set(values["cpu_limit"])
        metrics.NODE_WORKLOAD.labels(node).set(values["workload_ms"])
        metrics.NODE_OVERHEAD.labels(node).set(values["request_overhead_ms"])
        metrics.NODE_MEMORY.labels(node).set(values["memory_available_bytes"])
        return values

    async def probe(self, peer: str, target: str) -> None:
        """RTT from the median of small echoes, bandwidth from one large echo each way."""
        # A peer's control port; monitors may call only Echo there (node_agent/authz.py).
        async with transport.channel(
            target,
            self.settings.security.refreshed(),  # a renewed leaf on disk (transport.py's Note)
            expect_identity=pki.MONITOR,
            options=self.settings.grpc_options(),
        ) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            rtts = []
            for _ in range(3):
                t0 = time.perf_counter()
                await stub.Echo(agent_pb2.Probe(payload=b"", reply_bytes=0), timeout=5)
                rtts.append(time.perf_counter() - t0)
            rtt = statistics.median(rtts)
            t0 = time.perf_counter()
            await stub.Echo(
                agent_pb2.Probe(payload=bytes(_PROBE_BYTES), reply_bytes=_PROBE_BYTES), timeout=30
            )
            elapsed = max(time.perf_counter() - t0 - rtt, 1e-6)
        metrics.LINK_RTT.labels(self.settings.node, peer).set(rtt)
        metrics.LINK_BANDWIDTH.labels(self.settings.node, peer).set(2 * _PROBE_BYTES / elapsed)

    async def run(self) -> None:
        try:
            self.overhead_ms = await request_overhead_ms(self.settings)
        except Exception:
            log.exception("request overhead calibration failed; reporting 0")
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("capacity refresh failed")
            for peer, target in self.peers.items():
                try:
                    await self.probe(peer, target)
                except grpc.aio.AioRpcError as exc:
                    log.info("link probe %s → %s failed: %s", self.settings.node, peer, exc.code().name)
            await asyncio.sleep(self.interval)

    def start(self, agent: AgentServer) -> None:
        """Register ``Monitor`` on the (not yet started) control server and start refreshing."""
        if agent.control is None:
            raise InvalidSpec("--control-port: the monitor role serves Monitor.Profile on the control port")
        servicer = MonitorServicer(self.settings, models=False)  # see REFUSED
        add_servicer(agent_pb2_grpc.add_MonitorServicer_to_server, servicer, agent.control)
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
