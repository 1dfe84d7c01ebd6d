"""Operator pieces without a cluster: spec validation, desired objects, status, config, CRD sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from amp4ec.errors import InvalidSpec
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import desired_objects, entry_service
from amp4ec.operator.planstatus import PlanRecord, plan_record
from amp4ec.operator.spec import CompressionMode, Objective, Strategy, parse_spec
from amp4ec.operator.status import Phase, condition, merge_conditions, with_ready
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage

ROOT = Path(__file__).resolve().parents[2]
SHA = "a" * 64
PIN_A = {"firstBlock": 0, "lastBlock": 0, "node": "a"}
PIN_B = {"firstBlock": 1, "lastBlock": 1, "node": "b"}


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "manifests/crd.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}})
    assert (spec.objective, spec.strategy, spec.replan.interval_seconds, spec.model.seed, spec.tiles) == (
        "throughput", "optimal", 60, 0, True,
    )  # fmt: skip
    assert parse_spec({"model": {"name": "mobilenet_v2"}, "tiles": False}).tiles is False


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"model": {"name": "mobilenet_v2"}, "maxStages": "2"}, "spec.maxStages"),
        ({"model": {"name": "mobilenet_v2", "storageUri": "https://h/m.pt"}}, "sha256"),
        ({"model": {"name": "m", "storageUri": "pvc://Claim/x"}}, "spec.model.storageUri"),
        ({"model": {"name": "m", "sha256": SHA}}, "without a storageUri"),
        ({"model": {"name": "m"}, "inputShape": [1, -3]}, "spec.inputShape"),
        ({"model": {"name": "m"}, "inputShape": [65536, 65536]}, "at most 4194304 elements"),
        ({"model": {"name": "m"}, "placement": [PIN_A] * 2}, "overlap"),
        ({"model": {"name": "m"}, "strategy": "paper", "placement": [PIN_A]}, "strategy optimal"),
        ({"model": {"name": "m"}, "maxStages": 1, "placement": [PIN_A, PIN_B]}, "exceed maxStages"),
        ({"model": {"name": "m"}, "replan": {"intervalSeconds": 2.5}}, "spec.replan.intervalSeconds"),
        ({"model": {"name": "m"}, "batching": {"maxBatchRequests": 65}}, "spec.batching.maxBatchRequests"),
        ({"model": {"name": "m"}, "batching": {"maxQueueDelayMs": -1}}, "spec.batching.maxQueueDelayMs"),
        ({"model": {"name": "m"}, "objective": "p95"}, "targetRate: objective p95 needs"),
        ({"model": {"name": "m"}, "targetRate": 40}, "targetRate: only objective p95"),
        ({"model": {"name": "m"}, "tiles": "no"}, "spec.tiles"),
        ({"model": {"name": "m"}, "objective": "p95", "targetRate": 0}, "spec.targetRate"),
        ({"model": {"name": "m"}, "objective": "p95", "targetRate": 9, "strategy": "equal"}, "optimal only"),
        ("not an object", "spec: expected an object"),
    ],
)  # fmt: skip
def test_invalid_specs_name_the_field(raw: Any, field: str) -> None:
    with pytest.raises(InvalidSpec, match=None) as info:
        parse_spec(raw)
    assert field in str(info.value)


def test_storage_uris_are_accepted_in_kserve_style() -> None:
    https = parse_spec({"model": {"name": "mobilenet_v2", "storageUri": "https://h/m.pth", "sha256": SHA}})
    assert https.model.pvc is None
    pvc = parse_spec({"model": {"name": "mobilenet_v2", "storageUri": "pvc://models/v2/weights.pt"}})
    assert pvc.model.pvc == ("models", "v2/weights.pt")


def test_crd_enums_match_the_pydantic_models() -> None:
    props = crd_schema()
    spec = props["spec"]["properties"]
    assert spec["objective"]["enum"] == list(get_args(Objective))
    assert spec["strategy"]["enum"] == list(get_args(Strategy))
    assert props["status"]["properties"]["phase"]["enum"] == [p.value for p in Phase]
    condition_types = props["status"]["properties"]["conditions"]["items"]["properties"]["type"]["enum"]
    assert condition_types == ["Planned", "ShardsReady", "Ready", "Degraded"]


def _record(**kw: Any) -> tuple[Any, PlanRecord]:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 64, 64], **kw})
    stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20), Stage("edge-b", 4, 9, 3.0, 0.2, 20 << 20))
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1, 3.2), 3.2, 6.0, 312.5))
    return spec, plan_record(spec, plan, {"edge-a": 1.0, "edge-b": 0.5})


def test_desired_objects_wire_a_pipeline() -> None:
    spec, record = _record()
    objs = desired_objects("mnv2", "ml", spec, record, OperatorConfig())
    services = [o for o in objs if o["kind"] == "Service"]
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert [o["kind"] for o in objs] == ["Service", "Service", "Pod", "Pod"]  # Services first
    first, second = pods
    args = first["spec"]["containers"][0]["args"]
    assert args[args.index("--next-hop") + 1] == f"{services[1]['metadata']['name']}.ml.svc:50051"
    assert "--next-hop" not in second["spec"]["containers"][0]["args"]
    assert args[args.index("--input-shape") + 1] == "1,3,64,64"
    assert first["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "edge-a"}
    assert second["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "500m"
    assert first["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] == "amp4ec.wire.v1.Shard"
    assert all(record.id in o["metadata"]["name"] for o in objs)
    assert services[0]["spec"]["selector"].items() <= first["metadata"]["labels"].items()
    entry = entry_service("mnv2", "ml", record.id, OperatorConfig())
    assert entry["metadata"]["name"] == "mnv2" and entry["spec"]["selector"]["amp4ec.io/stage"] == "0"


def test_desired_objects_are_pure_and_plan_ids_follow_content() -> None:
    spec, record = _record()
    assert desired_objects("m", "ns", spec, record, OperatorConfig()) == desired_objects(
        "m", "ns", spec, record, OperatorConfig()
    )
    assert PlanRecord.from_status(record.to_status()) == record
    _, other = _record(model={"name": "mobilenet_v2", "seed": 1})
    assert other.id != record.id


def test_batching_reaches_every_shard_pod_and_the_plans_status() -> None:
    spec, record = _record()
    assert (
        "--batch"
        not in desired_objects("m", "ns", spec, record, OperatorConfig())[-1]["spec"]["containers"][0]["args"]
    )
    assert record.to_status()["batching"] == {"maxBatchRequests": 1, "maxQueueDelayMs": 0.0}
    batched_spec, batched = _record(batching={"maxBatchRequests": 4, "maxQueueDelayMs": 2})
    assert batched.id != record.id  # new Pods roll out with the new arguments
    for pod in [
        o for o in desired_objects("m", "ns", batched_spec, batched, OperatorConfig()) if o["kind"] == "Pod"
    ]:
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--batch") + 1] == "4" and args[args.index("--batch-delay-ms") + 1] == "2.0"
    assert PlanRecord.from_status(batched.to_status()) == batched
    assert batched.to_status()["batching"] == {"maxBatchRequests": 4, "maxQueueDelayMs": 2.0}


def test_storage_uri_adds_a_verifying_initializer() -> None:
    spec, record = _record(model={"name": "mobilenet_v2", "storageUri": "https://h/w.pt", "sha256": SHA})
    pod = desired_objects("m", "ns", spec, record, OperatorConfig())[-1]
    init = pod["spec"]["initContainers"][0]
    assert init["args"][init["args"].index("--sha256") + 1] == SHA
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--weights") + 1] == "/mnt/models/weights.pt"
    spec, record = _record(model={"name": "mobilenet_v2", "storageUri": "pvc://claim/w.pt"})
    pod = desired_objects("m", "ns", spec, record, OperatorConfig())[-1]
    assert {"name": "model-pvc", "persistentVolumeClaim": {"claimName": "claim", "readOnly": True}} in pod[
        "spec"
    ]["volumes"]


def test_conditions_keep_transition_times_and_aggregate_ready() -> None:
    first = merge_conditions([], [condition("Planned", True, "Planned")], now="t1")
    again = merge_conditions(first, [condition("Planned", True, "Planned", "same status")], now="t2")
    assert again[0]["lastTransitionTime"] == "t1"
    flipped = merge_conditions(again, [condition("Planned", False, "PlanInfeasible")], now="t3")
    assert flipped[0]["lastTransitionTime"] == "t3"
    ready = with_ready(merge_conditions(first, [condition("ShardsReady", False, "ShardsStarting", "1/2")]))
    assert {c["type"]: (c["status"], c["reason"]) for c in ready}["Ready"] == ("False", "ShardsStarting")
    ok = with_ready(merge_conditions(first, [condition("ShardsReady", True, "ShardsReady")]))
    assert {c["type"]: c["status"] for c in ok}["Ready"] == "True"


def test_config_from_env() -> None:
    config = OperatorConfig.from_env(
        {
            "AMP4EC_PROMETHEUS_URL": "http://p:9090",
            "AMP4EC_READY_POLL_S": "0.5",
            "AMP4EC_SHARD_ENV": "A=1,B=2",
        }
    )
    assert (config.prometheus_url, config.ready_poll_s, dict(config.shard_env)) == (
        "http://p:9090", 0.5, {"A": "1", "B": "2"},
    )  # fmt: skip
    with pytest.raises(ValueError):
        OperatorConfig.from_env({"AMP4EC_SHARD_PORT": "many"})


def test_the_operator_never_imports_torch() -> None:
    code = "import sys, amp4ec.operator; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_storage_initializer_verifies_the_digest(tmp_path: Path) -> None:
    import hashlib

    from amp4ec.operator.fetch import FetchError, fetch

    claim = tmp_path / "claim"
    (claim / "v2").mkdir(parents=True)
    (claim / "v2/w.pt").write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    out = tmp_path / "models/weights.pt"
    assert fetch("pvc://models/v2/w.pt", out, good, pvc_mount=claim) == good
    assert out.read_bytes() == b"weights"
    with pytest.raises(FetchError, match="sha256 expected"):
        fetch("pvc://models/v2/w.pt", tmp_path / "bad.pt", "0" * 64, pvc_mount=claim)
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(FetchError, match="escapes"):
        fetch("pvc://models/../../etc/passwd", tmp_path / "x", pvc_mount=claim)


def test_crd_spec_fields_match_the_pydantic_model_and_compression_bounds() -> None:
    from amp4ec.compression import COMPRESSION_MODES, DEFAULT_MAX_ERROR
    from amp4ec.operator.spec import CompressionSpec, DeploymentSpec

    spec = crd_schema()["spec"]["properties"]
    assert set(spec) == {f.alias or name for name, f in DeploymentSpec.model_fields.items()}
    squeeze = spec["compression"]["properties"]
    assert squeeze["mode"]["enum"] == list(COMPRESSION_MODES) == list(get_args(CompressionMode))
    assert squeeze["mode"]["default"] == CompressionSpec().mode == "off"
    bound = squeeze["maxOutputError"]
    assert (bound["default"], bound["minimum"], bound["maximum"]) == (DEFAULT_MAX_ERROR, 0, 1)
    assert parse_spec({"model": {"name": "m"}}).compression.policy().enabled is False
    on = parse_spec({"model": {"name": "m"}, "compression": {"mode": "auto", "maxOutputError": 0.002}})
    assert on.compression.policy().enabled and on.compression.max_output_error == 0.002
    for bad, field in (
        ({"mode": "zip"}, "spec.compression.mode"),
        ({"mode": "auto", "maxOutputError": -0.1}, "spec.compression.maxOutputError"),
        ({"mode": "auto", "level": 3}, "spec.compression.level"),
    ):
        with pytest.raises(InvalidSpec, match=field.replace(".", r"\.")):
            parse_spec({"model": {"name": "m"}, "compression": bad})


def test_desired_shards_send_in_their_planned_codec() -> None:
    spec = parse_spec(
        {"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 64, 64], "compression": {"mode": "auto"}}
    )
    stages = (
        Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20, out_codec="int8"),
        Stage("edge-b", 4, 9, 3.0, 0.2, 20 << 20, out_codec="raw"),
    )
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1, 3.2), 3.2, 6.0, 312.5, 1e-3))
    record = plan_record(spec, plan, {"edge-a": 1.0, "edge-b": 0.5})
    objs = desired_objects("mnv2", "ml", spec, record, OperatorConfig())
    first, second = (o for o in objs if o["kind"] == "Pod")
    args = first["spec"]["containers"][0]["args"]
    assert args[args.index("--output-codec") + 1] == "int8"
    assert "--output-codec" not in second["spec"]["containers"][0]["args"]  # raw is the default
    status = record.to_status()
    assert [s["outCodec"] for s in status["stages"]] == ["int8", "raw"]
    assert status["predicted"]["outputError"] == 1e-3
    assert PlanRecord.from_status(status) == record
    # The codec is part of what the Pods run: a raw twin of the plan has another id.
    raw_stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20), stages[1])
    raw_plan = Plan("throughput", "optimal", (Pipeline(raw_stages),), plan.predicted)
    assert plan_record(spec, raw_plan, {"edge-a": 1.0, "edge-b": 0.5}).id != record.id
