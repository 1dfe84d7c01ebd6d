"""Events: one per change of a condition's status or reason, typed Warning when it went wrong."""

from __future__ import annotations

import kubernetes_validate

from amp4ec.operator.events import Change, changes, event_object
from amp4ec.operator.status import condition


def test_each_changed_condition_is_one_event_and_counts_alone_post_nothing() -> None:
    old = [
        condition("Ready", True, "Serving", "1/1 pipelines serving"),
        condition("Degraded", True, "ShardRestarting", "node a: shard exited, restart 1"),
    ]
    same_reason = [
        condition("Ready", True, "Serving", "1/1 pipelines serving"),
        condition("Degraded", True, "ShardRestarting", "node a: shard exited, restart 2"),
    ]
    assert changes(old, same_reason) == []
    lost = [*old[:1], condition("Degraded", True, "NodeLost", "node a: 1 shard(s) not ready and stale")]
    assert changes(old, lost) == [
        Change("Warning", "NodeLost", "Degraded=True: node a: 1 shard(s) not ready and stale")
    ]
    back = [*old[:1], condition("Degraded", False, "AsPlanned", "capacity is fresh for every node")]
    assert changes(lost, back) == [
        Change("Normal", "AsPlanned", "Degraded=False: capacity is fresh for every node")
    ]


def test_a_first_status_reports_what_is_wrong_or_starting_but_not_an_absent_fault() -> None:
    first = [
        condition("Planned", True, "Planned", "plan p1"),
        condition("ShardsReady", False, "ShardsStarting", "0/2 shards ready"),
        condition("Degraded", False, "AsPlanned", "capacity is fresh"),
        condition("Ready", False, "PlanInfeasible", "no node holds block 3"),
    ]
    assert [(c.type, c.reason) for c in changes(None, first)] == [
        ("Normal", "Planned"),
        ("Normal", "ShardsStarting"),
        ("Warning", "PlanInfeasible"),
    ]


def test_the_event_names_the_deployment_and_is_a_valid_core_event() -> None:
    event = event_object("ns", "x" * 253, "uid-1", Change("Warning", "NodeLost", "m" * 5000))
    assert event["involvedObject"] == {
        "apiVersion": "amp4ec.io/v1alpha1",
        "kind": "InferenceDeployment",
        "name": "x" * 253,
        "namespace": "ns",
        "uid": "uid-1",
    }
    assert len(event["metadata"]["name"]) <= 253 and len(event["message"]) == 1024
    other = event_object("ns", "x" * 253, "uid-1", Change("Warning", "NodeLost", "m"))
    assert other["metadata"]["name"] != event["metadata"]["name"], "each event its own object"
    kubernetes_validate.validate(event, "1.30", strict=True)
