"""The operator's decision and fault detection, on plain data (no API server, no kopf)."""

from __future__ import annotations

from typing import Any

import pytest

from amp4ec.operator.decide import Keep, Rollout, as_plan, choose
from amp4ec.operator.faults import ExclusionBackoff, Fault, LostNodes, node_faults, shard_state
from amp4ec.operator.planstatus import PlacedStage, PlanRecord
from amp4ec.planner import evaluate
from amp4ec.planner.types import LayerProfile, NodeCapacity

BLOCKS = tuple(LayerProfile(f"b{i}", 10**6, 10**5, 10**4, 5.0) for i in range(4))


def record(plan_id: str, node: str, throughput: float = 50.0, latency: float = 20.0) -> PlanRecord:
    stage = PlacedStage(0, 0, node, 0, 3, 1.0, 10**6, latency)
    return PlanRecord(plan_id, "throughput", "optimal", (stage,), throughput, latency, latency)


def nodes(*names: str, speed: float = 1.0) -> list[NodeCapacity]:
    return [NodeCapacity(n, 1.0, 4 << 30, speed=speed) for n in names]


def decide(current: PlanRecord | None, proposal: PlanRecord, **kw: Any) -> Keep | Rollout:
    args: dict[str, Any] = {
        "threshold": 0.1,
        "hysteresis": True,
        "faults": {},
        "blocks": BLOCKS,
        "nodes": nodes("a", "b"),
    }
    args.update(kw)
    return choose(current, proposal, as_plan(proposal), **args)


def test_first_plan_rolls_out() -> None:
    d = decide(None, record("p1", "a"))
    assert isinstance(d, Rollout) and d.plan.id == "p1"


def test_same_plan_is_kept() -> None:
    assert decide(record("p1", "a"), record("p1", "a")) == Keep()


def test_a_plan_no_better_than_the_current_one_repriced_is_kept() -> None:
    # The proposal predicts what the current plan, re-priced on equal nodes, does: no gain.
    same = evaluate(as_plan(record("p1", "a")), BLOCKS, nodes("a", "b"))
    proposal = record("p2", "b", throughput=same.throughput_rps, latency=same.latency_ms)
    assert decide(record("p1", "a"), proposal) == Keep()


def test_a_much_better_plan_rolls_out_with_the_planners_reason() -> None:
    # The current plan's node is now 100x slower: re-priced, the proposal wins by far.
    slow = [NodeCapacity("a", 1.0, 4 << 30, speed=0.01), *nodes("b")]
    d = decide(record("p1", "a"), record("p2", "b"), nodes=slow)
    assert isinstance(d, Rollout) and "throughput" in d.reason


def test_p95_plans_are_compared_by_simulated_p95_at_the_target_rate() -> None:
    def p95_record(plan_id: str, node: str) -> PlanRecord:
        stage = PlacedStage(0, 0, node, 0, 3, 1.0, 10**6, 20.0)
        return PlanRecord(plan_id, "p95", "optimal", (stage,), 50.0, 20.0, 20.0)

    current, proposal = p95_record("p1", "a"), p95_record("p2", "b")
    slow = [NodeCapacity("a", 1.0, 4 << 30, speed=0.01), *nodes("b")]
    d = decide(current, proposal, nodes=slow, rate_rps=10.0)
    assert isinstance(d, Rollout) and d.reason == "p95: the current plan no longer sustains 10 req/s"
    assert decide(current, proposal, rate_rps=10.0) == Keep()  # equal nodes: the same p95
    assert isinstance(decide(current, proposal, nodes=nodes("a", "b", speed=0.5), rate_rps=1.0), Keep)
    half = [NodeCapacity("a", 1.0, 4 << 30, speed=0.5), *nodes("b")]  # both sustain 5 req/s
    d = decide(current, proposal, nodes=half, rate_rps=5.0)
    assert isinstance(d, Rollout) and d.reason.startswith("p95 improves by")
    assert isinstance(decide(current, proposal, nodes=half, rate_rps=5.0, threshold=0.9), Keep)


def test_a_lost_node_rolls_out_whatever_the_gain() -> None:
    fault = Fault("a", "NodeDeleted", "node a was deleted", lost=True)
    d = decide(record("p1", "a"), record("p2", "b"), faults={"a": fault}, nodes=nodes("b"))
    assert isinstance(d, Rollout) and d.reason == "node a was deleted"


def test_a_restarting_shard_does_not_move_the_plan() -> None:
    fault = Fault("a", "ShardRestarting", "node a: exited", lost=False)
    assert decide(record("p1", "a"), record("p2", "b"), faults={"a": fault}) == Keep()


