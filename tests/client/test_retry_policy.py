"""The retry budget, outlier ejection and back-off on plain data (a fake clock, no I/O);
the fault flag; a client told nothing will serve."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from amp4ec.client import Client, Endpoint
from amp4ec.errors import InvalidSpec, ShardUnavailable
from amp4ec.local.supervisor import parse_fault
from amp4ec.retry import Outlier, RetryBudget, RetryPolicy, backoff_s
from amp4ec.wire.transport import TransportSecurity

PLAINTEXT = TransportSecurity.plaintext()  # nothing listens on these addresses: no handshake to test


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_allows_the_reserve_then_a_fraction_of_requests() -> None:
    clock = Clock()
    policy = RetryPolicy(budget_ratio=0.2, budget_min_per_s=1.0, budget_window_s=10.0)
    budget = RetryBudget(policy, clock)
    # No traffic yet: the reserve (1/s over 10 s) and not one more.
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]
    for _ in range(50):  # 50 requests earn 10 more retries (20%)
        budget.record_request()
    assert [budget.try_retry() for _ in range(11)] == [True] * 10 + [False]
    # A refused retry withdrew nothing: still refused, until the window moves on.
    assert not budget.try_retry()
    clock.t += 10.5
    assert budget.try_retry()


def test_budget_never_exceeds_its_fraction_of_heavy_traffic() -> None:
    clock = Clock()
    budget = RetryBudget(RetryPolicy(budget_ratio=0.1, budget_min_per_s=0.5, budget_window_s=10.0), clock)
    granted = 0
    for _ in range(2000):  # 2000 requests over 20 s, every one asking for a retry
        clock.t += 0.01
        budget.record_request()
        granted += budget.try_retry()
    # per 10 s window: 10% of 1000 requests + 5 reserve
    assert 200 <= granted <= 2 * (100 + 5)


def test_outlier_ejected_after_consecutive_failures_only() -> None:
    clock = Clock()
    o = Outlier(RetryPolicy(eject_after=3, base_ejection_s=1.0, max_ejection_s=4.0), clock)
    assert not o.failure() and not o.failure()
    o.success()  # the run of failures is broken
    assert not o.failure() and not o.failure() and o.admitted
    assert o.failure() and not o.admitted
    assert o.probe_due_in() == pytest.approx(1.0)
    clock.t += 1.0
    assert o.probe_due_in() == 0
    o.health_checked(False)  # still down: ejected again, twice as long
    assert not o.admitted and o.probe_due_in() == pytest.approx(2.0)
    clock.t += 2.0
    o.health_checked(True)
    assert o.admitted
    assert o.failure() and not o.admitted  # on probation: one failure ejects it again
    assert o.ejection_s == 4.0  # 1, 2, 4 (capped)
    clock.t += 4.0
    o.health_checked(False)
    assert o.ejection_s == 4.0


def test_backoff_is_jittered_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.01, backoff_max_s=0.05)
    rng = random.Random(1)
    first = [backoff_s(1, policy, rng) for _ in range(200)]
    late = [backoff_s(10, policy, rng) for _ in range(200)]
    assert all(0 <= b <= 0.01 for b in first) and len(set(first)) > 100
    assert all(0 <= b <= 0.05 for b in late) and max(late) > 0.04


def test_fault_flag() -> None:
    f = parse_fault("node1:kill@5s")
    assert (f.node, f.kind, f.at_s) == ("node1", "kill", 5.0)
    assert parse_fault("node2:hang@2.5").at_s == 2.5
    with pytest.raises(InvalidSpec, match=r"--fault: expected NODE:kill@SECONDS .* got 'node1:reboot@5s'"):
        parse_fault("node1:reboot@5s")


def test_a_client_with_nothing_left_to_serve_fails_at_once() -> None:
    async def main() -> None:
        async with Client([Endpoint("127.0.0.1:1", "stage 0 on node0")], PLAINTEXT) as client:
            client.give_up("node0 exited and the survivors cannot serve the model")
            assert client.entries == []
            started = time.monotonic()
            with pytest.raises(ShardUnavailable, match="UNAVAILABLE: node0 exited and the survivors"):
                await client.infer([torch.zeros(1)], deadline_s=30)
            assert time.monotonic() - started < 1
            assert (client.stats.requests, client.stats.failed) == (1, 1)

    asyncio.run(main())


def test_a_spent_budget_stops_retries_and_says_so() -> None:
    async def main() -> None:
        policy = RetryPolicy(budget_ratio=0.0, budget_min_per_s=0.0)
        async with Client([Endpoint("127.0.0.1:1", "stage 0 on node0")], PLAINTEXT, policy=policy) as client:
            with pytest.raises(
                ShardUnavailable, match=r"stage 0 on node0 unavailable: .*retry budget is spent"
            ):
                await client.infer([torch.zeros(1)], deadline_s=10)
            assert (client.stats.retries, client.stats.failed) == (0, 1)

    asyncio.run(main())
