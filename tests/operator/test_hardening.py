"""Kubernetes hardening of what the operator creates, as an attacker or an unlucky user would try.

Child names (the long-name collision), ownership (never patch or delete someone else's object),
restricted shard Pods, pass-through scheduling fields, the per-deployment NetworkPolicy, the
factory allow-list, the inputShape bound and the storageUri checks. Rendered objects are
validated against the Kubernetes schemas offline (kubernetes-validate, strict).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amp4ec.errors import InvalidSpec
from amp4ec.operator.capacity import Capacity
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import deployment_policy, desired_objects, entry_service
from amp4ec.operator.inferencedeployment import _target, retry_delay
from amp4ec.operator.k8s import KubeError, matches
from amp4ec.operator.names import child_base, label_value
from amp4ec.operator.planstatus import plan_record
from amp4ec.operator.profiles import ModelCosts
from amp4ec.operator.reconcile import Deps, Outcome, Target, reconcile
from amp4ec.operator.spec import SpecPolicy, parse_spec
from amp4ec.operator.storage_hosts import parse_networks
from amp4ec.planner.types import LayerProfile, NodeCapacity, Pipeline, Plan, Prediction, Stage

KUBE_VERSIONS = ["1.25", "1.30", kubernetes_validate.latest_version()]
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SHA = "a" * 64
PREFIX = "vision-team-production-resnet-fifty-eu-west"  # 43 characters
CANARY_A, CANARY_B = f"{PREFIX}-canary-a", f"{PREFIX}-canary-b"


def _record(spec: Any) -> Any:
    stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20), Stage("edge-b", 4, 9, 3.0, 0.2, 20 << 20))
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1, 3.2), 3.2, 6.0, 312.5))
    return plan_record(spec, plan, {"edge-a": 1.0, "edge-b": 0.5})


def _objects(name: str, raw: dict[str, Any] | None = None, config: OperatorConfig | None = None) -> list:
    config = config or OperatorConfig()
    spec = parse_spec(raw or {"model": {"name": "mobilenet_v2"}}, config.spec_policy())
    record = _record(spec)
    objs = desired_objects(name, "ml", spec, record, config)
    policy = deployment_policy(name, "ml", spec, config)
    return [*objs, entry_service(name, "ml", record.id, config), *([policy] if policy else [])]


# --- names -----------------------------------------------------------------------------------


def test_long_names_sharing_40_characters_get_their_own_children() -> None:
    a, b = _objects(CANARY_A), _objects(CANARY_B)
    names_a = {(o["kind"], o["metadata"]["name"]) for o in a}
    names_b = {(o["kind"], o["metadata"]["name"]) for o in b}
    assert names_a.isdisjoint(names_b), "a child object name is shared by two deployments"
    entry_a, entry_b = a[-2], b[-2]
    assert entry_a["spec"]["selector"] != entry_b["spec"]["selector"]
    for obj in a + b:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and DNS1035.match(name), name
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value


@pytest.mark.parametrize(
    "name",
    ["mnv2", "a" * 40, "a" * 41, "9lives", "model.v2.prod", "x" * 253, "a-" * 30 + "b", "a" * 62 + ".b"],
)
def test_child_names_and_labels_are_valid_for_any_resource_name(name: str) -> None:
    base, label = child_base(name), label_value(name)
    assert len(base) <= 40 and DNS1035.match(base), base
    assert len(label) <= 63 and LABEL_VALUE.match(label), label
    if len(name) <= 40 and DNS1035.match(name):
        assert base == name  # existing deployments keep their object names
    if len(name) <= 63:
        assert label == name
    for obj in _objects(name):
        kubernetes_validate.validate(obj, "1.30", strict=True)


_LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
SUBDOMAINS = st.lists(_LABEL, min_size=1, max_size=6).map(".".join).filter(lambda n: len(n) <= 253)
"""Every name an InferenceDeployment may have (a DNS-1123 subdomain)."""


@settings(max_examples=150, deadline=None)
@given(a=SUBDOMAINS, b=SUBDOMAINS)
def test_any_two_resource_names_get_valid_and_distinct_children(a: str, b: str) -> None:
    for name in (a, b):
        assert len(child_base(name)) <= 40 and DNS1035.match(child_base(name))
        assert len(label_value(name)) <= 63 and LABEL_VALUE.match(label_value(name))
    if a != b:
        assert child_base(a) != child_base(b) and label_value(a) != label_value(b)


def test_cut_names_differ_in_their_hash() -> None:
    assert child_base("a" * 50 + "1") != child_base("a" * 50 + "2")
    assert label_value("b" * 70 + "1") != label_value("b" * 70 + "2")
    assert child_base("Model.V2") != child_base("model-v2")  # cleaned names differ by hash


# --- ownership: a reconciliation against an in-memory API ------------------------------------


class FakeKube:
    """The operator's Kube interface over a dict: just enough for a reconciliation."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.patched: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def list(self, kind: str, namespace: str | None, labels: Mapping[str, str] | None = None) -> list:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == kind and (namespace is None or ns == namespace) and matches(o, labels or {})
        ]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        self.objects[(obj["kind"], meta.get("namespace"), meta["name"])] = copy.deepcopy(dict(obj))
        return dict(obj)

    async def patch(self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any]) -> Any:
        self.patched.append((kind, name))
        self.objects[(kind, namespace, name)].update(copy.deepcopy(dict(patch)))

    async def delete_all(self, kind: str, objs: Any) -> int:
        for o in objs:
            self.deleted.append((kind, o["metadata"]["name"]))
            self.objects.pop((kind, o["metadata"]["namespace"], o["metadata"]["name"]), None)
        return len(self.deleted)

    def add_node(self, name: str) -> None:
        self.objects[("Node", None, name)] = {
            "metadata": {"name": name, "labels": {"amp4ec.io/edge": "true"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }

    def start_pods(self) -> None:
        for (kind, _, _), obj in self.objects.items():
            if kind == "Pod":
                obj["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}

    def collect(self, uid: str) -> None:
        """The garbage collector: everything owned by ``uid`` goes."""
        for key, obj in list(self.objects.items()):
            if any(r["uid"] == uid for r in obj["metadata"].get("ownerReferences", ())):
                del self.objects[key]


class Profiles:
    """A profiler that has profiled every model already (the steps under test come after)."""

    COSTS = ModelCosts(
        blocks=tuple(LayerProfile(f"b{i}", 10**6, 10**5, 10**4, 5.0) for i in range(4)),
        input_bytes=10**4,
        reference_ms=10.0,
    )

    async def costs(self, name: str, namespace: str, uid: str, spec: Any, adopt: Any) -> ModelCosts:
        return self.COSTS

    def cached(self, spec: Any, namespace: str) -> ModelCosts:
        return self.COSTS

    def remember(self, spec: Any, namespace: str, costs: ModelCosts) -> None:
        """Nothing to take back: every profile is here already."""


class Capacities:
    async def capacity(self, nodes: list[str], reference_ms: float, max_age_s: float) -> Capacity:
        return Capacity(nodes={n: NodeCapacity(n, 1.0, 4 << 30, speed=1.0) for n in nodes})


def _deps(kube: FakeKube, config: OperatorConfig | None = None) -> Deps:
    return Deps(kube=kube, prometheus=Capacities(), profiler=Profiles(), config=config or OperatorConfig())  # type: ignore[arg-type]


def _owner(name: str, uid: str) -> list[dict[str, str]]:
    return [{"apiVersion": "amp4ec.io/v1alpha1", "kind": "InferenceDeployment", "name": name, "uid": uid}]


async def _step(deps: Deps, name: str, uid: str, spec: dict[str, Any], status: dict[str, Any]) -> Outcome:
    def adopt(obj: dict[str, Any]) -> None:  # what kopf.adopt does
        obj["metadata"]["ownerReferences"] = _owner(name, uid)

    outcome = await reconcile(
        deps, Target(name, "ml", uid, 1, spec, dict(status)), trigger="create", adopt=adopt
    )
    assert outcome is not None
    status.update(outcome.status)
    return outcome


SPEC = {"model": {"name": "mobilenet_v2"}, "strategy": "equal", "nodeSelector": {"amp4ec.io/edge": "true"}}


def test_two_canaries_with_a_long_common_prefix_serve_separately_and_die_alone() -> None:
    """The regression: ``…-canary-a`` and ``…-canary-b`` shared the entry Service ``name[:40]``."""
    kube = FakeKube()
    for node in ("edge-a", "edge-b"):
        kube.add_node(node)
    deps = _deps(kube)
    status_a: dict[str, Any] = {}
    status_b: dict[str, Any] = {}

    async def scenario() -> None:
        for name, uid, status in ((CANARY_A, "uid-a", status_a), (CANARY_B, "uid-b", status_b)):
            assert (await _step(deps, name, uid, SPEC, status)).reason == "ShardsStarting"
        kube.start_pods()
        for name, uid, status in ((CANARY_A, "uid-a", status_a), (CANARY_B, "uid-b", status_b)):
            assert (await _step(deps, name, uid, SPEC, status)).reason == "Serving"

    asyncio.run(scenario())
    assert status_a["endpoint"] != status_b["endpoint"]
    entry_b = status_b["endpoint"].split(".")[0]
    assert kube.patched == [] and kube.deleted == []  # neither touched the other's objects
    kube.collect("uid-a")  # deleting the first deployment
    service_b = kube.objects[("Service", "ml", entry_b)]
    left = [o for (k, _, _), o in kube.objects.items() if k != "Node"]
    assert left and all(o["metadata"]["ownerReferences"][0]["uid"] == "uid-b" for o in left)
    selected = [o for o in left if o["kind"] == "Pod" and matches(o, service_b["spec"]["selector"])]
    assert len(selected) == 1  # b's entry still answers with b's own first stage


def test_an_object_of_our_name_owned_by_another_is_refused_not_taken_over() -> None:
    kube = FakeKube()
    for node in ("edge-a", "edge-b"):
        kube.add_node(node)
    deps = _deps(kube)
    name = "shop-front"
    squatter = {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ml", "ownerReferences": _owner("other", "uid-other")},
        "spec": {"selector": {"app": "other"}},
    }
    kube.objects[("Service", "ml", name)] = copy.deepcopy(squatter)
    status: dict[str, Any] = {}

    async def scenario() -> Outcome:
        await _step(deps, name, "uid-1", SPEC, status)
        kube.start_pods()
        return await _step(deps, name, "uid-1", SPEC, status)

    outcome = asyncio.run(scenario())
    assert outcome.reason == "NameConflict" and outcome.retry_s is not None
    cond = next(c for c in status["conditions"] if c["type"] == "ShardsReady")
    assert cond["status"] == "False" and cond["reason"] == "NameConflict"
    assert "Service ml/shop-front" in cond["message"] and "InferenceDeployment/other" in cond["message"]
    assert kube.objects[("Service", "ml", name)] == squatter  # neither patched nor deleted
    assert ("Service", name) not in kube.patched


def test_stale_looking_objects_of_another_owner_are_never_deleted() -> None:
    """A Pod carrying our deployment label (copied, or a hash clash) and an old plan id stays."""
    kube = FakeKube()
    for node in ("edge-a", "edge-b"):
        kube.add_node(node)
    deps = _deps(kube)
    foreign = {
        "kind": "Pod",
        "metadata": {
            "name": "lookalike",
            "namespace": "ml",
            "labels": {"amp4ec.io/deployment": "demo", "amp4ec.io/plan": "00000000"},
            "ownerReferences": _owner("demo-elsewhere", "uid-other"),
        },
    }
    kube.objects[("Pod", "ml", "lookalike")] = copy.deepcopy(foreign)
    status: dict[str, Any] = {}

    async def scenario() -> Outcome:
        await _step(deps, "demo", "uid-1", SPEC, status)
        kube.start_pods()
        return await _step(deps, "demo", "uid-1", SPEC, status)

    assert asyncio.run(scenario()).reason == "Serving"
    assert ("Pod", "lookalike") not in kube.deleted and ("Pod", "ml", "lookalike") in kube.objects


def test_an_entry_service_of_the_old_cut_name_is_removed_after_the_upgrade() -> None:
    kube = FakeKube()
    for node in ("edge-a", "edge-b"):
        kube.add_node(node)
    deps = _deps(kube)
    old = CANARY_A[:40].rstrip("-")  # the entry Service's name before names.py
    labels = {"amp4ec.io/deployment": CANARY_A, "amp4ec.io/role": "entry"}
    kube.objects[("Service", "ml", old)] = {
        "kind": "Service",
        "metadata": {
            "name": old,
            "namespace": "ml",
            "labels": labels,
            "ownerReferences": _owner(CANARY_A, "uid-a"),
        },
    }
    status: dict[str, Any] = {}

    async def scenario() -> Outcome:
        await _step(deps, CANARY_A, "uid-a", SPEC, status)
        kube.start_pods()
        return await _step(deps, CANARY_A, "uid-a", SPEC, status)

    assert asyncio.run(scenario()).reason == "Serving"
    assert ("Service", old) in kube.deleted and status["endpoint"].startswith(child_base(CANARY_A) + ".")


# --- shard Pods -------------------------------------------------------------------------------


def _pods(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "Pod"]


@pytest.mark.parametrize(
    "model",
    [
        {"name": "mobilenet_v2"},
        {"name": "mobilenet_v2", "storageUri": "https://models.example/w.pt", "sha256": SHA},
    ],
    ids=["zoo", "https-storage"],
)
def test_shard_pods_are_restricted_and_valid(model: dict[str, Any]) -> None:
    for pod in _pods(_objects("mnv2", {"model": model})):
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
            writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable and all(
                "emptyDir" in volumes[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"
            )
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["HOME"].startswith("/tmp") and env["TORCH_HOME"].startswith("/tmp")
        assert not any("hostPath" in v for v in volumes.values())
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)


def test_scheduling_fields_come_from_the_chart_then_the_resource() -> None:
    config = OperatorConfig(
        shard_tolerations=({"key": "amp4ec.io/edge", "operator": "Exists", "effect": "NoSchedule"},),
        shard_node_selector={"amp4ec.io/edge": "true"},
        shard_image_pull_secrets=("regcred",),
        shard_priority_class_name="edge-default",
    )
    raw = {
        "model": {"name": "mobilenet_v2"},
        "nodeSelector": {"kubernetes.io/arch": "arm64"},
        "tolerations": [
            {
                "key": "gpu",
                "operator": "Equal",
                "value": "none",
                "effect": "NoExecute",
                "tolerationSeconds": 30,
            }
        ],
        "imagePullSecrets": [{"name": "team-pull"}, {"name": "regcred"}],
        "priorityClassName": "vision-high",
    }
    first = _pods(_objects("mnv2", raw, config))[0]["spec"]
    assert first["nodeSelector"] == {"kubernetes.io/hostname": "edge-a"}  # a node the selectors chose
    assert first["tolerations"] == [
        {"key": "amp4ec.io/edge", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "gpu", "operator": "Equal", "value": "none", "effect": "NoExecute", "tolerationSeconds": 30},
    ]
    assert first["imagePullSecrets"] == [{"name": "regcred"}, {"name": "team-pull"}]
    assert first["priorityClassName"] == "vision-high"
    plain = _pods(_objects("mnv2", None, config))[0]["spec"]
    assert plain["priorityClassName"] == "edge-default" and len(plain["tolerations"]) == 1
    bare = _pods(_objects("mnv2"))[0]["spec"]
    assert "tolerations" not in bare and "imagePullSecrets" not in bare and "priorityClassName" not in bare


def test_a_changed_toleration_is_a_new_plan_and_unset_fields_keep_old_plan_ids() -> None:
    base = {"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 64, 64]}
    spec = parse_spec(base)
    record = _record(spec)
    old_key = {  # plan_id before the pass-through fields existed
        "model": spec.model.model_dump(by_alias=True),
        "inputShape": [1, 3, 64, 64],
        "stages": [(s.pipeline, s.stage, s.node, s.first_block, s.last_block, s.cpu) for s in record.stages],
    }
    assert record.id == hashlib.sha256(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:8]
    tolerant = _record(parse_spec({**base, "tolerations": [{"key": "edge", "operator": "Exists"}]}))
    assert tolerant.id != record.id
    assert _record(parse_spec({**base, "priorityClassName": "high"})).id not in {record.id, tolerant.id}


def test_planning_only_considers_nodes_the_chart_and_the_resource_select() -> None:
    kube = FakeKube()
    kube.add_node("edge-a")
    kube.add_node("edge-b")
    kube.objects[("Node", None, "edge-b")]["metadata"]["labels"]["pool"] = "tainted"
    deps = _deps(kube, OperatorConfig(shard_node_selector={"pool": "tainted"}))
    status: dict[str, Any] = {}
    asyncio.run(_step(deps, "demo", "uid-1", SPEC, status))
    assert status["rollout"]["stages"] and {s["node"] for s in status["rollout"]["stages"]} == {"edge-b"}


# --- NetworkPolicy -----------------------------------------------------------------------------


def _policy(raw: dict[str, Any] | None = None, config: OperatorConfig | None = None) -> dict[str, Any]:
    (policy,) = [o for o in _objects("mnv2", raw, config) if o["kind"] == "NetworkPolicy"]
    return policy


def test_the_network_policy_admits_own_stages_clients_operator_and_prometheus_only() -> None:
    config = OperatorConfig(prometheus_pod_labels={"app.kubernetes.io/name": "prometheus"})
    objs = _objects("mnv2", None, config)
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    for pod in _pods(objs):  # it selects every shard Pod of every plan
        assert spec["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    grpc, operator, metrics, v2 = spec["ingress"]
    assert grpc["ports"] == [{"protocol": "TCP", "port": config.shard_port}]
    clients = {"podSelector": {"matchLabels": {"amp4ec.io/client-of": "mnv2"}}}
    assert grpc["from"] == [{"podSelector": spec["podSelector"]}, clients]
    # The entry's v2 front door: its clients only, not the other stages.
    assert v2 == {"from": [clients], "ports": [{"protocol": "TCP", "port": p} for p in (8000, 8001)]}
    assert operator["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "amp4ec-system"}},
            "podSelector": {"matchLabels": dict(config.operator_pod_labels)},
        }
    ]
    assert metrics["ports"] == [{"protocol": "TCP", "port": config.metrics_port}]
    assert metrics["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    dns, next_stage = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert next_stage == {"to": [{"podSelector": spec["podSelector"]}], "ports": grpc["ports"]}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


def test_only_the_entry_stage_serves_v2_on_the_entry_services_ports() -> None:
    objs = _objects("mnv2")
    entry, later = sorted(_pods(objs), key=lambda p: p["metadata"]["labels"]["amp4ec.io/stage"])
    container = entry["spec"]["containers"][0]
    args = container["args"]
    assert (
        args[args.index("--v2-http-port") + 1] == "8000" and args[args.index("--v2-grpc-port") + 1] == "8001"
    )
    assert args[args.index("--v2-model-name") + 1] == "mnv2"
    assert {"name": "v2-rest", "containerPort": 8000} in container["ports"]
    assert not [a for a in later["spec"]["containers"][0]["args"] if a.startswith("--v2")]
    (service,) = [
        o for o in objs if o["kind"] == "Service" and o["metadata"]["labels"]["amp4ec.io/role"] == "entry"
    ]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("grpc", 50051, "grpc"),
        ("v2-rest", 8000, "v2-rest"),
        ("v2-grpc", 8001, "v2-grpc"),
    ]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(entry, version, strict=True)
        kubernetes_validate.validate(service, version, strict=True)
    off = _objects("mnv2", config=OperatorConfig(v2_rest_port=0))
    assert not [a for p in _pods(off) for a in p["spec"]["containers"][0]["args"] if a.startswith("--v2")]
    assert len(_policy(config=OperatorConfig(v2_rest_port=0))["spec"]["ingress"]) == 3


def test_the_entry_certificate_names_the_entry_service() -> None:
    from cryptography import x509

    from amp4ec import pki
    from amp4ec.operator.certs import entry_hosts

    ca = pki.CertificateAuthority.create()
    pair = ca.issue(pki.stage_identity("ml", "mnv2", 0), hosts=entry_hosts("mnv2", "ml"))
    san = x509.load_pem_x509_certificate(pair.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == [
        "stage-0.mnv2.ml.amp4ec", "mnv2", "mnv2.ml", "mnv2.ml.svc", "mnv2.ml.svc.cluster.local",
    ]  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"hosts: expected an IP address or a DNS name not under \.amp4ec"):
        ca.issue("client.mnv2.ml.amp4ec", hosts=["stage-0.mnv2.ml.amp4ec"])  # an identity is never a host


def test_https_storage_opens_its_port_but_never_link_local() -> None:
    model = {"name": "mobilenet_v2", "storageUri": "https://minio.storage:9000/b/w.pt", "sha256": SHA}
    storage = _policy({"model": model})["spec"]["egress"][-1]
    assert storage["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert storage["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}},
    ]
    pvc = _policy({"model": {"name": "mobilenet_v2", "storageUri": "pvc://claim/w.pt"}})
    assert len(pvc["spec"]["egress"]) == 2  # a claim is a volume, not a connection
    assert not [
        o
        for o in _objects("mnv2", None, OperatorConfig(network_policy=False))
        if o["kind"] == "NetworkPolicy"
    ]


# --- spec validation: what a namespace user may ask for -----------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"name": "os:abort"}}, "spec.model.name: factory module 'os' is not allowed"),
        ({"model": {"name": "sys:exit"}}, "code execution"),
        ({"model": {"name": "testsx.evil:build"}}, "spec.model.name"),  # not a submodule of tests
        (
            {"model": {"name": "m"}, "inputShape": [1, 3, 4096, 4096]},
            "spec.inputShape: expected at most 4194304",
        ),
        ({"model": {"name": "m"}, "inputShape": [2, 3, 1024, 1024]}, "spec.inputShape"),
        (
            {"model": {"name": "m"}, "tolerations": [{"operator": "Equal", "value": "x"}]},
            "spec.tolerations[0]",
        ),
        (
            {
                "model": {"name": "m"},
                "tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}],
            },
            "tolerationSeconds",
        ),
        (
            {"model": {"name": "m"}, "tolerations": [{"key": "a", "effect": "Sometimes"}]},
            "spec.tolerations[0].effect",
        ),
        (
            {"model": {"name": "m"}, "imagePullSecrets": [{"name": "Bad_Name"}]},
            "spec.imagePullSecrets[0].name",
        ),
        ({"model": {"name": "m"}, "priorityClassName": "System Critical"}, "spec.priorityClassName"),
        ({"model": {"name": "m"}, "nodeSelector": {"pool": "x" * 64}}, "spec.nodeSelector"),
    ],
)
def test_refused_specs_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(raw, SpecPolicy(allowed_factory_modules=("tests",)))
    assert message in str(info.value)


