"""Kubernetes hardening in the chart and the CRD, offline: NetworkPolicies, shard defaults, bounds.

The chart's values reach the operator as ``AMP4EC_*`` variables; these tests render the chart,
build the operator's config from the rendered environment and check that what the operator
then creates (a deployment's NetworkPolicy, its shard Pods) fits what the chart runs.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import helm_python
import pytest

from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import deployment_policy, desired_objects
from amp4ec.operator.planstatus import plan_record
from amp4ec.operator.spec import MAX_INPUT_ELEMENTS, parse_spec
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage
from tests.deploy.chart import FULL_VALUES, MINIMAL_VALUES, by_kind, crd, one, render
from tests.deploy.test_crd_and_manifests import crd_validator

RESOURCE = {
    "apiVersion": "amp4ec.io/v1alpha1",
    "kind": "InferenceDeployment",
    "metadata": {"name": "mnv2", "namespace": "ml"},
    "spec": {
        "model": {"name": "mobilenet_v2", "storageUri": "pvc://models/v2/weights.pt"},
        "inputShape": [1, 3, 1024, 1024],
        "nodeSelector": {"amp4ec.io/edge": "true"},
        "tolerations": [{"key": "amp4ec.io/edge", "operator": "Exists", "effect": "NoSchedule"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "edge-inference",
    },
}


def _spec_schema() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def _cel(rule: str, value: list[int]) -> bool:
    """The inputShape rule evaluated in Python: it uses only size(), indexing, *, <=, &&, ||."""
    assert re.fullmatch(r"[\sself\[\]0-9*<=&|()siz]+", rule), "the rule uses more CEL than this evaluator"
    expression = rule.replace("&&", " and ").replace("||", " or ").replace("size(self)", "len(self)")
    return bool(eval(expression, {"__builtins__": {"len": len}}, {"self": value}))  # our own CRD's text


def test_the_crd_bounds_input_elements_like_the_operator() -> None:
    shape = _spec_schema()["inputShape"]
    (rule,) = shape["x-kubernetes-validations"]
    assert str(MAX_INPUT_ELEMENTS) in rule["message"] and shape["items"]["maximum"] == MAX_INPUT_ELEMENTS
    assert shape["maxItems"] == 8 and f"self[{shape['maxItems'] - 1}]" in rule["rule"]  # every index covered
    cases = {
        (1, 3, 224, 224): True,
        (1, 3, 1024, 1024): True,
        (4, 1, 1024, 1024): True,
        (1, 3, 4096, 4096): False,
        (2, 3, 1024, 1024): False,
        (MAX_INPUT_ELEMENTS,): True,
        (1, 1, 1, 1, 1, 1, 1, 2, 3): None,  # maxItems refuses it first
        (2,) * 23: None,
        (2,) * 8: True,
        (64,) * 8: False,
    }
    for dims, ok in cases.items():
        if ok is None:
            continue
        assert _cel(rule["rule"], list(dims)) is ok, dims
        spec = {"model": {"name": "mobilenet_v2"}, "inputShape": list(dims)}
        if ok:
            parse_spec(spec)
        else:
            with pytest.raises(Exception, match="at most"):
                parse_spec(spec)


def test_a_hardened_resource_is_valid_for_the_crd_and_the_operator() -> None:
    crd_validator().validate(RESOURCE)
    spec = parse_spec(RESOURCE["spec"])
    assert spec.tolerations[0].to_k8s() == RESOURCE["spec"]["tolerations"][0]
    assert "code execution" in _spec_schema()["model"]["properties"]["name"]["description"]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (
            lambda s: s["model"].update(storageUri="pvc://models/../other/w.pt"),
            ["spec", "model", "storageUri"],
        ),
        (lambda s: s["model"].update(storageUri="pvc://models//etc/passwd"), ["spec", "model", "storageUri"]),
        (lambda s: s["model"].update(storageUri="https://u:p@h/w.pt"), ["spec", "model", "storageUri"]),
        (lambda s: s["tolerations"][0].update(effect="Sometimes"), ["spec", "tolerations", 0, "effect"]),
        (lambda s: s["imagePullSecrets"].append({}), ["spec", "imagePullSecrets", 1]),
        (lambda s: s.update(priorityClassName=""), ["spec", "priorityClassName"]),
        (lambda s: s.update(inputShape=[1, MAX_INPUT_ELEMENTS + 1]), ["spec", "inputShape", 1]),
    ],
)
def test_the_crd_schema_rejects_escapes_and_bad_pass_through_fields(change: Any, path: list[Any]) -> None:
    obj = copy.deepcopy(RESOURCE)
    change(obj["spec"])
    errors = list(crd_validator().iter_errors(obj))
    assert errors and any(list(e.absolute_path) == path for e in errors), [e.message for e in errors]


def _config(values: dict[str, Any]) -> tuple[list[dict[str, Any]], OperatorConfig]:
    objs = render(values)
    (c,) = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    return objs, OperatorConfig.from_env({e["name"]: e.get("value", "amp4ec-system") for e in c["env"]})


def _shard_objects(config: OperatorConfig) -> list[dict[str, Any]]:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}}, config.spec_policy())
    stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20),)
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1,), 2.1, 2.1, 400.0))
    record = plan_record(spec, plan, {"edge-a": 1.0})
    policy = deployment_policy("mnv2", "ml", spec, config)
    return [*([policy] if policy else []), *desired_objects("mnv2", "ml", spec, record, config)]


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
def test_shard_policies_let_in_the_operator_and_the_prometheus_the_chart_names(
    values: dict[str, Any],
) -> None:
    objs, config = _config(values)
    operator = one(objs, "Deployment", "-operator")
    policy = one(_shard_objects(config), "NetworkPolicy")
    operator_peer = policy["spec"]["ingress"][1]["from"][0]
    namespace = operator_peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    assert namespace == operator["metadata"]["namespace"]
    pod_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert operator_peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
    prometheus = policy["spec"]["ingress"][2]["from"][0]
    expected = (values.get("networkPolicy") or {}).get("prometheus") or {}
    assert prometheus["namespaceSelector"]["matchLabels"] == expected.get(
        "namespaceSelector", {"kubernetes.io/metadata.name": "monitoring"}
    )
    assert prometheus.get("podSelector", {}).get("matchLabels", {}) == expected.get("podSelector", {})


def test_full_values_reach_shard_pods_and_the_spec_policy() -> None:
    _, config = _config(FULL_VALUES)
    pod = one(_shard_objects(config), "Pod")["spec"]
    assert pod["tolerations"] == FULL_VALUES["shards"]["tolerations"]
    assert pod["imagePullSecrets"] == FULL_VALUES["shards"]["imagePullSecrets"]
    assert pod["priorityClassName"] == "edge-inference"
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "edge-a"}
    assert dict(config.shard_node_selector) == {"amp4ec.io/profile": "edge"}  # what planning selects by
    policy = config.spec_policy()
    assert policy.factory_allowed("acme.nets.resnet") and not policy.factory_allowed("os")
    assert [str(n) for n in policy.storage_allowed_networks] == ["127.0.0.0/8"]
    env = {e["name"]: e["value"] for e in one(_shard_objects(config), "Pod")["spec"]["containers"][0]["env"]}
    assert env["AMP4EC_ALLOW_FACTORIES"] == "vision_models,acme.nets"  # the agent checks too
    (monitor,) = one(render(FULL_VALUES), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert {"name": "AMP4EC_ALLOW_FACTORIES", "value": "vision_models,acme.nets"} in monitor["env"]
    _, default = _config({})
    assert default.allowed_factory_modules == () and default.storage_allowed_networks == ()
    (monitor,) = one(render({}), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert "AMP4EC_ALLOW_FACTORIES" not in {e["name"] for e in monitor["env"]}
    _, minimal = _config(MINIMAL_VALUES)
    assert minimal.network_policy is False and not by_kind(_shard_objects(minimal), "NetworkPolicy")


@pytest.mark.parametrize("values", [{}, FULL_VALUES], ids=["default", "full"])
def test_chart_policies_select_the_chart_pods_and_open_only_their_ports(values: dict[str, Any]) -> None:
    objs = render(values)
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p for p in by_kind(objs, "NetworkPolicy")}
    assert sorted(policies) == ["monitor", "operator"]
    workloads = {"operator": one(objs, "Deployment", "-operator"), "monitor": one(objs, "DaemonSet")}
    for component, policy in policies.items():
        template = workloads[component]["spec"]["template"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
        own = {ports["control"], ports["cache"]} if component == "monitor" else set()
        assert opened == {ports["metrics"]} | own
    grpc_from = policies["monitor"]["spec"]["ingress"][0]["from"]
    selected = [
        w for w in workloads.values()
        for peer in grpc_from
        if peer["podSelector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
    ]  # fmt: skip
    assert len(selected) == 1  # the monitors (link probes); the operator calls no monitor
    # The model cache port: the Pods the operator makes, in any namespace (desired.py, profiler_pod.py).
    monitor = workloads["monitor"]["spec"]["template"]["spec"]["containers"][0]
    cache_port = next(p["containerPort"] for p in monitor["ports"] if p["name"] == "cache")
    (cache_rule,) = [r for r in policies["monitor"]["spec"]["ingress"] if r["ports"][0]["port"] == cache_port]
    (peer,) = cache_rule["from"]
    assert peer["namespaceSelector"] == {}
    (names,) = peer["podSelector"]["matchExpressions"]
    assert names["key"] == "app.kubernetes.io/name" and set(names["values"]) == {
        "amp4ec-shard",
        "amp4ec-profiler",
    }
    assert not by_kind(render(MINIMAL_VALUES), "NetworkPolicy")


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"operator": {"allowedFactoryModules": ["os:abort"]}}, "allowedFactoryModules"),
        ({"operator": {"storageAllowedNetworks": ["anywhere"]}}, "storageAllowedNetworks"),
        ({"shards": {"tolerations": [{"key": "a", "effect": "Sometimes"}]}}, "effect"),
        ({"shards": {"imagePullSecrets": ["regcred"]}}, "imagePullSecrets"),
        ({"networkPolicy": {"prometheus": {"podSelector": {"app": "x" * 64}}}}, "podSelector"),
    ],
)
def test_values_schema_rejects_hardening_mistakes(values: dict[str, Any], error: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=error):
        render(values)
