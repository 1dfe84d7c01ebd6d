"""Dispatch by expected completion on plain data: what the estimates learn, whom they choose,
and the planner's latency-under-load prediction made with the same rule."""

from __future__ import annotations

import random

import pytest

from amp4ec.dispatch import STALE_S, ServiceEstimate, choose
from amp4ec.errors import InvalidSpec
from amp4ec.planner.load import expected_completion_ms, latency_under_load, pipeline_times
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage


def _fifo_answers(service_ms: float, sends: list[float]) -> list[tuple[float, float, int]]:
    """(sent, answered, ahead) of requests sent at ``sends`` (s) to one FIFO server of fixed
    service time; ``ahead`` = requests in flight when each was sent."""
    free, out = 0.0, []
    for t in sends:
        ahead = sum(done > t for _, done, _ in out)
        free = max(free, t) + service_ms / 1000
        out.append((t, free, ahead))
    return out


def test_answers_behind_others_teach_the_interval_and_lone_ones_the_latency() -> None:
    estimate = ServiceEstimate(latency_ms=5.0, interval_ms=5.0)  # a wrong seed, corrected by answers
    burst = _fifo_answers(30.0, [0.0] * 20)  # 20 sent at once: each waits for the one before
    for sent, done, ahead in sorted(burst, key=lambda a: a[1]):
        estimate.answered(sent, done, ahead)
    assert estimate.interval_ms == pytest.approx(30.0, rel=0.05)
    idle = _fifo_answers(12.0, [10.0 + i for i in range(20)])  # one at a time: nothing ahead
    for sent, done, ahead in idle:
        estimate.answered(sent, done, ahead)
    assert estimate.latency_ms == pytest.approx(12.0, rel=0.05)
    assert estimate.interval_ms == pytest.approx(30.0, rel=0.05)  # lone answers say nothing of it
    assert estimate.answers == 40


def test_a_request_behind_another_in_a_pipeline_counts_from_when_it_could_answer() -> None:
    # A 3-stage pipeline: 60 ms end to end, a 20 ms slowest stage. A request sent 45 ms after the
    # previous one could answer 60 ms after it was sent, not 20 ms after the previous answer.
    estimate = ServiceEstimate(latency_ms=60.0, interval_ms=20.0)
    estimate.answered(0.0, 0.060, 0)
    estimate.answered(0.045, 0.105, 1)
    assert estimate.latency_ms == pytest.approx(60.0) and estimate.interval_ms == pytest.approx(20.0)
    estimate.answered(0.046, 0.125, 1)  # sent right behind: 20 ms after the previous answer
    assert estimate.interval_ms == pytest.approx(20.0)


def test_batched_answers_average_to_the_time_per_request() -> None:
    # Batches of 4 every 40 ms: one answer after a 40 ms gap, three at once; 10 ms a request.
    estimate = ServiceEstimate(latency_ms=15.0, interval_ms=15.0)
    for k in range(1, 41):
        t = 0.04 * k
        for _ in range(4):
            estimate.answered(t - 0.1, t, 5)
    assert 4.0 < estimate.interval_ms < 25.0  # an EWMA of 40, 0, 0, 0: around the 10 ms mean


def test_choose_prefers_the_expected_first_answer_not_the_fewest_in_flight() -> None:
    fast, slow = ServiceEstimate(20.0, 20.0), ServiceEstimate(60.0, 60.0)
    assert expected_completion_ms(20.0, 20.0, 2) == 60.0
    fast.answered(0.0, 0.02, 0)
    slow.answered(0.0, 0.06, 0)
    assert choose([(slow, 0), (fast, 1)], 1.0) == 1  # 40 ms behind one request beats 60 ms idle
    assert choose([(slow, 0), (fast, 3)], 1.0) == 0  # 80 ms: now the slow one answers first
    assert choose([(slow, 0), (fast, 2)], 1.0) == 0  # a tie (60 ms each) goes to the fewer in flight
    # Idle and not heard from for STALE_S: tried again, in case it is faster than it was.
    assert choose([(slow, 0), (fast, 1)], 0.06 + STALE_S) == 0


