"""planner.shares: weighted fair shares, the fewest deployments to ask for room, speed under a share."""

from __future__ import annotations

import pytest

from amp4ec.planner.shares import Holding, fair_share, scaled, victims
from amp4ec.planner.types import NodeCapacity


def test_fair_share_is_weighted_and_refuses_a_weight_of_zero() -> None:
    assert fair_share(1.0, 1, [1, 1, 1]) == 0.25
    assert fair_share(1.0, 31, [1] * 10) == pytest.approx(31 / 41)
    assert fair_share(2.0, 1, []) == 2.0
    with pytest.raises(ValueError, match="weight"):
        fair_share(1.0, 0, [1])


def test_victims_are_the_fewest_lower_priorities_above_their_fair_share() -> None:
    rows = [
        Holding("big", 0, 0.6, 0.2),
        Holding("small", 0, 0.3, 0.2),
        Holding("modest", 0, 0.2, 0.2),  # at its fair share: never asked
        Holding("peer", 5, 0.9, 0.2),  # not lower than 5
    ]
    assert victims(rows, 5, 0.5) == ["big"]
    assert victims(rows, 5, 0.8) == ["big", "small"]
    assert victims(rows, 5, 1.0) == []  # even both would not free enough
    assert victims(rows, 0, 0.1) == []


def test_a_share_scales_speed_up_to_one_core_and_never_beyond_the_node() -> None:
    node = NodeCapacity("n", cpu=2.0, memory_bytes=1, speed=1.5, overhead_ms=0.4)
    assert scaled(node, 0.5) == NodeCapacity("n", cpu=0.5, memory_bytes=1, speed=0.75, overhead_ms=0.4)
    assert scaled(node, 3.0).cpu == 2.0 and scaled(node, 3.0).speed == 1.5
    assert scaled(NodeCapacity("u", cpu=1.0, memory_bytes=1), 0.5).speed == 0.0  # unknown stays unknown
