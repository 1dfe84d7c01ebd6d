"""Block profiles of a model, measured in a profiler Pod in the deployment's namespace, and cached.

The operator never imports torch, and no cluster-wide component loads a user's model: for a
model it has not profiled, the operator starts a short-lived profiler Pod in the deployment's
namespace (``profiler_pod.py``: the deployment's identity, scheduling fields and the chart's
limits), calls its ``Monitor.Profile`` once over mutual TLS (it must present
``profiler.<deployment>.<namespace>.amp4ec``), caches the answer and deletes the Pod.

Reconciliations do not wait for the Pod: ``costs`` raises ``Profiling`` while it starts (the
handler retries; the Pod's events request a reconciliation at once), ``ProfilerFailed`` when it
failed (its initializer could not fetch or verify the file, it ran out of memory or time), and
``InvalidSpec`` when the model itself cannot be profiled (INVALID_ARGUMENT: unknown model,
impossible shape, not a valid archive), the only failure that is cached.

[Note: the profile key] (model, seed, input shape, namespace, storage URI, sha256). The
namespace is part of it: whoever may change Pods or read Secrets in a namespace can answer for
its profiler Pod, so a profile only plans that namespace's deployments. The digest is: a new
archive at the same URI is another model; and with a digest, a profile is cached by content
(the same archive from another URI is not profiled again), while a failure (an unreachable
URI) stays with its URI and how it is reached (an s3 store's endpoint and Secret, the CA
bundle: one deployment's wrong Secret is not another's failure). Deployments of one namespace
that share a key wait for the first one's Pod rather than starting their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import grpc

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.operator import certmanager, certs
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.k8s import Conflict, Kube
from amp4ec.operator.names import label_value, owned_by
from amp4ec.operator.profiler_pod import (
    profiler_network_policy,
    profiler_pod,
    profiler_pod_name,
    profiler_state,
)
from amp4ec.operator.spec import DeploymentSpec
from amp4ec.planner.types import CodecProfile, LayerProfile, TileRows
from amp4ec.wire import transport
from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

__all__ = ["ModelCosts", "ProfileKey", "Profiler", "ProfilerFailed", "ProfilerUnavailable", "Profiling"]

log = logging.getLogger(__name__)
_MANAGED = {"app.kubernetes.io/managed-by": "amp4ec-operator"}


class ProfilerUnavailable(Exception):
    """The profiler Pod could not answer now (retry later)."""


class Profiling(Exception):
    """A profiler Pod is starting or running for this model: not planned yet (retry soon)."""


class ProfilerFailed(Exception):
    """The profiler Pod failed: its storage initializer, or its own memory or deadline."""

    def __init__(self, reason: str, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class ModelCosts:
    """A model's chain as the planner sees it."""

    blocks: tuple[LayerProfile, ...]
    input_bytes: int
    reference_ms: float
    """The profiling node's reference workload time: speed of a node = this / its own."""
    codecs: tuple[CodecProfile, ...] = ()
    """Each codec measured at every cut, when the deployment compresses (``auto``)."""


