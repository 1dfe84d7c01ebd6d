"""status.measured without a cluster: PromQL building, result parsing, the timer's step, the CRD,
and the entry stage's end-to-end histogram in real in-process node agents."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from amp4ec.operator.capacity import CapacityUnavailable
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.measured import NUMBERS, measured_queries, measured_status, scalar, valid_window
from amp4ec.operator.reconcile import Deps, Target, measure

ROOT = Path(__file__).resolve().parents[2]
SELECTOR = 'namespace="ml",deployment="mnv2",code="OK"'


def test_queries_select_one_deployment_over_the_window() -> None:
    q = measured_queries("ml", "mnv2", "2m")
    assert q == {
        "throughputRps": f"sum(rate(amp4ec_request_seconds_count{{{SELECTOR}}}[2m]))",
        "latencyP50Ms": (
            f"histogram_quantile(0.5, sum by (le) (rate(amp4ec_request_seconds_bucket{{{SELECTOR}}}[2m])))"
        ),
        "latencyP95Ms": (
            f"histogram_quantile(0.95, sum by (le) (rate(amp4ec_request_seconds_bucket{{{SELECTOR}}}[2m])))"
        ),
    }
    assert set(q) == set(NUMBERS)


def test_label_values_are_quoted_and_bad_windows_refused() -> None:
    q = measured_queries('a"b', "c\\d", "30s")["throughputRps"]
    assert 'namespace="a\\"b",deployment="c\\\\d"' in q
    for window in ("", "2", "0s", "-1m", "2 m", "1h30", "5m]) or vector(1"):
        assert not valid_window(window), window
        with pytest.raises(ValueError, match="PromQL duration"):
            measured_queries("ml", "mnv2", window)
    for window in ("30s", "2m", "1h30m", "500ms", "1d"):
        assert valid_window(window), window


def test_scalar_takes_one_finite_value() -> None:
    assert scalar([]) is None  # no series: no request answered yet, or the Pods are not scraped
    assert scalar([({}, math.nan)]) is None  # histogram_quantile without traffic
    assert scalar([({}, math.inf)]) is None
    assert scalar([({"a": "1"}, 1.0), ({"a": "2"}, 2.0)]) is None  # not aggregated: refuse to pick
    assert scalar([({}, 2.5)]) == 2.5


def test_status_has_numbers_only_with_traffic() -> None:
    m = measured_status(
        {"throughputRps": 12.34567, "latencyP50Ms": 0.0123456, "latencyP95Ms": 0.05}, "2m", "T"
    )
    assert m == {
        "throughputRps": 12.346,
        "latencyP50Ms": 12.346,
        "latencyP95Ms": 50.0,
        "window": "2m",
        "observedAt": "T",
    }
    idle = {
        "throughputRps": None,
        "latencyP50Ms": None,
        "latencyP95Ms": None,
        "window": "2m",
        "observedAt": "T",
    }
    assert (
        measured_status({"throughputRps": None, "latencyP50Ms": None, "latencyP95Ms": None}, "2m", "T")
        == idle
    )
    # Series exist but nothing was answered in the window: still no (invented) zeros.
    assert measured_status({"throughputRps": 0.0, "latencyP50Ms": 0.01}, "2m", "T") == idle
    # A quantile Prometheus could not compute stays absent; the merge patch's None deletes it.
    partial = measured_status({"throughputRps": 1.0, "latencyP50Ms": None, "latencyP95Ms": 0.2}, "2m", "T")
    assert partial["latencyP50Ms"] is None and partial["latencyP95Ms"] == 200.0


def test_window_and_interval_come_from_the_environment() -> None:
    config = OperatorConfig.from_env({"AMP4EC_MEASURE_WINDOW": "45s", "AMP4EC_MEASURE_INTERVAL_S": "2.5"})
    assert (config.measure_window, config.measure_interval_s) == ("45s", 2.5)
    assert OperatorConfig().measure_window == "2m"
    with pytest.raises(ValueError, match="AMP4EC_MEASURE_WINDOW"):
        OperatorConfig.from_env({"AMP4EC_MEASURE_WINDOW": "2 minutes"})


def test_crd_has_the_measured_fields_and_shows_them() -> None:
    for path in (ROOT / "manifests/crd.yaml", *(ROOT / "charts/amp4ec/crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = crd["spec"]["versions"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        assert set(status["measured"]["properties"]) == {*NUMBERS, "window", "observedAt"}, path
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert columns["Throughput"]["jsonPath"] == ".status.measured.throughputRps", path
        assert columns["P95-ms"]["jsonPath"] == ".status.measured.latencyP95Ms", path
        assert columns["Predicted"]["jsonPath"] == ".status.predicted.throughputRps", path


class FakePrometheus:
    def __init__(self, answers: dict[str, float | None] | Exception) -> None:
        self.answers = answers
        self.queries: list[str] = []

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        self.queries.append(promql)
        if isinstance(self.answers, Exception):
            raise self.answers
        value = next(v for k, v in self.answers.items() if k in promql)
        return [] if value is None else [({}, value)]


def _deps(prometheus: FakePrometheus, interval_s: float = 15.0) -> Deps:
    config = OperatorConfig(measure_window="1m", measure_interval_s=interval_s)
    return Deps(
        kube=cast(Any, None), prometheus=cast(Any, prometheus), profiler=cast(Any, None), config=config
    )


def _target(status: dict[str, Any]) -> Target:
    return Target(name="mnv2", namespace="ml", uid="u1", generation=1, spec={}, status=status)


def test_the_timer_step_measures_serving_deployments_at_its_interval() -> None:
    answers = {"_count": 4.0, "0.5,": 0.02, "0.95,": 0.03}
    prometheus = FakePrometheus(answers)
    deps = _deps(prometheus)
    serving = _target({"plan": {"id": "p"}})
    assert asyncio.run(measure(deps, _target({}))) is None  # nothing serves yet: no query
    assert prometheus.queries == []
    m = asyncio.run(measure(deps, serving))
    assert m is not None
    assert (m["throughputRps"], m["latencyP50Ms"], m["latencyP95Ms"], m["window"]) == (4.0, 20.0, 30.0, "1m")
    assert prometheus.queries == list(measured_queries("ml", "mnv2", "1m").values())
    assert asyncio.run(measure(deps, serving)) is None  # within measure_interval_s
    assert len(prometheus.queries) == 3


def test_an_unreachable_prometheus_keeps_the_last_measurement() -> None:
    deps = _deps(FakePrometheus(CapacityUnavailable("Prometheus at x unreachable")), interval_s=0)
    assert (
        asyncio.run(measure(deps, _target({"plan": {"id": "p"}, "measured": {"throughputRps": 1}}))) is None
    )


def test_only_the_entry_stage_observes_the_end_to_end_histogram() -> None:
    """Two real agents in this process: stage 0 forwards to stage 1; one histogram sample per request."""
    import grpc
    import torch
    from prometheus_client import REGISTRY

    from amp4ec.node_agent import AgentSettings, StageConfig, create_server
    from amp4ec.wire import codec
    from amp4ec.wire.v1 import shard_pb2, shard_pb2_grpc

    model = "tests.model_zoo:residual_net"

    def count(node: str) -> float:
        value = REGISTRY.get_sample_value("amp4ec_request_seconds_count", {"node": node, "code": "OK"})
        return value or 0.0

    async def main() -> None:
        last = await create_server(AgentSettings(node="m-last", port=0, cpu_limit=1.0))
        await last.load(StageConfig(model, 1, -1, stage=1))
        await last.server.start()
        entry = await create_server(AgentSettings(node="m-entry", port=0, cpu_limit=1.0))
        await entry.load(StageConfig(model, 0, 0, next_hop=f"127.0.0.1:{last.port}", stage=0))
        await entry.server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{entry.port}")
        try:
            stub = shard_pb2_grpc.ShardStub(channel)
            x = codec.encode_all([torch.randn(1, 3, 16, 16)])
            for i in range(3):
                answer = await stub.Infer(shard_pb2.Frame(request_id=str(i), tensors=x))
                assert len(answer.timings) == 2
        finally:
            await channel.close()
            await entry.stop(0)
            await last.stop(0)

    before = count("m-entry")
    asyncio.run(main())
    assert count("m-entry") - before == 3
    assert count("m-last") == 0
    total = REGISTRY.get_sample_value("amp4ec_request_seconds_sum", {"node": "m-entry", "code": "OK"})
    assert total is not None and total > 0