def test_a_spec_change_rolls_out_whatever_differs() -> None:
    d = decide(record("p1", "a"), record("p2", "b"), hysteresis=False)
    assert isinstance(d, Rollout) and d.reason == "the spec changed"


def test_a_current_plan_on_a_node_without_capacity_is_replaced() -> None:
    d = decide(record("p1", "gone"), record("p2", "b"))
    assert isinstance(d, Rollout)


def node(name: str, ready: str = "True") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": ready}]}}


def pod(name: str, on: str, *, ready: bool = True, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": on}},
        "status": {"conditions": [{"type": "Ready", "status": str(ready)}], **status},
    }


def crashed(reason: str | None, restarts: int) -> dict[str, Any]:
    state = {"waiting": {"reason": reason}} if reason else {"running": {}}
    return {
        "containerStatuses": [
            {
                "ready": False,
                "restartCount": restarts,
                "state": state,
                "lastState": {"terminated": {"exitCode": 1}},
            }
        ]
    }


def test_healthy_nodes_have_no_fault() -> None:
    assert node_faults(["a"], [node("a")], [pod("s", "a")]) == {}


@pytest.mark.parametrize(
    ("nodes_", "pods", "stale", "reason", "lost"),
    [
        ([], [pod("s", "a")], None, "NodeDeleted", True),
        ([node("a", "Unknown")], [pod("s", "a")], None, "NodeNotReady", True),
        (
            [node("a")],
            [pod("s", "a", ready=False, phase="Failed", reason="Evicted")],
            None,
            "ShardFailed",
            True,
        ),
        (
            [node("a")],
            [pod("s", "a", ready=False, **crashed("CrashLoopBackOff", 2))],
            None,
            "ShardCrashLooping",
            True,
        ),
        ([node("a")], [pod("s", "a", ready=False, **crashed(None, 1))], None, "ShardRestarting", False),
        # Node still Ready, shard down and metrics stale: lost without waiting for NotReady.
        ([node("a")], [pod("s", "a", ready=False)], {"a": "capacity metrics 30 s old"}, "NodeLost", True),
    ],
)
def test_faults_name_the_node_and_say_whether_it_is_lost(
    nodes_: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    stale: dict[str, str] | None,
    reason: str,
    lost: bool,
) -> None:
    (fault,) = node_faults(["a"], nodes_, pods, stale).values()
    assert (fault.node, fault.reason, fault.lost) == ("a", reason, lost)
    assert "a" in fault.message


def test_stale_metrics_alone_are_no_fault_while_the_shards_serve() -> None:
    assert node_faults(["a"], [node("a")], [pod("s", "a")], {"a": "no capacity metrics"}) == {}


def test_a_starting_pod_is_no_fault() -> None:
    assert shard_state(pod("s", "a", ready=False, phase="Pending")) is None


def test_exclusion_backs_off_and_is_forgiven() -> None:
    b = ExclusionBackoff(initial_s=30, max_s=100)
    assert b.fail("a", 0) == 30 and b.excluded(10) == {"a"}
    assert b.fail("a", 20) == 30, "the same fault seen again starts no new round"
    assert b.excluded(31) == set()
    assert b.fail("a", 40) == 100, "failing again soon after: twice as long, capped"
    assert b.fail("a", 1000) == 1030, "after staying out of trouble: from the start again"


def test_a_node_lost_by_stale_metrics_stays_named_while_the_plan_uses_it_and_it_is_down() -> None:
    lost = LostNodes()
    fault = Fault("a", "NodeLost", "node a: 1 shard(s) not ready and capacity metrics 30 s old", lost=True)
    lost.remember("uid", [fault, Fault("b", "ShardRestarting", "node b: exited", lost=False)])
    # A later reconciliation (no Prometheus query) sees only a restarting shard on a.
    faults = {"a": Fault("a", "ShardRestarting", "node a: exited", lost=False)}
    lost.recall("uid", faults, in_use=["a", "c"], down=["a"])
    assert faults == {"a": fault}
    lost.recall("other", faults := {}, in_use=["a"], down=["a"])
    assert faults == {}, "remembered per deployment"
    lost.recall("uid", faults := {}, in_use=["c"], down=["a"])  # the new plan left a
    assert faults == {}
    lost.recall("uid", faults := {}, in_use=["a"], down=["a"])
    assert faults == {}, "forgotten once the plan left it"


def test_a_lost_node_that_came_back_is_forgotten() -> None:
    lost = LostNodes()
    lost.remember("uid", [Fault("a", "NodeLost", "node a: stale", lost=True)])
    lost.recall("uid", faults := {}, in_use=["a"], down=[])
    assert faults == {}
    lost.recall("uid", faults := {}, in_use=["a"], down=["a"])
    assert faults == {}
