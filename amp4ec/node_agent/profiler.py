"""The profiler role: a node agent that serves ``Monitor.Profile`` and nothing else.

``python -m amp4ec.node_agent --profiler --model M [--seed S --input-shape …] --control-port P
--health-port H --tls-…`` is what the operator runs in a short-lived Pod in a deployment's
namespace, with that deployment's profiler identity (``profiler.<deployment>.<namespace>.amp4ec``),
a memory limit and a deadline: a user's model (an allowed factory, a ``.pt2`` archive from
storage, a zoo model at the user's input shape) is loaded only there, never in a cluster-wide
component (the monitors refuse, ``REFUSED``). It profiles only the model of its own
arguments: a request names that model or none, so nothing on the network can make it load
another. One server: mutual TLS, the operator's identity only (``authz``), no ``Shard`` and no
``NodeAgent`` service; a plaintext health-only port for the kubelet's probe.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from amp4ec.errors import InvalidSpec
from amp4ec.node_agent.authz import profiler_policy
from amp4ec.node_agent.decoding import add_servicer
from amp4ec.node_agent.limits import check_profile
from amp4ec.node_agent.settings import AgentSettings
from amp4ec.node_agent.status import status_of
from amp4ec.slicing.profile import reference_workload_ms
from amp4ec.wire import codec, transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = [
    "MONITOR_SERVICE",
    "REFUSED",
    "MonitorServicer",
    "ProfilerServer",
    "create_profiler",
    "profile_model",
]

log = logging.getLogger(__name__)

MONITOR_SERVICE = "amp4ec.wire.v1.Monitor"
"""The health service name a profiler reports SERVING once it takes Profile calls."""


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
                    fixed=p.tile.fixed,
                    overhead=p.tile.overhead,
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
class ProfilerServer:
    control: grpc.aio.Server
    control_port: int
    health: health.aio.HealthServicer
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    @property
    def servers(self) -> list[grpc.aio.Server]:
        return [s for s in (self.control, self.health_server) if s is not None]

    async def start(self) -> None:
        for s in self.servers:
            await s.start()
        await self.health.set(MONITOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        for s in self.servers:
            await s.stop(grace)


async def create_profiler(settings: AgentSettings, model: agent_pb2.StageSpec) -> ProfilerServer:
    """Bind the profiler's control port (``settings.control_port``; 0 = any) and health port;
    ``model`` is the one model it profiles."""
    if settings.control_port is None:
        raise ValueError("--control-port: the profiler serves Monitor.Profile on the control port")
    security = settings.security
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(MONITOR_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    # One Profile at a time (MonitorServicer's lock); a few calls at once are plenty.
    control = transport.server(
        security, profiler_policy, settings.server_options(), maximum_concurrent_rpcs=8
    )
    add_servicer(agent_pb2_grpc.add_MonitorServicer_to_server, MonitorServicer(settings, only=model), control)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, control)
    port = transport.add_port(control, f"{settings.host}:{settings.control_port}", security)
    server = ProfilerServer(control, port, health_servicer)
    if settings.health_port is not None:
        plain = transport.TransportSecurity.plaintext()
        server.health_server = transport.server(plain, None)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server.health_server)
        address = f"{settings.host}:{settings.health_port}"
        server.health_port = transport.add_port(server.health_server, address, plain)
    return server