def test_an_unknown_pipeline_is_tried_at_once_but_not_flooded() -> None:
    known, unknown = ServiceEstimate(10.0, 10.0), ServiceEstimate()
    known.answered(0.0, 0.01, 0)
    assert choose([(known, 0), (unknown, 0)], 0.1) == 1  # tried before its first answer
    assert choose([(known, 0), (unknown, 2)], 0.1) == 0  # 10 ms beats 2 x the known 10 ms interval
    assert choose([(ServiceEstimate(), 2), (ServiceEstimate(), 1)], 0.1) == 1  # none known: least in flight
    with pytest.raises(ValueError, match="candidates"):
        choose([], 0.0)


def _replicas(*stage_ms: float) -> Plan:
    pipes = tuple(Pipeline((Stage(f"node{i}", 0, 20, compute_ms=ms),)) for i, ms in enumerate(stage_ms))
    rate = sum(1000 / ms for ms in stage_ms)
    return Plan("throughput", "replicate", pipes, Prediction(stage_ms, max(stage_ms), min(stage_ms), rate))


def _least_in_flight_p95(plan: Plan, rate_rps: float, requests: int = 2000, seed: int = 0) -> float:
    """The dispatch amp4ec used before, simulated like ``latency_under_load`` (a brute force)."""
    service = [p.stages[0].stage_ms for p in plan.pipelines]
    free = [0.0] * len(service)
    done: list[list[float]] = [[] for _ in service]
    rng, now, latencies = random.Random(seed), 0.0, []
    for _ in range(requests):
        now += rng.expovariate(rate_rps / 1000)
        in_flight = [sum(t > now for t in d) for d in done]
        p = min(range(len(service)), key=lambda i: in_flight[i])
        free[p] = max(free[p], now) + service[p]
        done[p].append(free[p])
        latencies.append(free[p] - now)
    latencies.sort()
    return latencies[round(0.95 * (len(latencies) - 1))]


def test_latency_under_load_beats_least_in_flight_on_unequal_replicas() -> None:
    # The standard configuration's replicas (0.32/0.48/0.8 CPU, MobileNetV2), slowest listed first:
    # least-in-flight sends a request to the first of the idle replicas, expected completion to
    # the one that answers first, whatever the order.
    plan = _replicas(57.0, 37.0, 22.0)
    for load in (0.7, 0.9):
        rate = load * plan.predicted.throughput_rps
        jsed = latency_under_load(plan, rate)
        assert jsed.p95_ms < 0.85 * _least_in_flight_p95(plan, rate), load
        assert jsed.shares[2] > jsed.shares[1] > jsed.shares[0] > 0
        assert jsed.p50_ms <= jsed.p95_ms and sum(jsed.shares) == pytest.approx(1.0)
        fast_first = latency_under_load(_replicas(22.0, 37.0, 57.0), rate)
        assert fast_first.p95_ms == pytest.approx(jsed.p95_ms, rel=0.1)
        assert fast_first.p95_ms <= _least_in_flight_p95(_replicas(22.0, 37.0, 57.0), rate)


def test_latency_under_load_at_a_trickle_is_the_fastest_pipeline() -> None:
    split = Pipeline((Stage("a", 0, 9, compute_ms=8.0), Stage("b", 10, 20, compute_ms=5.0)))
    plan = Plan("throughput", "optimal", (split,), Prediction((8.0, 5.0), 8.0, 13.0, 125.0))
    assert pipeline_times(split) == (13.0, 8.0)
    quiet = latency_under_load(plan, 1.0, requests=200)
    assert quiet.p95_ms == pytest.approx(13.0)
    busy = latency_under_load(plan, 110.0, requests=2000)
    assert busy.p95_ms > 2 * 13.0  # queueing at the 8 ms stage, near its 125 req/s
    with pytest.raises(InvalidSpec, match="rate_rps"):
        latency_under_load(plan, 0.0)


def test_a_seed_from_the_plan_holds_until_answers_replace_it() -> None:
    seeded, learnt = ServiceEstimate(50.0, 50.0), ServiceEstimate(20.0, 20.0)
    learnt.answered(0.0, 0.02, 0)
    assert choose([(seeded, 0), (learnt, 0)], 100.0) == 1  # the seed is no stale answer
