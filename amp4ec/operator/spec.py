"""The InferenceDeployment spec as pydantic models: the CRD schema's mirror plus what a schema cannot say.

``parse_spec(raw)`` is the one entry point; every failure is an ``InvalidSpec`` whose
message names the field path (``spec.model.sha256``) and what was expected, so it can go
into a status condition verbatim.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amp4ec.compression import DEFAULT_MAX_ERROR, Compression
from amp4ec.errors import InvalidSpec
from amp4ec.operator.s3 import DEFAULT_REGION, S3Options, parse_s3_uri
from amp4ec.operator.storage_hosts import Network, host_refusal
from amp4ec.wire.stage import Batching

__all__ = [
    "MAX_INPUT_ELEMENTS",
    "CABundleSpec",
    "CompressionSpec",
    "DeploymentSpec",
    "ModelRef",
    "PinSpec",
    "ReplanSpec",
    "S3Spec",
    "SpecPolicy",
    "Toleration",
    "parse_spec",
]

_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
"""A zoo name (``mobilenet_v2``) or a factory (``package.module:factory``)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/(?P<path>[^\s]+)$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

MAX_INPUT_ELEMENTS = 1 << 22
"""Most elements of one input (4,194,304: [1, 3, 1024, 1024] or [16, 3, 224, 224]). Profiling
allocates activations in proportion: [1, 3, 4096, 4096] held the shared profiler at 6.35 GB for
~100 s. The CRD's CEL rule on ``inputShape`` says the same (a test keeps them equal)."""


@dataclass(frozen=True)
class SpecPolicy:
    """What the cluster admin allows beyond the schema (chart values → operator config)."""

    allowed_factory_modules: tuple[str, ...] = ()
    """Modules whose ``module:factory`` a resource may name (a factory is code the profiler and
    every shard run); a module allows its submodules. Default: none."""
    storage_allowed_networks: Sequence[Network] = ()
    """Networks a storageUri may reach although they are loopback/link-local (tests only)."""

    def factory_allowed(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.allowed_factory_modules)


