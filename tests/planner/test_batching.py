"""Dynamic batching in the cost model: expected batch, batched stage prices, the batched simulation."""

from __future__ import annotations

import heapq
import math
import random
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amp4ec.errors import InvalidSpec
from amp4ec.planner import LayerProfile, NodeCapacity, plan
from amp4ec.planner.batching import (
    batch_time_ms,
    expected_batch,
    expected_batches,
    per_request_ms,
    saturation_rps,
    stage_ms_under_load,
)
from amp4ec.planner.load import expected_completion_ms, latency_under_load, pipeline_times
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage

# MobileNetV2-like per-image gains (18.1 ms alone, 15.6 at batch 2, 16.0 at batch 4).
BATCHED = (("a", 6.0, ((2, 10.4), (4, 21.4))), ("b", 12.1, ((2, 20.8), (4, 42.6))))


def _blocks(figures: bool = True) -> list[LayerProfile]:
    return [
        LayerProfile(name, 10**6, 10**5, 10**4, ms, batch_ms=batch if figures else ())
        for name, ms, batch in BATCHED
    ]


def _stage(*times: float) -> Stage:
    """A stage whose batch of k requests takes ``times[k - 1]``."""
    return Stage("n", 0, 0, compute_ms=times[0], batch_ms=tuple(times[1:]))


def _plan(*pipelines: tuple[Stage, ...]) -> Plan:
    pipes = tuple(Pipeline(p) for p in pipelines)
    stage_ms = tuple(s.stage_ms for p in pipes for s in p.stages)
    rate = sum(1000 / max(s.stage_ms for s in p.stages) for p in pipes)
    return Plan("throughput", "optimal", pipes, Prediction(stage_ms, max(stage_ms), sum(stage_ms), rate))


# --- profiles and prices ----------------------------------------------------------------------


def test_a_block_interpolates_its_measured_batches() -> None:
    (a, _) = _blocks()
    assert a.ms_at(1) == 6.0 and a.ms_at(2) == 10.4 and a.ms_at(4) == 21.4
    assert a.ms_at(3) == pytest.approx((10.4 + 21.4) / 2)
    assert a.ms_at(8) == pytest.approx(2 * 21.4)  # beyond the largest: its per-image time
    old = LayerProfile("x", 1, 1, 1, 5.0)  # a profile from before batch figures: batch 1 per image
    assert old.ms_at(4) == 20.0


def test_bad_batch_figures_are_named() -> None:
    node = [NodeCapacity("n", 1.0, 2**30)]
    for bad, field in (
        (((1, 3.0),), r"blocks\[0\]\.batch_ms\[0\]"),
        (((4, 3.0), (2, 1.0)), r"blocks\[0\]\.batch_ms\[1\]"),
        (((2, math.nan),), r"blocks\[0\]\.batch_ms\[0\]\.ms"),
    ):
        with pytest.raises(InvalidSpec, match=field):
            plan([LayerProfile("x", 1, 1, 1, 5.0, batch_ms=bad)], node)
    with pytest.raises(InvalidSpec, match="max_batch"):
        plan(_blocks(), node, max_batch=0)


def test_stages_are_priced_at_each_batch_with_per_request_costs_per_request() -> None:
    nodes = [NodeCapacity("n", 0.5, 2**30, overhead_ms=0.5)]
    stage = plan(_blocks(), nodes, max_batch=4, tiles=False).stages[0]
    per_request = stage.transfer_ms + stage.overhead_ms + stage.codec_ms
    assert stage.max_batch == 4 and stage.compute_ms == pytest.approx(18.1 / 0.5)
    assert stage.batch_ms[0] == pytest.approx(2 * per_request + 31.2 / 0.5)
    assert stage.batch_ms[1] == pytest.approx(3 * per_request + (15.9 + 31.7) / 0.5)
    assert stage.batch_ms[2] == pytest.approx(4 * per_request + 64.0 / 0.5)
    # Without batching, or without figures, a stage is priced at batch 1 only, as before.
    assert plan(_blocks(), nodes, tiles=False).stages[0].batch_ms == ()
    old = plan(_blocks(figures=False), nodes, max_batch=4, tiles=False)
    assert old.stages[0].batch_ms == () and old == plan(_blocks(figures=False), nodes, tiles=False)


