"""OperatorConfig: the operator's one typed settings object, built once at start-up from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from amp4ec.operator.measured import valid_window

__all__ = ["GROUP", "PLURAL", "VERSION", "OperatorConfig"]

GROUP = "amp4ec.io"
VERSION = "v1alpha1"
PLURAL = "inferencedeployments"

MiB = 1024 * 1024


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator reaches its dependencies and shapes shard Pods.

    Every field can be set from the environment as ``AMP4EC_<FIELD NAME IN CAPITALS>``
    (see ``from_env``); the defaults fit the manifests in ``manifests/``.
    """

    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Base URL of the Prometheus HTTP API that scrapes the monitor DaemonSet."""
    profiler: str = "amp4ec-monitor.amp4ec-system.svc:50051"
    """host:port of a monitor agent's gRPC server (``Monitor.Profile``); a Service in front
    of the monitor DaemonSet in a cluster."""
    agent_image: str = "ghcr.io/amp4ec/node-agent:0.1.0"
    """Image of shard Pods (the node agent, torch side)."""
    initializer_image: str = "ghcr.io/amp4ec/operator:0.1.0"
    """Image of the storage initializer (fetches and verifies model files before a shard loads them)."""
    shard_port: int = 50051
    """Container port of a shard's gRPC server, also the port of every Service the operator makes."""
    metrics_port: int = 9090
    """Container port of a shard's Prometheus /metrics."""
    operator_metrics_port: int = 8080
    """Port of the operator's own /metrics (0 = any free port, written to ``metrics_port_file``)."""
    metrics_port_file: str = ""
    """Where to write the operator's bound metrics port ("" = nowhere); for tests and sidecars."""
    memory_overhead_bytes: int = 256 * MiB
    """Added to a stage's predicted memory for its Pod's request: the Python and torch runtime."""
    capacity_max_age_s: float = 120.0
    """Node metrics older than this are stale: the node is left out (or the plan kept)."""
    timer_interval_s: float = 5.0
    """How often the re-plan timer wakes; each deployment re-plans at its own interval."""
    ready_poll_s: float = 2.0
    """Delay between checks while shard Pods start (the handler's TemporaryError delay)."""
    infeasible_retry_s: float = 30.0
    """Delay before planning again when no placement fits (capacity may grow)."""
    prometheus_timeout_s: float = 5.0
    """Timeout of one PromQL query."""
    measure_window: str = "2m"
    """PromQL range of ``status.measured`` (rates and quantiles over it): at least two scrapes
    of the shard Pods, better four (Grafana's rule for ``$__rate_interval``)."""
    measure_interval_s: float = 15.0
    """Seconds between two ``status.measured`` updates of one deployment (the re-plan timer
    wakes every 5 s; a shorter interval means every tick)."""
    profile_timeout_s: float = 120.0
    """Timeout of one ``Monitor.Profile`` call (loading and timing a model)."""
    shard_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of shard containers (``AMP4EC_SHARD_ENV`` as ``K=V,K2=V2``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """Read ``AMP4EC_*`` variables; unknown ones are ignored, malformed ones raise ValueError."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"AMP4EC_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "shard_env":
                values[f.name] = dict(kv.split("=", 1) for kv in raw.split(",") if "=" in kv)
            elif f.type in ("int",):
                values[f.name] = int(raw)
            elif f.type in ("float",):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if not valid_window(self.measure_window):
            raise ValueError(
                "AMP4EC_MEASURE_WINDOW: expected a PromQL duration like 2m or 30s,"
                f" got {self.measure_window!r}"
            )
