"""Properties every plan has, whatever the strategy, and the optimal strategy's dominance."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amp4ec.errors import PlanInfeasible
from amp4ec.planner import STRATEGIES, plan
from tests.planner.planner_cases import TOL, check_plan, instances

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASELINES = [s for s in STRATEGIES if s != "optimal"]


def _try(instance, **kw):
    try:
        return plan(**instance, **kw)
    except PlanInfeasible as exc:
        assert str(exc), "an infeasible plan must say why"
        return None


@SETTINGS
@given(
    instances(max_blocks=10, max_nodes=5),
    st.sampled_from(STRATEGIES),
    st.sampled_from(["throughput", "latency"]),
)
def test_every_strategy_returns_a_valid_plan(instance, strategy, objective):
    got = _try(instance, strategy=strategy, objective=objective)
    if got is None:
        return
    assert (got.strategy, got.objective) == (strategy, objective)
    check_plan(got, instance)


@SETTINGS
@given(instances(max_blocks=10, max_nodes=5), st.sampled_from(["throughput", "latency"]))
def test_optimal_is_never_worse_than_a_baseline(instance, objective):
    best = _try(instance, objective=objective)
    for strategy in BASELINES:
        other = _try(instance, strategy=strategy, objective=objective)
        if other is None:
            continue
        assert best is not None, f"{strategy} found a plan, optimal did not"
        if objective == "throughput":
            assert best.predicted.throughput_rps >= other.predicted.throughput_rps * (1 - 1e-6)
        else:
            assert best.predicted.latency_ms <= other.predicted.latency_ms + TOL


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_blocks=30, min_nodes=9, max_nodes=12), st.sampled_from(["throughput", "latency"]))
def test_heuristic_beyond_eight_nodes_is_valid_and_beats_baselines(instance, objective):
    best = _try(instance, objective=objective)
    if best is not None:
        check_plan(best, instance)
        assert any("heuristic" in note for note in best.notes)
    for strategy in BASELINES:
        other = _try(instance, strategy=strategy, objective=objective)
        if other is None:
            continue
        assert best is not None
        if objective == "throughput":
            assert best.predicted.throughput_rps >= other.predicted.throughput_rps * (1 - 1e-6)
        else:
            assert best.predicted.latency_ms <= other.predicted.latency_ms + TOL


@SETTINGS
@given(instances(max_blocks=8, max_nodes=4))
def test_plan_does_not_depend_on_link_direction_declared(instance):
    """A link declared one way is used both ways (src→dst, else dst→src, else default)."""
    flipped = dict(
        instance, links=[type(x)(x.dst, x.src, x.rtt_ms, x.bandwidth_bytes_per_s) for x in instance["links"]]
    )
    a, b = _try(instance), _try(flipped)
    assert (a is None) == (b is None)
    if a is not None:
        assert a.predicted == b.predicted