# --- the expected batch -----------------------------------------------------------------------


def test_expected_batch_is_one_with_no_queue_and_the_cap_at_saturation() -> None:
    stage = _stage(10.0, 16.0, 24.0, 32.0)  # 10 ms alone, 8 ms a request at batch 4
    assert expected_batch(stage, 0.0) == 1.0
    assert expected_batch(stage, 0.1) == pytest.approx(1.0, abs=1e-5)
    assert expected_batch(stage, 1000 * 4 / 32.0) == 4.0  # the batched saturation rate
    assert expected_batch(stage, 10_000.0) == 4.0
    assert expected_batch(_stage(10.0), 10_000.0) == 1.0  # no batching: always 1
    assert per_request_ms(stage, 4.0) == 8.0 and per_request_ms(stage, 1.0) == 10.0
    assert batch_time_ms(stage, 2.5) == 20.0
    with pytest.raises(InvalidSpec, match="rate_rps"):
        expected_batch(stage, math.nan)
    with pytest.raises(InvalidSpec, match="batch"):
        batch_time_ms(stage, 5)


@settings(max_examples=60, deadline=None)
@given(
    alone=st.floats(1.0, 50.0),
    gains=st.lists(st.floats(0.6, 1.0), min_size=1, max_size=7),
    rates=st.lists(st.floats(0.0, 2000.0), min_size=2, max_size=6),
)
def test_expected_batch_grows_with_the_load(alone: float, gains: list[float], rates: list[float]) -> None:
    # Any stage whose batch time grows with the batch: the expected batch grows with the rate,
    # stays within [1, cap], and is the cap once no batch size up to it keeps up with the rate.
    times = [alone]
    for g in gains:
        times.append(max(times[-1], alone * (len(times) + 1) * g))
    stage = _stage(*times)
    batches = [expected_batch(stage, r) for r in sorted(rates)]
    assert all(1.0 <= b <= stage.max_batch for b in batches)
    assert all(x <= y + 1e-9 for x, y in pairwise(batches))
    beyond = 1.01 * max(1000 * b / t for b, t in enumerate(times, start=1))
    assert expected_batch(stage, beyond) == stage.max_batch


def test_saturation_uses_the_largest_batch_and_splits_the_load_by_it() -> None:
    fast, slow = _stage(10.0, 16.0, 24.0, 32.0), _stage(20.0, 30.0)
    two = _plan((fast,), (slow,))
    assert saturation_rps(two) == pytest.approx(1000 * 4 / 32 + 1000 * 2 / 30)
    assert saturation_rps(_plan((_stage(10.0), _stage(12.5)))) == pytest.approx(80.0)  # = throughput
    low, high = expected_batches(two, 20.0), expected_batches(two, 1000.0)
    assert len(low) == 2 and all(1 <= b < 1.5 for b in low)
    assert high == (4.0, 2.0)
    # Priced at the expected batch: batch 1's time idle, the largest batch's per request saturated.
    assert stage_ms_under_load(two, 1e-9) == pytest.approx((10.0, 20.0))
    assert stage_ms_under_load(two, 1000.0) == (8.0, 15.0)
    between = stage_ms_under_load(two, 100.0)
    assert 8.0 < between[0] < 10.0 and 15.0 < between[1] < 20.0


# --- the batched simulation -------------------------------------------------------------------


def test_a_batch_takes_everything_waiting_hand_computed() -> None:
    # One stage, 10 ms alone, batches of 2 in 12 ms, 3 in 15 ms. Arrivals (seeded) are replayed
    # by hand: a free stage starts at once; a busy one's waiting requests go together.
    stage = _stage(10.0, 12.0, 15.0)
    result = latency_under_load(_plan((stage,)), 400.0, requests=6, seed=3)
    rng, t, sent = random.Random(3), 0.0, []
    for _ in range(6):
        t += rng.expovariate(0.4)
        sent.append(t)
    latencies, free, i, batches = [], 0.0, 0, 0
    while i < len(sent):
        batches += 1
        start = max(free, sent[i])
        batch = [s for s in sent[i:] if s <= start][:3]  # waiting when it frees, at most 3
        free = start + (10.0, 12.0, 15.0)[len(batch) - 1]
        latencies += [free - s for s in batch]
        i += len(batch)
    assert result.mean_ms == pytest.approx(sum(latencies) / 6)
    assert (result.p50_ms, result.p95_ms) == pytest.approx((sorted(latencies)[2], sorted(latencies)[5]))
    assert result.batches == (6 / batches,) and batches < 6  # 400 req/s on a 10 ms stage: it batched


