"""placement.py on plain data: what nodes hold, each deployment's budget, pressure, Unschedulable."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from amp4ec.operator.placement import (
    Resources,
    Tenant,
    budgets,
    holdings,
    narrow,
    node_allocatable,
    parse_cpu,
    parse_memory,
    pod_requests,
    pressure,
    shortage,
    tenants_of,
    unschedulable,
)
from amp4ec.operator.planstatus import PlanRecord
from amp4ec.planner.types import NodeCapacity

GI = 2**30
EDGE = {"amp4ec.io/edge": "true"}


def shard(
    ns: str, deployment: str, node: str, cpu: str, memory: str = "300Mi", bound: bool = True, plan: str = "p1"
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "containers": [{"name": "shard", "resources": {"requests": {"cpu": cpu, "memory": memory}}}],
    }
    if bound:
        spec["nodeName"] = node
    labels = {"amp4ec.io/deployment": deployment, "amp4ec.io/plan": plan, "amp4ec.io/pipeline": "0"}
    return {"metadata": {"name": f"{deployment}-{node}", "namespace": ns, "labels": labels}, "spec": spec}


def tenant(name: str, priority: int = 0, ns: str = "ns") -> Tenant:
    return Tenant(ns, name, priority, EDGE)


NODES = {n: (Resources(1.0, 2 * GI), {**EDGE, "kubernetes.io/hostname": n}) for n in ("a", "b")}


@pytest.mark.parametrize(
    ("text", "cores"), [("2", 2.0), ("1.5", 1.5), ("250m", 0.25), ("100000u", 0.1), ("5e8n", 0.5)]
)
def test_cpu_quantities(text: str, cores: float) -> None:
    assert parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("2Gi", 2 * GI), ("512Mi", 512 << 20), ("1G", 10**9), ("1e3", 1000), ("128974848", 128974848)],
)
def test_memory_quantities(text: str, nbytes: int) -> None:
    assert parse_memory(text) == nbytes


def test_allocatable_and_requests_as_the_scheduler_counts_them() -> None:
    node = {
        "status": {
            "allocatable": {"cpu": "3800m", "memory": "7Gi"},
            "capacity": {"cpu": "4", "memory": "8Gi"},
        }
    }
    assert node_allocatable(node) == Resources(3.8, 7 * GI)
    assert node_allocatable({"status": {"capacity": {"cpu": "4", "memory": "8Gi"}}}) == Resources(4.0, 8 * GI)
    assert node_allocatable({"status": {}}) is None
    pod = {
        "spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "200m", "memory": "100Mi"}}},
                {"resources": {"requests": {"cpu": "100m"}}},
            ],
            "initContainers": [{"resources": {"requests": {"cpu": "50m", "memory": "1Gi"}}}],
        }
    }
    assert pod_requests(pod) == Resources(pytest.approx(0.3), GI)  # type: ignore[arg-type]


def test_holdings_count_bound_pods_and_shards_created_for_a_node_but_not_other_unbound_pods() -> None:
    other = {
        "metadata": {"name": "web"},
        "spec": {"nodeName": "a", "containers": [{"resources": {"requests": {"cpu": "1"}}}]},
    }
    floating = {
        "metadata": {"name": "job"},
        "spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}]},
    }
    done = {**shard("ns", "old", "a", "500m"), "status": {"phase": "Succeeded"}}
    held = holdings([other, floating, done, shard("ns", "x", "a", "250m", bound=False)])
    assert [(h.owner, h.requests.cpu, h.bound) for h in held["a"]] == [
        (None, 1.0, True),
        (("ns", "x"), 0.25, False),
    ]
    assert "b" not in held


def test_a_lone_deployment_may_take_a_whole_node_and_a_newcomer_its_fair_share_of_what_is_free() -> None:
    first, second = tenant("first"), tenant("second")
    alone = budgets(first, [], NODES, {})
    assert (alone["a"].cpu, alone["a"].fair_cpu) == (1.0, 1.0)
    held = holdings([shard("ns", "first", "a", "1")])
    after = budgets(second, [first], NODES, held)
    assert after["a"].cpu == 0.0 and after["a"].holders == (("ns/first", 1.0),)
    assert after["b"].cpu == 0.5  # fair share of a node two deployments want
    # The recorded plan's own bound Pods count as held: a new plan is made beside it.
    assert budgets(first, [second], NODES, held, current_plan="p1")["a"].cpu == 0.0


def test_own_pods_of_a_plan_not_recorded_hold_nothing() -> None:
    """Pods of a roll-out an operator restart cut short (no plan recorded), or of an older plan
    draining, are on their way out: the plan decided again adopts them, so they must not shrink
    it (they once kept a restarted operator at InsufficientCapacity)."""
    me, other = tenant("me"), tenant("other")
    held = holdings([shard("ns", "me", "a", "1", plan="p0"), shard("ns", "other", "b", "500m")])
    assert budgets(me, [other], NODES, held)["a"].free_cpu == 1.0  # nothing recorded
    assert budgets(me, [other], NODES, held, current_plan="p1")["a"].free_cpu == 1.0  # an older plan
    assert budgets(me, [other], NODES, held, current_plan="p0")["a"].free_cpu == 0.0  # the recorded one
    # Another deployment's Pods hold what they hold, whatever plan they belong to.
    assert budgets(me, [other], NODES, held)["b"].free_cpu == pytest.approx(0.5)


def test_priority_weighs_the_fair_share_and_reclaims_from_the_fewest_lower_deployments_over_theirs() -> None:
    low, also_low, high = tenant("low"), tenant("also-low"), tenant("high", priority=1)
    held = holdings([shard("ns", "low", "a", "700m"), shard("ns", "also-low", "a", "300m")])
    b = budgets(high, [low, also_low], NODES, held)["a"]
    assert b.fair_cpu == pytest.approx(0.5)  # weights 2, 1, 1
    # Moving "low" off (the largest holding) frees enough: it alone is asked.
    assert b.victims == (("ns", "low"),) and b.reclaim_cpu == pytest.approx(0.7)
    assert b.memory == 2 * GI - (300 << 20)  # "low" moves off: its memory counts as free too
    assert b.cpu == 0.5  # min(fair share, free 0 + reclaimable)
    assert budgets(high, [low, also_low], NODES, held, preempt=False)["a"].cpu == 0.0
    # An equal priority waits: nothing is reclaimable from a peer.
    peer = budgets(tenant("peer"), [low, also_low], NODES, held)["a"]
    assert (peer.cpu, peer.victims, peer.fair_cpu) == (0.0, (), pytest.approx(1 / 3))
    # A lower deployment within its own fair share is never asked to move.
    modest = holdings([shard("ns", "low", "a", "300m"), shard("ns", "other", "a", "600m")])
    b = budgets(high, [low], NODES, modest)["a"]  # low's fair share 1/3; "other" is no tenant
    assert b.victims == () and b.cpu == pytest.approx(0.1)


def test_unbound_claims_block_equal_or_lower_priorities_only() -> None:
    low, high = tenant("low"), tenant("high", priority=10)
    held = holdings(
        [shard("ns", "high", "a", "600m", bound=False), shard("ns", "low", "a", "400m", bound=False)]
    )
    assert budgets(low, [high], NODES, held)["a"].free_cpu == pytest.approx(0.4)  # high's claim counts
    assert budgets(high, [low], NODES, held)["a"].free_cpu == pytest.approx(
        1.0
    )  # low's does not, nor its own


def test_pressure_names_the_waiting_higher_priority_and_only_for_a_holder_over_its_fair_share() -> None:
    low, small, high = tenant("low"), tenant("small"), tenant("high", priority=10)
    held = holdings(
        [
            shard("ns", "low", "a", "900m"),
            shard("ns", "small", "a", "100m"),
            shard("ns", "high", "a", "300m", bound=False),
        ]
    )
    why = pressure(low, [small, high], NODES, held, "p1")
    assert set(why) == {"a"} and "ns/high (priority 10) waits for 0.30 cpu on a" in why["a"]
    assert pressure(small, [low, high], NODES, held, "p1") == {}  # at or under its fair share
    assert pressure(high, [low, small], NODES, held, "p1") == {}
    assert pressure(low, [small, high], NODES, held, "p2") == {}  # a plan it left drains there


def test_narrow_cuts_measured_capacity_to_the_budget_and_says_why_a_node_is_left_out() -> None:
    measured = {
        "a": NodeCapacity("a", 1.0, GI, speed=2.0, overhead_ms=0.5),
        "b": NodeCapacity("b", 1.0, GI, speed=2.0),
        "c": NodeCapacity("c", 1.0, GI, speed=2.0),  # its Node reports no allocatable
    }
    held = holdings([shard("ns", "first", "a", "950m"), shard("ns", "other", "b", "500m", memory="1900Mi")])
    b = budgets(tenant("me"), [tenant("first"), tenant("other")], NODES, held)
    kept, left = narrow(measured, b, min_cpu=0.1, overhead_bytes=256 << 20)
    assert set(kept) == {"c"} and kept["c"] == measured["c"]
    assert "0.05 cpu to take" in left["a"] and "ns/first 0.95" in left["a"]
    assert "MiB free, less than a shard's runtime" in left["b"]
    kept, _ = narrow(measured, b, min_cpu=0.01, overhead_bytes=0)
    assert kept["a"].cpu == pytest.approx(0.05) and kept["a"].speed == pytest.approx(0.1)  # 2.0 × 0.05
    assert kept["a"].overhead_ms == 0.5  # reference-core ms: independent of the share
    assert "waiting for at least 0.1 cpu and 300 MiB" in shortage(left, 0.1, 300 << 20)


def test_tenants_read_leniently_and_failed_ones_do_not_compete() -> None:
    objs = [
        {"metadata": {"namespace": "a", "name": "x"}, "spec": {"priority": 5, "nodeSelector": {"zone": "1"}}},
        {"metadata": {"namespace": "a", "name": "y"}, "spec": {"priority": "high"}},
        {"metadata": {"namespace": "a", "name": "z"}, "spec": {}, "status": {"phase": "Failed"}},
    ]
    got = tenants_of(objs, {"amp4ec.io/edge": "true"})
    assert [(t.name, t.priority, dict(t.selector)) for t in got] == [
        ("x", 5, {"amp4ec.io/edge": "true", "zone": "1"}),
        ("y", 0, {"amp4ec.io/edge": "true"}),
    ]


def test_unschedulable_shards_name_stage_node_and_the_schedulers_message() -> None:
    pod = shard("ns", "d", "a", "1", bound=False)
    pod["metadata"]["labels"]["amp4ec.io/stage"] = "1"
    message = (
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector."
    )
    since = "2026-01-01T00:00:00Z"
    pod["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": since,
            }
        ],
    }
    (p,) = unschedulable([pod, shard("ns", "d", "b", "1")])
    assert p.describe() == f"stage 1 (pipeline 0) on a: {message}"
    assert p.waited_s(datetime.datetime(2026, 1, 1, 0, 1, tzinfo=datetime.timezone.utc)) == 60


def test_a_plan_without_its_lost_pipelines_keeps_its_id_and_what_is_left() -> None:
    record = PlanRecord.from_status(
        {
            "id": "abc",
            "stages": [
                {
                    "pipeline": p,
                    "stage": 0,
                    "node": n,
                    "firstBlock": 0,
                    "lastBlock": 3,
                    "cpu": 1.0,
                    "memoryBytes": 1,
                    "predictedMs": ms,
                }
                for p, (n, ms) in enumerate([("a", 10.0), ("b", 20.0), ("c", 40.0)])
            ],
            "predicted": {"throughputRps": 175.0, "latencyMs": 10.5, "bottleneckMs": 40.0},
        }
    )
    assert record is not None
    left = record.without({"a"})
    assert left is not None and left.id == "abc" and left.nodes == ("b", "c")
    assert left.throughput_rps == pytest.approx(75.0) and left.latency_ms == 20.0
    assert record.without({"x"}) is None and record.without({"a", "b", "c"}) is None
