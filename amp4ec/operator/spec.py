"""The InferenceDeployment spec as pydantic models: the CRD schema's mirror plus what a schema cannot say.

``parse_spec(raw)`` is the one entry point; every failure is an ``InvalidSpec`` whose
message names the field path (``spec.model.sha256``) and what was expected, so it can go
into a status condition verbatim.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amp4ec.errors import InvalidSpec

__all__ = ["DeploymentSpec", "ModelRef", "PinSpec", "ReplanSpec", "parse_spec"]

_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
"""A zoo name (``mobilenet_v2``) or a factory (``package.module:factory``)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PVC = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?)/(?P<path>[^\s]+)$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

Objective = Literal["throughput", "latency"]
Strategy = Literal["optimal", "paper", "equal", "memory", "replicate", "monolith"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True)


class ModelRef(_Strict):
    """Which model to serve: an architecture by name, optionally with weights from storage."""

    name: str | None = Field(None, min_length=1, max_length=200)
    """Zoo name (``mobilenet_v2``) or ``package.module:factory``."""
    storage_uri: str | None = Field(None, alias="storageUri", max_length=1000)
    """A state_dict for ``name``: ``pvc://claim/path`` or ``https://…`` (KServe's style)."""
    sha256: str | None = None
    """Hex SHA-256 of the file at ``storageUri``; required for https, checked before loading."""
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
            if len(v) <= len("https://") or "/" not in v[len("https://") :]:
                raise ValueError(f"expected https://host/path, got {v!r}")
        elif v.startswith("pvc://"):
            if not _PVC.match(v):
                raise ValueError(f"expected pvc://claim-name/path/in/claim, got {v!r}")
        else:
            raise ValueError(f"expected a pvc:// or https:// URI, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelRef:
        if self.name is None:
            raise ValueError(
                "name: required (a zoo name or package.module:factory); storageUri holds the weights "
                "for that architecture"
            )
        if self.storage_uri and self.storage_uri.startswith("https://") and not self.sha256:
            raise ValueError("sha256: required with an https:// storageUri (the file is verified before use)")
        if self.sha256 and not self.storage_uri:
            raise ValueError("sha256: given without a storageUri to check")
        return self

    @property
    def pvc(self) -> tuple[str, str] | None:
        """(claim, path) of a ``pvc://`` URI, else None."""
        m = _PVC.match(self.storage_uri or "")
        return (m["claim"], m["path"]) if m else None


class ReplanSpec(_Strict):
    """When to consider a new plan while serving."""

    interval_seconds: int = Field(60, alias="intervalSeconds", ge=5, le=86400)
    """How often capacity is re-read and a plan proposed."""
    gain_threshold: float = Field(0.1, alias="gainThreshold", ge=0.0, le=10.0)
    """Apply a proposed plan only if it is better by more than this fraction (hysteresis)."""


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


class DeploymentSpec(_Strict):
    """``spec`` of an InferenceDeployment."""

    model: ModelRef
    input_shape: tuple[int, ...] | None = Field(None, alias="inputShape", min_length=1, max_length=8)
    """Input shape, e.g. [1, 3, 224, 224]; default: the model's."""
    objective: Objective = "throughput"
    strategy: Strategy = "optimal"
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    """Labels a node must carry to get a shard."""
    max_stages: int | None = Field(None, alias="maxStages", ge=1, le=64)
    replan: ReplanSpec = Field(default_factory=ReplanSpec)
    placement: tuple[PinSpec, ...] = ()
    """Manual pins the planner respects; every other block is placed freely."""

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            if any(d <= 0 for d in v):
                raise ValueError(f"expected positive sizes, got {list(v)}")
            numel = 1
            for d in v:
                numel *= d
            if numel > 1 << 28:
                raise ValueError(f"expected at most 2^28 elements in one input, got {numel} ({list(v)})")
        return v

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _LABEL_KEY.match(key):
                raise ValueError(f"expected label keys like kubernetes.io/arch, got {key!r}")
        return v

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


def parse_spec(raw: Any) -> DeploymentSpec:
    """Validate a resource's ``spec``; raises InvalidSpec naming every wrong field."""
    if not isinstance(raw, dict):
        raise InvalidSpec(f"spec: expected an object, got {type(raw).__name__}")
    try:
        # JSON mode: strict types as the API server sees them (arrays for tuples, no "1" for 1).
        return DeploymentSpec.model_validate_json(json.dumps(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if p not in ("function-after",))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_path(loc)}: {msg}")
        raise InvalidSpec("; ".join(problems)) from None
