"""The paper strategy reproduces a hand-computed example (capabilities, split, refinement, scores)."""

from __future__ import annotations

import pytest

from amp4ec.planner import LayerProfile, NodeCapacity, SchedulerHistory, plan
from amp4ec.planner.cost import CostModel
from amp4ec.planner.paper import capabilities, imbalance, ralos_split, schedule

MB = 1_000_000
# The paper's three node profiles: 1.0 CPU / 1 GB, 0.6 CPU / 512 MB, 0.4 CPU / 512 MB.
NODES = [
    NodeCapacity("high", 1.0, 1000 * MB),
    NodeCapacity("medium", 0.6, 500 * MB),
    NodeCapacity("low", 0.4, 500 * MB),
]
# Ten equal layers: cost (flops) 10 each, 1 MB of parameters each.
BLOCKS = [LayerProfile(f"l{i}", flops=10, param_bytes=MB, out_bytes=1000, compute_ms=5.0) for i in range(10)]


def test_capabilities_by_hand():
    # S = 0.6·cpu/1.0 + 0.4·mem/1000: 1.0, 0.36 + 0.2, 0.24 + 0.2
    assert capabilities(NODES) == pytest.approx([1.0, 0.56, 0.44])


def test_greedy_split_then_refinement_by_hand():
    costs = [10.0] * 10
    # Shares 0.5 / 0.28 / 0.22 → cumulative targets 50, 78: closest boundaries 5 and 8.
    greedy, refined = ralos_split(costs, [1.0, 0.56, 0.44])
    assert greedy == [5, 8, 10]
    assert imbalance(costs, greedy) == pytest.approx((50 / 3 + 10 / 3 + 40 / 3) / 3)
    # Refinement: boundary 0 left (40/40/20, 8.89), boundary 1 left (40/30/30, 4.44); then no
    # single move improves (30/40/30 only ties).
    assert refined == [4, 7, 10]
    assert imbalance(costs, refined) == pytest.approx(40 / 9)


def test_scheduler_scores_by_hand():
    cm = CostModel(BLOCKS, NODES)
    parts = [(0, 3), (4, 6), (7, 9)]
    got = schedule(cm, parts, [10.0] * 10, [0, 1, 2], None)
    # cpu_need = 2.0 CPU × cost share: 0.8, 0.6, 0.6; memory always suffices (S_R mem term 1).
    # No history: 0.1·0.5; no tasks: 0.5/(1+0) = 0.5; load 0: 0.2.
    first = got[0].scores
    assert first["high"] == pytest.approx(0.2 * 1.0 + 0.2 + 0.05 + 0.5)  # 0.95
    assert first["medium"] == pytest.approx(0.2 * (0.5 * 0.6 / 0.8 + 0.5) + 0.75)  # 0.925
    assert first["low"] == pytest.approx(0.2 * (0.5 * 0.4 / 0.8 + 0.5) + 0.75)  # 0.9
    assert got[1].scores == pytest.approx({"medium": 0.95, "low": 0.2 * (0.5 * 0.4 / 0.6 + 0.5) + 0.75})
    assert [cm.names[a.node] for a in got] == ["high", "medium", "low"]


def test_paper_plan_by_hand():
    got = plan(BLOCKS, NODES, strategy="paper")
    assert [(s.node, s.first_block, s.last_block) for s in got.stages] == [
        ("high", 0, 3),
        ("medium", 4, 6),
        ("low", 7, 9),
    ]
    assert any("flops" in n for n in got.notes)


def test_history_changes_the_schedule_by_hand():
    history = SchedulerHistory(exec_times_s={"medium": [0.25, 0.25]}, task_counts={"high": 1})
    got = plan(BLOCKS, NODES, strategy="paper", history=history)
    # high: 0.2 + 0.2 + 0.05 + 0.5/3 = 0.617 loses every time it competes; medium has S_P = 1/1.25.
    # Partition 0 → medium (0.175 + 0.2 + 0.08 + 0.5 = 0.955), 1 → low (0.917), 2 → high.
    assert [s.node for s in got.stages] == ["medium", "low", "high"]
    assert history.task_counts == {"high": 1}, "planning never mutates the history"


def test_overloaded_node_is_excluded():
    nodes = [NODES[0], NODES[1], NodeCapacity("low", 0.4, 500 * MB, load=0.9)]
    got = plan(BLOCKS, nodes, strategy="paper")
    assert [s.node for s in got.stages] == ["high", "medium"]
    assert any("load" in n for n in got.notes)


def test_history_helpers_keep_the_last_hundred():
    history = SchedulerHistory()
    for i in range(150):
        history.record_execution("a", float(i))
    assert len(history.exec_times_s["a"]) == 100
    assert history.mean_exec_s("a") == pytest.approx(sum(range(50, 150)) / 100)
    assert history.mean_exec_s("b") is None
    history.record_plan(plan(BLOCKS, NODES, strategy="paper"))
    assert history.task_counts == {"high": 1, "medium": 1, "low": 1}