def test_factories_only_from_modules_the_admin_allows() -> None:
    with pytest.raises(InvalidSpec, match=r"allowed modules: none"):
        parse_spec({"model": {"name": "tests.model_zoo:residual_net"}})
    policy = OperatorConfig.from_env({"AMP4EC_ALLOWED_FACTORY_MODULES": "tests,acme.nets"}).spec_policy()
    for name in ("tests.model_zoo:residual_net", "tests:build", "acme.nets.resnet:build"):
        assert parse_spec({"model": {"name": name}}, policy).model.name == name
    with pytest.raises(InvalidSpec, match="'acme'"):
        parse_spec({"model": {"name": "acme:build"}}, policy)
    assert parse_spec({"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 1024, 1024]}).input_shape


STORAGE_REFUSED = [
    "https://169.254.169.254/latest/meta-data/iam/x",
    "https://169.254.169.254:443/w.pt",
    "https://2852039166/w.pt",  # 169.254.169.254 as one number
    "https://0xa9fea9fe/w.pt",
    "https://0251.0376.0251.0376/w.pt",
    "https://[fe80::1]/w.pt",
    "https://[::ffff:169.254.169.254]/w.pt",
    "https://[fd00:ec2::254]/w.pt",
    "https://127.0.0.1:8443/w.pt",
    "https://[::1]/w.pt",
    "https://0.0.0.0/w.pt",
    "https://metadata.google.internal/computeMetadata/v1/x",
    "https://METADATA.google.internal./x",
    "https://user:secret@models.example/w.pt",
]


@pytest.mark.parametrize("uri", STORAGE_REFUSED)
def test_storage_uris_at_metadata_loopback_or_link_local_addresses_are_refused(uri: str) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.model\.storageUri: "):
        parse_spec({"model": {"name": "mobilenet_v2", "storageUri": uri, "sha256": SHA}})


@pytest.mark.parametrize(
    "uri",
    [
        "pvc://models/../other/w.pt",
        "pvc://models//etc/passwd",
        "pvc://models/a/../../w.pt",
        "pvc://models/a\\..\\w",
    ],
)
def test_pvc_paths_outside_the_claim_are_refused(uri: str) -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.model\.storageUri: expected a path"):
        parse_spec({"model": {"name": "mobilenet_v2", "storageUri": uri}})


def test_the_admin_may_allow_loopback_storage_for_tests() -> None:
    uri = "https://127.0.0.1:8443/w.pt"
    config = OperatorConfig(storage_allowed_networks=("127.0.0.0/8",))
    assert parse_spec({"model": {"name": "m", "storageUri": uri, "sha256": SHA}}, config.spec_policy())
    pod = _pods(_objects("m", {"model": {"name": "m", "storageUri": uri, "sha256": SHA}}, config))[0]
    init = pod["spec"]["initContainers"][0]["args"]
    assert init[init.index("--allow-network") + 1] == "127.0.0.0/8"  # the initializer agrees
    with pytest.raises(InvalidSpec, match=r"169\.254"):  # the exemption is per network
        parse_spec(
            {"model": {"name": "m", "storageUri": "https://169.254.169.254/x", "sha256": SHA}},
            config.spec_policy(),
        )
    with pytest.raises(ValueError, match="AMP4EC_STORAGE_ALLOWED_NETWORKS"):
        OperatorConfig(storage_allowed_networks=("not-a-cidr",))
    assert parse_networks(["::1/128"])[0].version == 6


def test_a_storage_name_that_resolves_to_loopback_is_refused_before_planning() -> None:
    kube = FakeKube()
    kube.add_node("edge-a")
    status: dict[str, Any] = {}
    spec = {**SPEC, "model": {"name": "mobilenet_v2", "storageUri": "https://localhost/w.pt", "sha256": SHA}}
    outcome = asyncio.run(_step(_deps(kube), "demo", "uid-1", spec, status))
    assert outcome.reason == "InvalidSpec" and outcome.permanent is not None
    assert "spec.model.storageUri: refused: localhost resolves to" in outcome.permanent
    assert not [k for k in kube.objects if k[0] != "Node"]  # nothing created


# --- API errors and retries -------------------------------------------------------------------


class RefusingKube(FakeKube):
    """An API server that refuses every Pod (as a 422 for an invalid derived field would)."""

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if obj["kind"] == "Pod":
            name = obj["metadata"]["name"]
            raise KubeError(f'POST /api/v1/namespaces/ml/pods: 422 Pod "{name}" is invalid: metadata.labels')
        return await super().create(obj)


def test_an_api_refusal_of_a_derived_object_becomes_a_condition_not_a_traceback() -> None:
    kube = RefusingKube()
    kube.add_node("edge-a")
    status: dict[str, Any] = {}
    outcome = asyncio.run(_step(_deps(kube), "refused", "uid-r", SPEC, status))
    assert outcome.reason == "KubernetesRefused" and outcome.retry_s and outcome.permanent is None
    (shards,) = [c for c in status["conditions"] if c["type"] == "ShardsReady"]
    assert shards["status"] == "False" and shards["reason"] == "KubernetesRefused"
    assert "422" in shards["message"] and "metadata.labels" in shards["message"]


@pytest.mark.parametrize("spec", [["model"], "mobilenet_v2", 7])
def test_a_spec_that_is_not_an_object_is_refused_naming_spec(spec: Any) -> None:
    body = {"metadata": {"name": "odd", "namespace": "ml", "uid": "uid-o"}, "spec": spec, "status": "x"}
    target = _target(body)
    assert target.status == {}
    outcome = asyncio.run(reconcile(_deps(FakeKube()), target, trigger="create", adopt=lambda o: None))
    assert outcome is not None and outcome.reason == "InvalidSpec"
    assert outcome.permanent == f"spec: expected an object, got {type(spec).__name__}"


def test_blocked_deployments_back_off_exponentially_up_to_a_cap_while_progress_is_polled() -> None:
    cap = OperatorConfig().retry_cap_s
    assert cap == 300.0
    blocked = Outcome({}, retry_s=30.0, reason="PlanInfeasible")
    assert [retry_delay(blocked, r, cap) for r in range(5)] == [30, 60, 120, 240, cap]
    assert retry_delay(blocked, 10**6, cap) == cap
    starting = Outcome({}, retry_s=2.0, reason="ShardsStarting")
    assert {retry_delay(starting, r, cap) for r in range(20)} == {2.0}
    # AMP4EC_RETRY_CAP_S (the e2e tests' 5 s): the back-off stops doubling there.
    short = OperatorConfig.from_env({"AMP4EC_RETRY_CAP_S": "5"}).retry_cap_s
    unavailable = Outcome({}, retry_s=3.0, reason="StorageUnavailable")
    assert [retry_delay(unavailable, r, short) for r in range(4)] == [3, 5, 5, 5]
    with pytest.raises(ValueError, match=r"AMP4EC_RETRY_CAP_S: expected seconds > 0, got 0\.0"):
        OperatorConfig.from_env({"AMP4EC_RETRY_CAP_S": "0"})  # a retry loop without a pause
    assert {retry_delay(starting, r, short) for r in range(20)} == {2.0}


def test_a_boolean_setting_is_read_strictly() -> None:
    assert OperatorConfig.from_env({"AMP4EC_TLS": "false"}).tls is False
    assert OperatorConfig.from_env({"AMP4EC_NETWORK_POLICY": "Off"}).network_policy is False
    assert OperatorConfig.from_env({"AMP4EC_NETWORK_POLICY": "1"}).network_policy is True
    with pytest.raises(ValueError, match=r"AMP4EC_TLS: expected true or false, got 'flase'"):
        OperatorConfig.from_env({"AMP4EC_TLS": "flase"})  # a typo must not turn TLS off
