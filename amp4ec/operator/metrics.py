"""The operator's Prometheus metrics, per deployment (namespace, name).

``amp4ec_scheduler_overhead_seconds`` is defined once, in ``amp4ec.plan_timer``, and observed
by every planning call (local mode, bench and operator alike); the operator serves it with these.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from amp4ec.plan_timer import SCHEDULER_OVERHEAD

__all__ = ["PHASE", "RECONCILE_ERRORS", "REPLANS", "SCHEDULER_OVERHEAD", "forget"]

REPLANS = Counter(
    "amp4ec_replans_total",
    "Plans applied (the first one included), by what triggered them.",
    ["namespace", "deployment", "trigger"],
)
RECONCILE_ERRORS = Counter(
    "amp4ec_reconcile_errors_total",
    "Reconciliations that ended in an error, by reason (the condition reason).",
    ["namespace", "deployment", "reason"],
)
PHASE = Gauge(
    "amp4ec_deployment_phase",
    "1 for the deployment's current phase, 0 for the others.",
    ["namespace", "deployment", "phase"],
)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted deployment's series so dashboards do not show ghosts."""
    for metric in (SCHEDULER_OVERHEAD, REPLANS, RECONCILE_ERRORS, PHASE):
        for labels in list(metric._metrics):  # type: ignore[attr-defined]
            if labels[:2] == (namespace, name):
                metric.remove(*labels)
