"""Block profiles of a model, asked of a monitor agent over gRPC (``Monitor.Profile``) and cached.

The operator never imports torch: the monitor (torch side) loads, splits and times the
model; the answer is cached per (model, seed, input shape), since block costs do not
change while a deployment lives. INVALID_ARGUMENT (unknown model, impossible shape)
becomes ``InvalidSpec``; anything transient becomes ``ProfilerUnavailable``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.operator.spec import DeploymentSpec
from amp4ec.planner.types import CodecProfile, LayerProfile
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["ModelCosts", "Profiler", "ProfilerUnavailable"]

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
}


class ProfilerUnavailable(Exception):
    """The monitor agent could not profile the model now (retry later)."""


@dataclass(frozen=True)
class ModelCosts:
    """A model's chain as the planner sees it."""

    blocks: tuple[LayerProfile, ...]
    input_bytes: int
    reference_ms: float
    """The profiling node's reference workload time: speed of a node = this / its own."""
    codecs: tuple[CodecProfile, ...] = ()
    """Each codec measured at every cut, when the deployment compresses (``auto``)."""


Key = tuple[str, int, tuple[int, ...], bool]


def _key(spec: DeploymentSpec) -> Key:
    return (spec.model.name or "", spec.model.seed, tuple(spec.input_shape or ()), spec.compression.enabled)


class Profiler:
    """Client of one monitor agent's ``Monitor.Profile``, with a per-model cache."""

    def __init__(self, target: str, security: transport.TransportSecurity, timeout_s: float = 120.0) -> None:
        """``security``: the operator's identity; the monitor must present ``monitor.amp4ec``."""
        self.target = target
        self._security = security
        self._timeout = timeout_s
        self._cache: dict[Key, ModelCosts] = {}
        self._failures: dict[Key, InvalidSpec] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        self._channel: grpc.aio.Channel | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def cached(self, spec: DeploymentSpec) -> ModelCosts | None:
        return self._cache.get(_key(spec))

    async def costs(self, spec: DeploymentSpec) -> ModelCosts:
        key = _key(spec)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one profile per model, however many deployments ask at once
            if key in self._cache:
                return self._cache[key]
            if key in self._failures:
                raise self._failures[key]
            self._cache[key] = await self._fetch(spec, key)
            return self._cache[key]

    async def _fetch(self, spec: DeploymentSpec, key: Key) -> ModelCosts:
        fresh = self._security.refreshed()  # a leaf renewed on disk (cert-manager): a new channel
        if fresh is not self._security:
            self._security = fresh
            if self._channel is not None:
                await self._channel.close()
                self._channel = None
        if self._channel is None:
            self._channel = transport.channel(
                self.target,
                self._security,
                expect_identity=pki.MONITOR,
                options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
            )
        stub = agent_pb2_grpc.MonitorStub(self._channel)
        request = agent_pb2.ProfileRequest(
            model=agent_pb2.StageSpec(model=key[0], seed=key[1], input_shape=list(key[2])), codecs=key[3]
        )
        try:
            answer = await stub.Profile(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSIENT:
                raise ProfilerUnavailable(
                    f"monitor {self.target}: {exc.code().name}: {exc.details() or ''}"
                ) from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                error = InvalidSpec(f"spec.model: {exc.details()}")
                self._failures[key] = error
                raise error from None
            raise ProfilerUnavailable(
                f"monitor {self.target}: {exc.code().name}: {exc.details() or ''}"
            ) from None
        if not answer.blocks:
            raise InvalidSpec(f"spec.model: {key[0]!r} has no blocks to place")
        blocks = tuple(
            LayerProfile(
                name=b.name,
                flops=b.flops,
                param_bytes=b.param_bytes,
                out_bytes=b.out_bytes,
                compute_ms=b.compute_ms,
                act_bytes=b.act_bytes,
            )
            for b in answer.blocks
        )
        codecs = tuple(
            CodecProfile(
                name=c.name,
                wire_bytes=tuple(c.wire_bytes),
                encode_ms=tuple(c.encode_ms),
                decode_ms=tuple(c.decode_ms),
                error=tuple(c.error),
            )
            for c in answer.codecs
        )
        return ModelCosts(
            blocks=blocks,
            input_bytes=answer.input_bytes,
            reference_ms=answer.reference_workload_ms,
            codecs=codecs,
        )