Objective = Literal["throughput", "latency", "p95"]
Strategy = Literal["optimal", "paper", "equal", "memory", "replicate", "monolith"]
CompressionMode = Literal["off", "auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True)


class S3Spec(_Strict):
    """An S3-compatible store for an ``s3://bucket/key`` storageUri (MinIO, Ceph RGW, AWS S3)."""

    endpoint: str | None = Field(None, max_length=300)
    """``https://host[:port]`` of the store; absent: AWS's ``https://s3.<region>.amazonaws.com``."""
    region: str = Field(DEFAULT_REGION, min_length=1, max_length=32, pattern=r"^[a-z0-9-]+$")
    """The region requests are signed for (MinIO's default is us-east-1)."""
    addressing: Literal["path", "virtual"] = "path"
    """``path`` (``https://endpoint/bucket/key``, MinIO's) or ``virtual`` (``https://bucket.endpoint/key``)."""
    secret_name: str | None = Field(None, alias="secretName", min_length=1, max_length=253)
    """A Secret in the deployment's namespace with keys ``accessKeyId``, ``secretAccessKey`` (and
    optionally ``sessionToken``), passed to the storage initializer only, as environment from
    ``secretKeyRef``: the operator never reads it. Absent: anonymous GETs."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None:
            _check_https(v, path=False)
        return v

    @field_validator("secret_name")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None and not _SUBDOMAIN.match(v):
            raise ValueError(f"expected a Secret name (a DNS subdomain), got {v!r}")
        return v


class CABundleSpec(_Strict):
    """A ConfigMap in the deployment's namespace holding the PEM CA bundle that verifies the store."""

    config_map_name: str = Field(alias="configMapName", min_length=1, max_length=253)
    key: str = Field("ca.crt", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """The ConfigMap's key (``ca.crt``, as in ``kube-root-ca.crt`` and trust-manager's bundles)."""

    @field_validator("config_map_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SUBDOMAIN.match(v):
            raise ValueError(f"expected a ConfigMap name (a DNS subdomain), got {v!r}")
        return v


class ModelRef(_Strict):
    """Which model to serve: an architecture by name, optionally with weights from storage, or a
    ``torch.export`` archive (``storageUri`` ending in ``.pt2``, no name)."""

    name: str | None = Field(None, min_length=1, max_length=200)
    """Zoo name (``mobilenet_v2``) or ``package.module:factory``; absent for a ``.pt2`` archive."""
    storage_uri: str | None = Field(None, alias="storageUri", max_length=1000)
    """A state_dict for ``name``, or (ending in ``.pt2``) the model itself as a torch.export
    archive: ``pvc://claim/path``, ``https://…`` or ``s3://bucket/key`` (KServe's style)."""
    sha256: str | None = None
    """Hex SHA-256 of the file at ``storageUri``; required for https, s3 and any ``.pt2``,
    checked before loading."""
    s3: S3Spec | None = None
    """The store of an ``s3://`` storageUri (endpoint, region, addressing, credentials' Secret)."""
    ca_bundle: CABundleSpec | None = Field(None, alias="caBundle")
    """The CA that verifies an https or s3 store with a private certificate, replacing the
    initializer image's public CAs."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the random weights when no storageUri is given (every shard builds the same)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"expected a zoo name like mobilenet_v2 or package.module:factory, got {v!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256.match(v):
            raise ValueError(f"expected 64 lowercase hex digits, got {v!r}")
        return v

    @field_validator("storage_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("https://"):
            _check_https(v)
        elif v.startswith("pvc://"):
            m = _PVC.match(v)
            if not m:
                raise ValueError(f"expected pvc://claim-name/path/in/claim, got {v!r}")
            _check_claim_path(m["path"])
        elif v.startswith("s3://"):
            parse_s3_uri(v)
        else:
            raise ValueError(f"expected a pvc://, https:// or s3:// URI, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelRef:
        if self.archive:
            if self.name is not None:
                raise ValueError(
                    "name: leave it out with a .pt2 storageUri (the torch.export archive is the model)"
                )
            if not self.sha256:
                raise ValueError(
                    "sha256: required with a .pt2 storageUri (the profiler and every shard must load "
                    "the same archive, verified before use)"
                )
        elif self.name is None:
            raise ValueError(
                "name: required (a zoo name or package.module:factory), or a storageUri ending in .pt2 "
                "(a torch.export archive)"
            )
        scheme = (self.storage_uri or "").partition("://")[0]
        if scheme in ("https", "s3") and not self.sha256:
            raise ValueError(
                f"sha256: required with an {scheme}:// storageUri (the file is verified before use)"
            )
        if self.s3 is not None and scheme != "s3":
            raise ValueError("s3: only with an s3:// storageUri")
        if self.ca_bundle is not None and scheme not in ("https", "s3"):
            raise ValueError("caBundle: only with an https:// or s3:// storageUri")
        if self.sha256 and not self.storage_uri:
            raise ValueError("sha256: given without a storageUri to check")
        return self

    @property
    def archive(self) -> bool:
        """The model is the torch.export archive at ``storageUri`` (it ends in ``.pt2``)."""
        return (self.storage_uri or "").endswith(".pt2")

    @property
    def display(self) -> str:
        """What to call the model in messages: its name, or the archive's URI."""
        return self.name or self.storage_uri or ""

    @property
    def s3_options(self) -> S3Options:
        """How the initializer reaches the store of an ``s3://`` URI (the defaults without ``s3``)."""
        s3 = self.s3 or S3Spec()
        return S3Options(s3.endpoint, s3.region, s3.addressing, s3.secret_name)

    @property
    def remote_url(self) -> str | None:
        """The https URL the initializer GETs (an https URI, or an s3 object on its endpoint), else None."""
        uri = self.storage_uri or ""
        if uri.startswith("s3://"):
            return self.s3_options.object_url(uri)
        return uri if uri.startswith("https://") else None

    @property
    def pvc(self) -> tuple[str, str] | None:
        """(claim, path) of a ``pvc://`` URI, else None."""
        m = _PVC.match(self.storage_uri or "")
        return (m["claim"], m["path"]) if m else None


def _check_https(uri: str, path: bool = True) -> None:
    """An https URI with a host, no credentials, a valid port and (``path``) a path, else none."""
    if not uri.startswith("https://"):
        raise ValueError(
            f"expected https://host[:port], got {uri!r} (plain http would carry the request in the clear)"
        )
    if path and (len(uri) <= len("https://") or "/" not in uri[len("https://") :]):
        raise ValueError(f"expected https://host/path, got {uri!r}")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"expected https://host[:port]/path, got {uri!r} ({exc})") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("expected no user:password@ in the URI (credentials do not belong in a spec)")
    if not parts.hostname:
        raise ValueError(f"expected https://host/path, got {uri!r}")
    if port == 0:
        raise ValueError(f"expected a port in 1..65535, got {uri!r}")
    if not path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"expected https://host[:port] without a path, got {uri!r}")


def _check_claim_path(path: str) -> None:
    """A relative path that stays inside the claim: no leading /, no ``..`` component."""
    if path.startswith("/"):
        raise ValueError(f"expected a path relative to the claim, got the absolute path {path!r}")
    if ".." in PurePosixPath(path).parts or "\\" in path:
        raise ValueError(f"expected a path inside the claim (no '..', no backslash), got {path!r}")


class ReplanSpec(_Strict):
    """When to consider a new plan while serving."""

    interval_seconds: int = Field(60, alias="intervalSeconds", ge=5, le=86400)
    """How often capacity is re-read and a plan proposed."""
    gain_threshold: float = Field(0.1, alias="gainThreshold", ge=0.0, le=10.0)
    """Apply a proposed plan only if it is better by more than this fraction (hysteresis)."""


class CompressionSpec(_Strict):
    """Activation compression per cut (see amp4ec/compression.py): off, or auto within a bound."""

    mode: CompressionMode = "off"
    max_output_error: float = Field(DEFAULT_MAX_ERROR, alias="maxOutputError", ge=0.0, le=1.0)
    """Bound on the relative L2 error of the final outputs the codecs may introduce (0: none lossy)."""

    @property
    def enabled(self) -> bool:
        return self.mode == "auto"

    def policy(self) -> Compression:
        return Compression(self.mode, self.max_output_error)


class BatchingSpec(_Strict):
    """Dynamic batching in every stage (see [Note: dynamic batching] in amp4ec.node_agent.batching)."""

    max_batch_requests: int = Field(1, alias="maxBatchRequests", ge=1, le=64)
    """The most waiting requests one forward may gather (1 = none; the agent's --max-batch bounds it)."""
    max_queue_delay_ms: float = Field(0.0, alias="maxQueueDelayMs", ge=0.0, le=1000.0)
    """How long a batch's first request may wait for more (0: only what already waits)."""

    @property
    def enabled(self) -> bool:
        return self.max_batch_requests > 1

    def policy(self) -> Batching:
        return Batching(self.max_batch_requests, self.max_queue_delay_ms)


class PinSpec(_Strict):
    """A manual placement: blocks firstBlock..lastBlock (inclusive) form one stage on node."""

    first_block: int = Field(alias="firstBlock", ge=0)
    last_block: int = Field(alias="lastBlock", ge=0)
    node: str = Field(min_length=1, max_length=253)

    @model_validator(mode="after")
    def _order(self) -> PinSpec:
        if self.last_block < self.first_block:
            raise ValueError(f"lastBlock: expected >= firstBlock ({self.first_block}), got {self.last_block}")
        return self


class Toleration(_Strict):
    """A Pod toleration (core/v1 Toleration), passed to every shard Pod: edge nodes are often tainted."""

    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds", ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.key is not None and not _LABEL_KEY.match(self.key):
            raise ValueError(f"key: expected a label key like node-role.kubernetes.io/edge, got {self.key!r}")
        if self.value is not None and not _LABEL_VALUE.match(self.value):
            raise ValueError(f"value: expected a label value, got {self.value!r}")
        if self.operator == "Exists" and self.value:
            raise ValueError("value: must be empty with operator Exists")
        if self.key is None and self.operator != "Exists":
            raise ValueError("operator: must be Exists when key is empty (tolerates every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds: only with effect NoExecute")
        return self

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class LocalObjectReference(_Strict):
    """``{name: ...}`` of a Secret in the deployment's namespace (imagePullSecrets)."""

    name: str = Field(min_length=1, max_length=253, pattern=_SUBDOMAIN.pattern)


class DeploymentSpec(_Strict):
    """``spec`` of an InferenceDeployment."""

    model: ModelRef
    input_shape: tuple[int, ...] | None = Field(None, alias="inputShape", min_length=1, max_length=8)
    """Input shape, e.g. [1, 3, 224, 224]; default: the model's."""
    objective: Objective = "throughput"
    target_rate: float | None = Field(None, alias="targetRate", ge=0.001, le=1e6)
    """Requests per second the ``p95`` objective plans for (its p95 latency at this rate is
    minimised); required by ``p95``, refused by the other objectives."""
    strategy: Strategy = "optimal"
    tiles: bool = True
    """Let the optimal strategy run a request's leading convolutions as row tiles on several
    nodes where it predicts lower latency (false: layer-wise stages only)."""
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    """Labels a node must carry to get a shard."""
    max_stages: int | None = Field(None, alias="maxStages", ge=1, le=64)
    replan: ReplanSpec = Field(default_factory=ReplanSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    placement: tuple[PinSpec, ...] = ()
    """Manual pins the planner respects; every other block is placed freely."""
    tolerations: tuple[Toleration, ...] = Field((), max_length=32)
    """Added to every shard Pod (after the chart's defaults)."""
    image_pull_secrets: tuple[LocalObjectReference, ...] = Field((), alias="imagePullSecrets", max_length=16)
    """Added to every shard Pod (after the chart's defaults)."""
    priority_class_name: str | None = Field(
        None, alias="priorityClassName", min_length=1, max_length=253, pattern=_SUBDOMAIN.pattern
    )
    """Priority class of shard Pods (else the chart's default)."""
    priority: int = Field(0, ge=0, le=1000)
    """Precedence when deployments compete for nodes (placement.py): a higher one may take back
    what lower ones hold beyond their fair share; it does not enlarge its own fair share."""
    preemption_policy: Literal["PreemptLowerPriority", "Never"] = Field(
        "PreemptLowerPriority", alias="preemptionPolicy"
    )
    """``Never``: wait for free capacity rather than ask lower-priority deployments to re-plan."""

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            if any(d <= 0 for d in v):
                raise ValueError(f"expected positive sizes, got {list(v)}")
            numel = 1
            for d in v:
                numel *= d
            if numel > MAX_INPUT_ELEMENTS:
                raise ValueError(
                    f"expected at most {MAX_INPUT_ELEMENTS} elements in one input, got {numel} ({list(v)})"
                )
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"expected label keys like kubernetes.io/arch, got {key!r}")
            if len(value) > 63 or not _LABEL_VALUE.match(value):
                raise ValueError(f"expected a label value (at most 63 characters) for {key}, got {value!r}")
        return v

    @model_validator(mode="after")
    def _rate(self) -> DeploymentSpec:
        if self.objective == "p95" and self.target_rate is None:
            raise ValueError("targetRate: objective p95 needs the arrival rate in requests/s")
        if self.objective != "p95" and self.target_rate is not None:
            raise ValueError(f"targetRate: only objective p95 takes a rate, not {self.objective!r}")
        if self.objective == "p95" and self.strategy != "optimal":
            raise ValueError(f"objective: p95 is planned by strategy optimal only, got {self.strategy!r}")
        return self

    @model_validator(mode="after")
    def _pins(self) -> DeploymentSpec:
        spans = sorted(self.placement, key=lambda p: p.first_block)
        for a, b in itertools.pairwise(spans):
            if b.first_block <= a.last_block:
                spans_text = f"{a.first_block}..{a.last_block} and {b.first_block}..{b.last_block}"
                raise ValueError(f"placement: blocks {spans_text} overlap")
        nodes = [p.node for p in self.placement]
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"placement: a node may hold one pinned stage, got {nodes}")
        if self.max_stages is not None and len(self.placement) > self.max_stages:
            raise ValueError(
                f"placement: {len(self.placement)} pinned stages exceed maxStages {self.max_stages}"
            )
        if self.placement and self.strategy != "optimal":
            raise ValueError(f"placement: pins are honoured by strategy optimal only, got {self.strategy!r}")
        return self


