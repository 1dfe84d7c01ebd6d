"""A reconciliation on shared nodes, against the in-memory API of test_hardening.py (no processes):
plans cut to what is left, a deployment that fits nowhere waits saying why, an Unschedulable shard
is named in status, a higher priority asks the fewest lower ones to make room."""

from __future__ import annotations

import asyncio
from typing import Any

from amp4ec.operator.nudge import REQUEST_ANNOTATION
from tests.operator.test_hardening import FakeKube, _deps, _step

SPEC = {"model": {"name": "mobilenet_v2"}, "objective": "latency", "maxStages": 1}


def kube_with(*nodes: str, cpu: str = "1") -> FakeKube:
    kube = FakeKube()
    for node in nodes:
        kube.add_node(node)
        obj = kube.objects[("Node", None, node)]
        obj["metadata"]["labels"]["kubernetes.io/hostname"] = node
        obj["status"]["allocatable"] = {"cpu": cpu, "memory": "2Gi"}
    return kube


def foreign_pod(node: str, cpu: str) -> dict[str, Any]:
    """Another workload, bound to ``node``."""
    return {
        "kind": "Pod",
        "metadata": {"name": f"web-{node}", "namespace": "shop"},
        "spec": {
            "nodeName": node,
            "containers": [{"resources": {"requests": {"cpu": cpu, "memory": "1Gi"}}}],
        },
        "status": {"phase": "Running"},
    }


def pods(kube: FakeKube, uid: str) -> list[dict[str, Any]]:
    return [
        o
        for (k, _, _), o in kube.objects.items()
        if k == "Pod" and any(r["uid"] == uid for r in o["metadata"].get("ownerReferences", ()))
    ]


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_a_plan_takes_what_other_workloads_leave_and_its_pods_request_exactly_that() -> None:
    kube = kube_with("edge-a", "edge-b")
    kube.objects[("Pod", "shop", "web-edge-a")] = foreign_pod("edge-a", "700m")
    kube.objects[("Pod", "shop", "web-edge-b")] = foreign_pod("edge-b", "950m")
    status: dict[str, Any] = {}
    asyncio.run(_step(_deps(kube), "lat", "uid-1", SPEC, status))
    (stage,) = status["rollout"]["stages"]
    assert (stage["node"], stage["cpu"]) == ("edge-a", 0.3)  # edge-b's 0.05 is under the 0.1 minimum
    (pod,) = pods(kube, "uid-1")
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "300m"


def test_a_deployment_that_fits_nowhere_waits_and_says_what_it_needs_and_who_holds_the_room() -> None:
    kube = kube_with("edge-a")
    kube.objects[("Pod", "shop", "web-edge-a")] = foreign_pod("edge-a", "950m")
    status: dict[str, Any] = {}
    outcome = asyncio.run(_step(_deps(kube), "lat", "uid-1", SPEC, status))
    assert outcome.reason == "InsufficientCapacity" and outcome.retry_s is not None
    planned = condition(status, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "InsufficientCapacity"
    assert "waiting for at least 0.1 cpu" in planned["message"]
    assert "edge-a: 0.05 cpu to take" in planned["message"] and "other Pods 0.95" in planned["message"]
    assert status["phase"] == "Planning" and not pods(kube, "uid-1")


def test_an_unschedulable_shard_is_named_with_its_stage_node_and_the_schedulers_reason() -> None:
    kube = kube_with("edge-a", "edge-b")
    status: dict[str, Any] = {}
    deps = _deps(kube)
    asyncio.run(_step(deps, "lat", "uid-1", SPEC, status))
    (pod,) = pods(kube, "uid-1")
    message = (
        "0/2 nodes are available: 1 Insufficient memory, 1 node(s) didn't match Pod's node affinity/selector."
    )
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        ],
    }
    outcome = asyncio.run(_step(deps, "lat", "uid-1", SPEC, status))
    shards = condition(status, "ShardsReady")
    assert outcome.reason == "ShardsStarting" and shards["reason"] == "Unschedulable"
    node = pod["spec"]["nodeSelector"]["kubernetes.io/hostname"]
    assert f"stage 0 (pipeline 0) on {node}: {message}" in shards["message"]
    assert condition(status, "Ready")["reason"] == "Unschedulable"


def test_an_equal_waits_but_a_higher_priority_asks_the_lower_deployment_over_its_fair_share() -> None:
    kube = kube_with("edge-a")
    deps = _deps(kube)
    status: dict[str, dict[str, Any]] = {"big": {}, "small": {}, "urgent": {}}

    def create(name: str, spec: dict[str, Any]) -> Any:
        kube.objects[("InferenceDeployment", "ml", name)] = {
            "metadata": {"name": name, "namespace": "ml"},
            "spec": spec,
        }
        outcome = asyncio.run(_step(deps, name, f"uid-{name}", spec, status[name]))
        for pod in pods(kube, f"uid-{name}"):
            pod["spec"]["nodeName"] = "edge-a"  # bound by the scheduler
        return outcome

    create("big", SPEC)
    assert status["big"]["rollout"]["stages"][0]["cpu"] == 1.0  # alone: the whole node
    assert create("small", SPEC).reason == "InsufficientCapacity"  # an equal waits, nobody is asked
    assert not [
        o
        for (k, _, _), o in kube.objects.items()
        if k == "InferenceDeployment" and "annotations" in o["metadata"]
    ]
    # Priority 2 (weight 3 of 5: a fair share of 0.6 core) finds no room free, and reclaims it.
    create("urgent", {**SPEC, "priority": 2})
    assert status["urgent"]["rollout"]["stages"][0]["cpu"] == 0.6
    asked = [
        name
        for (k, _, name), o in kube.objects.items()
        if k == "InferenceDeployment" and REQUEST_ANNOTATION in (o["metadata"].get("annotations") or {})
    ]
    assert asked == ["big"]  # above its fair share (0.2), and moving it frees enough alone


def test_pods_of_a_plan_never_recorded_are_deleted_before_the_first_roll_out() -> None:
    """An operator stopped after creating a plan's Pods but before recording the plan leaves
    them; the restarted one may choose another plan (a fresh profile), and those Pods would hold
    its room for ever. Before the first recorded plan, Pods of any other plan go; the chosen
    plan's stay (adopted)."""
    kube = kube_with("edge-a", "edge-b")
    status: dict[str, Any] = {}
    asyncio.run(_step(_deps(kube), "lat", "uid-1", SPEC, status))
    chosen = status["rollout"]["id"]
    (pod,) = pods(kube, "uid-1")
    stray = {
        **pod,
        "metadata": {**pod["metadata"], "name": "lat-old", "labels": {**pod["metadata"]["labels"]}},
    }
    stray["metadata"]["labels"]["amp4ec.io/plan"] = "an-older-plan"
    kube.objects[("Pod", pod["metadata"]["namespace"], "lat-old")] = stray
    asyncio.run(_step(_deps(kube), "lat", "uid-1", SPEC, {}))  # restarted: nothing recorded
    names = {p["metadata"]["name"] for p in pods(kube, "uid-1")}
    assert "lat-old" not in names and pod["metadata"]["name"] in names
    assert all(p["metadata"]["labels"]["amp4ec.io/plan"] == chosen for p in pods(kube, "uid-1"))
