"""Sharing a node between deployments: weighted fair shares, whom to ask to make room, and what a
CPU share does to a node's speed. Plain numbers in, plain numbers out (the operator's
``placement.py`` and the ``multi-tenant`` benchmark use the same rules).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from amp4ec.planner.types import NodeCapacity

__all__ = ["Holding", "fair_share", "millicores", "scaled", "victims"]


def fair_share(capacity: float, weight: int, others: Iterable[int]) -> float:
    """A deployment's fair share of ``capacity``: its ``weight`` over the weights of everyone who
    wants the node (``others`` and itself)."""
    if weight <= 0:
        raise ValueError(f"weight: expected > 0, got {weight}")
    return capacity * weight / (weight + sum(others))


def millicores(cores: float) -> float:
    """``cores`` rounded down to whole millicores (a Pod's CPU request), float noise forgiven."""
    return math.floor(max(0.0, cores) * 1000 + 1e-6) / 1000


@dataclass(frozen=True)
class Holding:
    """What one deployment holds on a node, and what it is entitled to there."""

    name: str
    priority: int
    held: float
    fair: float


def victims(holdings: Sequence[Holding], priority: int, shortfall: float) -> list[str]:
    """The fewest deployments of lower priority than ``priority``, each above its fair share,
    whose move off the node frees ``shortfall``: lowest priority first, then the largest holding,
    then the name. Empty when even all of them would not free enough (nobody is asked in vain)."""
    eligible = sorted(
        (h for h in holdings if h.priority < priority and h.held > h.fair + 1e-9),
        key=lambda h: (h.priority, -h.held, h.name),
    )
    chosen, freed = [], 0.0
    for h in eligible:
        if freed >= shortfall - 1e-9:
            break
        chosen.append(h.name)
        freed += h.held
    return chosen if freed >= shortfall - 1e-9 else []


def scaled(cap: NodeCapacity, cpu: float) -> NodeCapacity:
    """``cap`` given a share of ``cpu`` cores (at most its own): the measured speed (at
    ``cap.cpu``) scales with the share, up to one core (a stage runs one forward thread).
    ``overhead_ms`` is in reference-core ms and does not change."""
    cpu = min(cap.cpu, cpu)
    speed = cap.speed * min(cpu, 1.0) / min(cap.cpu, 1.0) if cap.speed > 0 and cap.cpu > 0 else 0.0
    return replace(cap, cpu=cpu, speed=speed)