def _path(loc: tuple[Any, ...]) -> str:
    out = "spec"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _check_policy(spec: DeploymentSpec, policy: SpecPolicy) -> None:
    """What the cluster admin allows: factories of listed modules, storage off forbidden hosts."""
    name = spec.model.name or ""
    if ":" in name:
        module = name.split(":", 1)[0]
        if not policy.factory_allowed(module):
            allowed = ", ".join(policy.allowed_factory_modules) or "none"
            raise InvalidSpec(
                f"spec.model.name: factory module {module!r} is not allowed by the cluster admin "
                f"(a factory is code execution; allowed modules: {allowed}; chart value "
                "operator.allowedFactoryModules)"
            )
    url = spec.model.remote_url
    if url is not None:
        why = host_refusal(urlsplit(url).hostname or "", policy.storage_allowed_networks)
        if why is not None:
            field = "s3.endpoint" if spec.model.s3 and spec.model.s3.endpoint else "storageUri"
            raise InvalidSpec(f"spec.model.{field}: refused: {why}")


def parse_spec(raw: Any, policy: SpecPolicy | None = None) -> DeploymentSpec:
    """Validate a resource's ``spec`` under ``policy`` (default: no factories, no exceptions for
    forbidden storage hosts); raises InvalidSpec naming every wrong field."""
    if not isinstance(raw, dict):
        raise InvalidSpec(f"spec: expected an object, got {type(raw).__name__}")
    try:
        # JSON mode: strict types as the API server sees them (arrays for tuples, no "1" for 1).
        spec = DeploymentSpec.model_validate_json(json.dumps(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if p not in ("function-after",))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_path(loc)}: {msg}")
        raise InvalidSpec("; ".join(problems)) from None
    _check_policy(spec, policy or SpecPolicy())
    return spec
