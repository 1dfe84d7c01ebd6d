"""The node agent's monitor role: export node capacity and link metrics; ``Monitor.Profile``.

One monitor runs per node (a DaemonSet in a cluster). It exports only what no standard
exporter gives (speed on the reference workload, the CPU share a shard gets, link RTT and
bandwidth to its peers) as Prometheus gauges, refreshed every ``interval`` seconds. It
profiles no model (``MonitorServicer(models=False)`` refuses): the operator learns block costs
without importing torch from a profiler (``profiler.py``), a short-lived Pod in the deployment's
namespace that serves ``MonitorServicer`` with models.

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
from prometheus_client import Gauge

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.node_agent.calibrate import request_overhead_ms
from amp4ec.node_agent.capacity import node_memory_available_bytes
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.limits import check_profile
from amp4ec.node_agent.server import AgentServer
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.node_agent.status import status_of
from amp4ec.slicing.profile import reference_workload_ms
from amp4ec.wire import codec, transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = [
    "CPU_LIMIT",
    "LINK_BANDWIDTH",
    "LINK_RTT",
    "MEMORY",
    "OVERHEAD",
    "REFUSED",
    "WORKLOAD",
    "Monitor",
    "MonitorServicer",
]

log = logging.getLogger(__name__)

CPU_LIMIT = Gauge("amp4ec_node_cpu_limit_cores", "CPU cores a shard on this node may use.", ["node"])
WORKLOAD = Gauge(
    "amp4ec_node_workload_ms",
    "Milliseconds this node takes for amp4ec's fixed reference workload on one thread (lower is faster).",
    ["node"],
)
OVERHEAD = Gauge(
    "amp4ec_node_request_overhead_ms",
    "CPU milliseconds one request costs a stage on this node beyond its blocks (gRPC, codec, relaying).",
    ["node"],
)
MEMORY = Gauge("amp4ec_node_memory_available_bytes", "Memory a shard may still use on this node.", ["node"])
LINK_RTT = Gauge("amp4ec_link_rtt_seconds", "Round-trip time of a small gRPC echo to a peer.", ["src", "dst"])
LINK_BANDWIDTH = Gauge(
    "amp4ec_link_bandwidth_bytes_per_second",
    "Bytes per second of a large gRPC echo to a peer.",
    ["src", "dst"],
)

_PROBE_BYTES = 1 << 20


REFUSED = (
    "this monitor profiles no model: a cluster-wide component never loads a user's model; the "
    "operator profiles each model in its deployment's namespace (a profiler Pod, python -m "
    "amp4ec.node_agent --profiler)"
)


class MonitorServicer(agent_pb2_grpc.MonitorServicer):
    """``Monitor.Profile``: load, split and time a model; one profile per spec is cached.

    ``models=False`` (the cluster-wide monitor role) checks a request's bounds and then refuses
    it (PERMISSION_DENIED): only a profiler (``--profiler``, one short-lived Pod in the
    deployment's namespace, with that deployment's identity and limits) loads a model."""

    def __init__(
        self, settings: AgentSettings, models: bool = True, only: agent_pb2.StageSpec | None = None
    ) -> None:
        """``only``: the one model this servicer profiles (a profiler Pod's own arguments); a
        request then names it or nothing, and cannot make the process load anything else."""
        self._settings = settings
        self._models = models
        self._only = only
        self._cache: dict[bytes, agent_pb2.ModelProfile] = {}
        self._lock = asyncio.Lock()

    async def Profile(
        self, request: agent_pb2.ProfileRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ModelProfile:
        if self._only is not None:
            if request.model.model not in ("", self._only.model):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"model.model: this profiler profiles only its own model {self._only.model!r}",
                )
            request = agent_pb2.ProfileRequest(
                model=self._only,
                repeats=request.repeats,
                codecs=request.codecs,
                batch_sizes=request.batch_sizes,
            )
        try:
            check_profile(request, self._settings)
        except InvalidSpec as exc:
            await context.abort(*status_of(exc))
        if not self._models:
            log.warning("refused Monitor.Profile(%r): %s", request.model.model[:200], REFUSED)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, REFUSED)
        key = request.SerializeToString(deterministic=True)
        async with self._lock:  # one profile at a time: profiling owns the reference core
            if key not in self._cache:
                try:
                    self._cache[key] = await asyncio.to_thread(profile_model, request)
                except Exception as exc:
                    if _out_of_memory(exc):  # the profiler's own limit, not the model's fault
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory while profiling: {exc}"
                        )
                    await context.abort(*status_of(exc))
                    raise  # unreachable: abort raises
            return self._cache[key]


def _out_of_memory(exc: BaseException | None) -> bool:
    """A MemoryError anywhere in the chain (slicing wraps what it catches into InvalidSpec)."""
    seen = 0
    while exc is not None and seen < 16:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def profile_model(request: agent_pb2.ProfileRequest) -> agent_pb2.ModelProfile:
    """The torch side of ``Profile``: imported lazily so a bare monitor starts fast."""
    from amp4ec.slicing import ModelSource, chain_input_bytes, load_model, profile_chain, split_model

    spec = request.model
    source = ModelSource(
        spec.model, weights=spec.weights or None, seed=spec.seed, input_shape=tuple(spec.input_shape) or None
    )
    loaded = load_model(source)
    chain = split_model(loaded)
    profiles = profile_chain(chain, repeats=request.repeats or 5, batch_sizes=tuple(request.batch_sizes))
    codecs = ()
    if request.codecs:
        from amp4ec.slicing.compression import profile_codecs

        codecs = profile_codecs(chain, loaded.example_inputs)
    return agent_pb2.ModelProfile(
        model=spec.model,
        blocks=[
            agent_pb2.BlockProfile(
                name=p.name,
                flops=p.flops,
                param_bytes=p.param_bytes,
                out_bytes=p.out_bytes,
                compute_ms=p.compute_ms,
                act_bytes=p.act_bytes,
                batch_ms=[agent_pb2.BatchTime(batch=b, ms=ms) for b, ms in p.batch_ms],
                tile=None
                if p.tile is None
                else agent_pb2.TileRows(
                    in_height=p.tile.in_height,
                    out_height=p.tile.out_height,
                    lo=p.tile.lo,
                    hi=p.tile.hi,
                    codec_ns_per_byte=p.tile.codec_ns_per_byte,
                ),
            )
            for p in profiles
        ],
        input_bytes=chain_input_bytes(chain),
        reference_workload_ms=reference_workload_ms(),
        inputs=[codec.spec_of(t.dtype, tuple(t.shape)) for t in loaded.example_inputs],
        codecs=[
            agent_pb2.CodecProfile(
                name=c.name,
                wire_bytes=c.wire_bytes,
                encode_ms=c.encode_ms,
                decode_ms=c.decode_ms,
                error=c.error,
            )
            for c in codecs
        ],
    )


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
        CPU_LIMIT.labels(node).set(values["cpu_limit"])
        WORKLOAD.labels(node).set(values["workload_ms"])
        OVERHEAD.labels(node).set(values["request_overhead_ms"])
        MEMORY.labels(node).set(values["memory_available_bytes"])
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
        LINK_RTT.labels(self.settings.node, peer).set(rtt)
        LINK_BANDWIDTH.labels(self.settings.node, peer).set(2 * _PROBE_BYTES / elapsed)

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