@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on (see [Note: the profile key])."""

    model: str
    seed: int
    shape: tuple[int, ...]
    namespace: str
    storage_uri: str
    sha256: str
    codecs: bool = False
    """Whether the deployment compresses (``spec.compression``): the codecs are measured too."""
    batch_sizes: tuple[int, ...] = ()
    """The batch sizes its dynamic batching can use (``Batching.profile_sizes``), timed too."""
    access: str = ""
    """How the file is reached beyond its URI (``spec.model.s3``, ``caBundle``), for failures only."""

    @classmethod
    def of(cls, spec: DeploymentSpec, namespace: str) -> ProfileKey:
        m = spec.model
        return cls(
            m.name or "",
            m.seed,
            tuple(spec.input_shape or ()),
            namespace,
            m.storage_uri or "",
            m.sha256 or "",
            spec.compression.enabled,
            spec.batching.policy().profile_sizes(),
            _access(spec),
        )

    def content(self) -> ProfileKey:
        """The key of what is profiled: with a digest, the URI it came from does not matter."""
        return replace(self, storage_uri="", access="") if self.sha256 else self

    def digest(self) -> str:
        fields = asdict(self)
        if not self.batch_sizes:  # the digest (a profiler Pod's name) of a key from before batch sizes
            del fields["batch_sizes"]
        if not self.access:  # likewise from before s3 and caBundle
            del fields["access"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _access(spec: DeploymentSpec) -> str:
    reached = spec.model.model_dump(include={"s3", "ca_bundle"}, exclude_none=True)
    return json.dumps(reached, sort_keys=True) if reached else ""


@dataclass(frozen=True)
class _Pending:
    deployment: str
    uid: str
    pod: str


class Profiler:
    """Profiles in the deployment's namespace (see the module docstring), with a per-key cache."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        security: transport.TransportSecurity,
        ca: pki.CertificateAuthority | None,
    ) -> None:
        """``security``: the operator's identity; ``ca`` issues the profiler Pods' leaves (None:
        plaintext, ``config.tls`` false)."""
        self._kube = kube
        self._config = config
        self._security = security
        self._ca = ca
        self._cache: dict[ProfileKey, ModelCosts] = {}
        """By ``ProfileKey.content()``: the same archive from two URIs is profiled once."""
        self._failures: dict[ProfileKey, InvalidSpec | ProfilerFailed] = {}
        """What only a new spec can fix (a new key): answered at once, no new Pod."""
        self._retry_at: dict[ProfileKey, tuple[float, ProfilerFailed]] = {}
        """A failure that may pass, and when the next profiler Pod may start (no Pod loop)."""
        self._pending: dict[ProfileKey, _Pending] = {}
        """By content: the deployment whose profiler Pod is profiling it (others wait for it)."""
        self._locks: dict[ProfileKey, asyncio.Lock] = {}

    async def close(self) -> None:
        pass  # one channel per call, closed after it

    def cached(self, spec: DeploymentSpec, namespace: str) -> ModelCosts | None:
        return self._cache.get(ProfileKey.of(spec, namespace).content())

    def remember(self, spec: DeploymentSpec, namespace: str, costs: ModelCosts) -> None:
        """Take ``costs`` as this spec's profile (one a deployment's status kept, checked)."""
        self._cache.setdefault(ProfileKey.of(spec, namespace).content(), costs)

    async def costs(
        self,
        name: str,
        namespace: str,
        uid: str,
        spec: DeploymentSpec,
        adopt: Callable[[dict[str, Any]], None],
    ) -> ModelCosts:
        """The cached profile, or the next step towards it (raises Profiling, ProfilerFailed,
        ProfilerUnavailable or InvalidSpec; see the module docstring)."""
        key = ProfileKey.of(spec, namespace)
        async with self._locks.setdefault(key.content(), asyncio.Lock()):
            if key.content() in self._cache:
                return self._cache[key.content()]
            if key in self._failures:
                raise self._failures[key]
            until, failure = self._retry_at.get(key, (0.0, None))
            if failure is not None and time.monotonic() < until:
                raise failure
            self._retry_at.pop(key, None)
            return await self._step(name, namespace, uid, spec, adopt, key)

    async def _step(
        self,
        name: str,
        namespace: str,
        uid: str,
        spec: DeploymentSpec,
        adopt: Callable[[dict[str, Any]], None],
        key: ProfileKey,
    ) -> ModelCosts:
        what = spec.model.display
        other = self._pending.get(key.content())
        if other is not None and other.uid != uid:
            pod = await self._kube.get("Pod", namespace, other.pod)
            if pod is not None and not (pod.get("metadata") or {}).get("deletionTimestamp"):
                raise Profiling(
                    f"waiting for {what}'s profile from profiler Pod {other.pod} of {other.deployment}"
                )
            self._pending.pop(key.content(), None)  # that deployment's Pod is gone: profile here
        pod_name = profiler_pod_name(name, key.digest())
        pod = await self._kube.get("Pod", namespace, pod_name)
        if pod is not None and not owned_by(pod, uid):
            message = f"Pod {namespace}/{pod_name} exists and is not this deployment's profiler; remove it"
            raise ProfilerFailed("NameConflict", message)
        self._pending[key.content()] = _Pending(name, uid, pod_name)
        if pod is None:
            try:
                await self._start(name, namespace, spec, adopt, key, uid)
            except ProfilerFailed as exc:
                self._pending.pop(key.content(), None)
                self._retry_at[key] = (time.monotonic() + self._config.infeasible_retry_s, exc)
                raise
            raise Profiling(f"profiling {what} in profiler Pod {pod_name} (starting)")
        state = profiler_state(pod, self._config)
        if state.kind in ("starting", "ending"):
            raise Profiling(f"profiling {what}: {state.message}")
        if state.kind == "failed":
            await self._finish(key, namespace, pod_name)  # the next try starts afresh
            storage = state.reason in ("InvalidStorage", "StorageUnavailable")
            message = f"spec.model.storageUri: {state.message}" if storage else state.message
            failure = ProfilerFailed(state.reason, message, permanent=state.permanent)
            if failure.permanent:
                self._failures[key] = failure
            else:
                self._retry_at[key] = (time.monotonic() + self._config.infeasible_retry_s, failure)
            raise failure
        try:
            costs = await self._call(f"{state.address}:{self._config.profiler_port}", name, namespace, spec)
        except InvalidSpec as exc:
            self._failures[key] = exc
            await self._finish(key, namespace, pod_name)
            raise
        except ProfilerFailed as exc:
            self._retry_at[key] = (time.monotonic() + self._config.infeasible_retry_s, exc)
            await self._finish(key, namespace, pod_name)
            raise
        self._cache[key.content()] = costs
        await self._finish(key, namespace, pod_name)
        log.info("%s/%s: profiled %s in %s (%d blocks)", namespace, name, what, pod_name, len(costs.blocks))
        return costs

    async def _start(
        self,
        name: str,
        namespace: str,
        spec: DeploymentSpec,
        adopt: Callable[[dict[str, Any]], None],
        key: ProfileKey,
        uid: str,
    ) -> None:
        """The profiler's NetworkPolicy and Secret, then its Pod (all owned by the deployment)."""
        cfg = self._config
        if cfg.network_policy:
            policy = profiler_network_policy(name, namespace, spec, cfg)
            adopt(policy)
            meta = policy["metadata"]
            live = await self._kube.get("NetworkPolicy", namespace, meta["name"])
            if live is not None and not owned_by(live, uid):
                message = f"NetworkPolicy {namespace}/{meta['name']} exists and is not this deployment's"
                raise ProfilerFailed("NameConflict", message)
            if live is None:
                with contextlib.suppress(Conflict):
                    await self._kube.create(policy)
            elif live.get("spec") != policy["spec"]:  # another storage port since the last profile
                await self._kube.patch("NetworkPolicy", namespace, meta["name"], {"spec": policy["spec"]})
        labels = {
            "amp4ec.io/deployment": label_value(name),
            "app.kubernetes.io/managed-by": "amp4ec-operator",
        }
        issuer = cfg.issuer()
        if issuer is not None:  # cert-manager issues the leaf; the kubelet waits for its Secret
            certificate = certmanager.profiler_certificate(name, namespace, issuer, labels)
            adopt(certificate)
            try:
                created = await self._kube.create(certificate)
            except Conflict:  # asked for by an earlier profiler Pod: the same request
                created = certificate
            if created is None:  # 404: the API server does not know the kind
                raise ProfilerFailed(
                    "CertManagerMissing",
                    f"the Certificate kind ({certmanager.API_VERSION}) is not installed: install"
                    " cert-manager, or set the chart's tls.issuer.kind to builtin",
                )
        elif self._ca is not None:
            await certs.ensure_profiler(self._kube, self._ca, name, namespace, labels, adopt)
        pod = profiler_pod(name, namespace, spec, cfg, key.digest())
        adopt(pod)
        with contextlib.suppress(Conflict):  # created meanwhile (a restarted operator)
            await self._kube.create(pod)

    async def _finish(self, key: ProfileKey, namespace: str, pod: str) -> None:
        self._pending.pop(key.content(), None)
        await self._kube.delete("Pod", namespace, pod)

    async def _call(self, target: str, name: str, namespace: str, spec: DeploymentSpec) -> ModelCosts:
        # The model of the Pod's own arguments; the codecs measured when the deployment compresses.
        request = agent_pb2.ProfileRequest(
            codecs=spec.compression.enabled, batch_sizes=spec.batching.policy().profile_sizes()
        )
        self._security = self._security.refreshed()  # a leaf renewed on disk (cert-manager)
        async with transport.channel(
            target,
            self._security,
            expect_identity=pki.profiler_identity(namespace, name) if self._config.tls else "",
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        ) as channel:
            try:
                answer = await agent_pb2_grpc.MonitorStub(channel).Profile(
                    request, timeout=self._config.profile_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    if spec.model.archive:
                        raise InvalidSpec(
                            f"spec.model.storageUri: {spec.model.storage_uri} is not a usable .pt2 archive: "
                            f"{exc.details()}"
                        ) from None
                    raise InvalidSpec(f"spec.model: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise ProfilerFailed(
                        "ProfilerFailed",
                        f"profiler {target}: {exc.details()} (memory limit "
                        f"{self._config.profiler_memory}; chart value profiler.memory)",
                    ) from None
                raise ProfilerUnavailable(
                    f"profiler {target}: {exc.code().name}: {exc.details() or ''}"
                ) from None
        if not answer.blocks:
            raise InvalidSpec(f"spec.model: {spec.model.display!r} has no blocks to place")
        blocks = tuple(
            LayerProfile(
                name=b.name,
                flops=b.flops,
                param_bytes=b.param_bytes,
                out_bytes=b.out_bytes,
                compute_ms=b.compute_ms,
                act_bytes=b.act_bytes,
                batch_ms=tuple((t.batch, t.ms) for t in b.batch_ms),
                tile=_tile_rows(b.tile) if b.HasField("tile") else None,
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


def _tile_rows(m: agent_pb2.TileRows) -> TileRows:
    """A block's row geometry as the profiler measured it (the planner checks it: InvalidSpec)."""
    return TileRows(
        in_height=m.in_height,
        out_height=m.out_height,
        lo=tuple(m.lo),
        hi=tuple(m.hi),
        codec_ns_per_byte=m.codec_ns_per_byte,
        fixed=m.fixed,
        overhead=m.overhead,
    )