def test_a_batch_moves_on_together_and_the_next_stage_takes_it_whole() -> None:
    # A 10 ms stage (12 ms for two) then a 4 ms one (5 ms for two).
    first, second = _stage(10.0, 12.0), _stage(4.0, 5.0)
    result = latency_under_load(_plan((first, second)), 1e9, requests=3, seed=0)
    # At 1e9 req/s the three arrive within nanoseconds: the first alone (10), then the other two
    # (12), each batch through the second stage (4, then 5).
    assert result.p50_ms == pytest.approx(10 + 12 + 5, abs=1e-3)
    assert result.p95_ms == pytest.approx(10 + 12 + 5, abs=1e-3)
    assert result.mean_ms == pytest.approx((14 + 2 * 27) / 3, abs=1e-3)
    assert result.batches == pytest.approx((1.5, 1.5))


def _unbatched_reference(plan: Plan, rate_rps: float, requests: int, seed: int) -> list[float]:
    """The simulation as it was before batching (every request through each stage in turn)."""
    stages = [[s.stage_ms for s in p.stages] for p in plan.pipelines]
    seeds = [pipeline_times(p) for p in plan.pipelines]
    free = [[0.0] * len(s) for s in stages]
    pending: list[list[float]] = [[] for _ in stages]
    rng, now, latencies = random.Random(seed), 0.0, []
    for _ in range(requests):
        now += rng.expovariate(rate_rps / 1000.0)
        for heap in pending:
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        p = min(
            range(len(stages)),
            key=lambda i: (expected_completion_ms(*seeds[i], len(pending[i])), len(pending[i])),
        )
        t = now
        for k, ms in enumerate(stages[p]):
            t = max(t, free[p][k]) + ms
            free[p][k] = t
        heapq.heappush(pending[p], t)
        latencies.append(t - now)
    return sorted(latencies)


@pytest.mark.parametrize("load", [0.3, 0.9, 1.2])
def test_without_batch_figures_the_simulation_is_unchanged(load: float) -> None:
    nodes = [NodeCapacity("a", 1.0, 2**30), NodeCapacity("b", 0.6, 2**30), NodeCapacity("c", 0.4, 2**30)]
    old = plan(_blocks(figures=False), nodes, max_batch=4, tiles=False)
    rate = load * old.predicted.throughput_rps
    got = latency_under_load(old, rate, requests=500, seed=7)
    ref = _unbatched_reference(old, rate, 500, 7)
    assert got.p50_ms == ref[round(0.5 * 499)] and got.p95_ms == ref[round(0.95 * 499)]
    assert got.mean_ms == pytest.approx(math.fsum(ref) / 500)
    assert set(got.batches) == {1.0}


def test_batching_helps_under_load_and_costs_nothing_idle() -> None:
    nodes = [NodeCapacity("a", 1.0, 2**30), NodeCapacity("b", 0.6, 2**30)]
    single = plan(_blocks(), nodes, tiles=False)
    batched = plan(_blocks(), nodes, max_batch=4, tiles=False)
    assert saturation_rps(batched) > saturation_rps(single) == pytest.approx(single.predicted.throughput_rps)
    rate = 0.95 * single.predicted.throughput_rps
    assert latency_under_load(batched, rate).p95_ms < latency_under_load(single, rate).p95_ms
    quiet = 0.01 * single.predicted.throughput_rps
    assert latency_under_load(batched, quiet, requests=200).p50_ms == pytest.approx(
        latency_under_load(single, quiet, requests=200).p50_ms
    )
