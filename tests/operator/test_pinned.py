"""A pinned placement (``spec.placement[].node``) against the in-memory API of test_hardening.py
(no processes): a pin on a node the cluster has and the deployment's selector admits, but that
cannot take a shard now (stale metrics, no room), is the transient ``PinnedNodeUnavailable``
(retried, phase Planning); a pin on a node the cluster does not have, or one outside the
selector, stays the user's permanent ``InvalidPlacement`` (phase Failed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from amp4ec.operator.capacity import Capacity
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.reconcile import Deps, Outcome
from amp4ec.planner.types import NodeCapacity
from tests.operator.test_hardening import FakeKube, Profiles, _step
from tests.operator.test_shared_nodes import condition, foreign_pod, kube_with, pods

CONFIG = OperatorConfig(tls=False, infeasible_retry_s=7.0)
SELECTOR = {"amp4ec.io/edge": "true"}


class StaleCapacities:
    """Prometheus as the operator sees it: fresh capacity for every node asked for, except
    ``stale`` (node → why), reported missing as ``Prometheus.capacity`` does."""

    def __init__(self, stale: dict[str, str] | None = None) -> None:
        self.stale = stale or {}

    async def capacity(self, nodes: list[str], reference_ms: float, max_age_s: float) -> Capacity:
        fresh = {n: NodeCapacity(n, 1.0, 2 << 30, speed=1.0) for n in nodes if n not in self.stale}
        return Capacity(nodes=fresh, missing={n: why for n, why in self.stale.items() if n in nodes})


def cluster() -> FakeKube:
    """edge-a and edge-b admitted by ``SELECTOR``; core-1 a node of the cluster outside it."""
    kube = kube_with("edge-a", "edge-b", "core-1")
    del kube.objects[("Node", None, "core-1")]["metadata"]["labels"]["amp4ec.io/edge"]
    return kube


def pinned(node: str) -> dict[str, Any]:
    return {
        "model": {"name": "mobilenet_v2"},
        "nodeSelector": SELECTOR,
        "placement": [{"firstBlock": 0, "lastBlock": 1, "node": node}],
    }


def reconcile_once(
    kube: FakeKube, spec: dict[str, Any], stale: dict[str, str] | None = None
) -> tuple[Outcome, dict[str, Any]]:
    deps = Deps(kube=kube, prometheus=StaleCapacities(stale), profiler=Profiles(), config=CONFIG)  # type: ignore[arg-type]
    status: dict[str, Any] = {}
    outcome = asyncio.run(_step(deps, "pinned", "uid-p", spec, status))
    return outcome, status


def assert_transient(outcome: Outcome, status: dict[str, Any], *words: str) -> None:
    assert outcome.reason == "PinnedNodeUnavailable", (outcome.reason, status)
    assert outcome.permanent is None and outcome.retry_s == CONFIG.infeasible_retry_s
    planned = condition(status, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "PinnedNodeUnavailable"
    assert planned["message"].startswith("spec.placement[0].node: 'edge-a' cannot take a shard now: ")
    assert all(w in planned["message"] for w in words), planned["message"]
    assert status["phase"] == "Planning" and "observedGeneration" not in status


def test_a_pin_on_a_selected_node_with_stale_metrics_waits_and_is_retried() -> None:
    kube = cluster()
    outcome, status = reconcile_once(kube, pinned("edge-a"), stale={"edge-a": "capacity metrics 300 s old"})
    assert_transient(outcome, status, "capacity metrics 300 s old")
    assert not pods(kube, "uid-p")  # nothing placed around the pin meanwhile


def test_a_pin_on_a_selected_node_without_room_waits_and_is_retried() -> None:
    kube = cluster()
    kube.objects[("Pod", "shop", "web-edge-a")] = foreign_pod("edge-a", "950m")
    outcome, status = reconcile_once(kube, pinned("edge-a"))
    assert_transient(outcome, status, "0.05 cpu to take", "other Pods 0.95")
    assert not pods(kube, "uid-p")


@pytest.mark.parametrize(
    ("node", "why"),
    [("edge-z", "a node the cluster does not have"), ("core-1", "a node outside spec.nodeSelector")],
)
def test_a_pin_on_a_node_the_deployment_cannot_have_is_the_users_invalid_placement(
    node: str, why: str
) -> None:
    kube = cluster()
    # Even with every node's metrics stale: the user's pin is wrong, not the moment.
    stale = {n: "capacity metrics 300 s old" for n in ("edge-a", "edge-b", "core-1", "edge-z")}
    for metrics in ({}, {n: w for n, w in stale.items() if n != "edge-a"}):
        outcome, status = reconcile_once(kube, pinned(node), stale=metrics)
        assert outcome.reason == "InvalidPlacement", (why, outcome.reason, status)
        assert outcome.retry_s is None and outcome.permanent is not None and node in outcome.permanent
        planned = condition(status, "Planned")
        assert planned["status"] == "False" and planned["reason"] == "InvalidPlacement"
        assert node in planned["message"]
        assert status["phase"] == "Failed" and status["observedGeneration"] == 1
        assert not pods(kube, "uid-p")
