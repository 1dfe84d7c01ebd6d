"""Profiling in the deployment's namespace, on plain data: the profiler Pod as rendered, what its
status says, and the operator's steps (cache, one Pod per key, failures and back-off) against an
in-memory API. The real Pod, process and call are in test_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from typing import Any

import kubernetes_validate
import pytest

from amp4ec.errors import InvalidSpec
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import deployment_policy, desired_objects
from amp4ec.operator.profiler_pod import profiler_network_policy, profiler_pod, profiler_state
from amp4ec.operator.profiles import ModelCosts, ProfileKey, Profiler, ProfilerFailed, Profiling
from amp4ec.operator.spec import parse_spec
from amp4ec.planner.types import LayerProfile
from amp4ec.wire.transport import TransportSecurity
from tests.operator.test_hardening import KUBE_VERSIONS, SHA, FakeKube, _record

PT2 = {"model": {"storageUri": "https://models.example/m.pt2", "sha256": SHA}, "inputShape": [1, 3, 16, 16]}
CONFIG = OperatorConfig(tls=False)


def _spec(raw: dict[str, Any]) -> Any:
    return parse_spec(raw, CONFIG.spec_policy())


# --- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"storageUri": "https://h/m.pt2"}, "spec.model: sha256: required with a .pt2"),
        ({"storageUri": "pvc://c/m.pt2"}, "spec.model: sha256: required with a .pt2"),
        (
            {"name": "mobilenet_v2", "storageUri": "pvc://c/m.pt2", "sha256": SHA},
            "spec.model: name: leave it out",
        ),
        ({"storageUri": "pvc://c/w.pt"}, "spec.model: name: required"),
    ],
)
def test_a_pt2_source_is_the_model_and_needs_its_digest(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message.replace(".", r"\.")):
        _spec({"model": raw})


def test_shards_load_the_verified_archive_from_their_own_volume() -> None:
    spec = _spec(PT2)
    for pod in [o for o in desired_objects("mine", "ml", spec, _record(spec), CONFIG) if o["kind"] == "Pod"]:
        (init,) = pod["spec"]["initContainers"]
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1] == f"/mnt/models/{SHA}.pt2" and "--weights" not in args
        assert init["args"][init["args"].index("--out") + 1] == f"/mnt/models/{SHA}.pt2"
        assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"


# --- the profiler Pod -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        PT2,
        {"model": {"name": "tests.model_zoo:residual_net", "storageUri": "pvc://models/w.pt"}},
        {
            "model": {
                "storageUri": "s3://models/m.pt2",
                "sha256": SHA,
                "s3": {"endpoint": "https://minio.example:9000", "secretName": "minio"},
                "caBundle": {"configMapName": "edge-ca"},
            }
        },
    ],
    ids=["https-pt2", "pvc-weights", "s3-pt2-private-ca"],
)
def test_the_profiler_pod_is_restricted_limited_owned_and_valid(raw: dict[str, Any]) -> None:
    config = OperatorConfig(
        allowed_factory_modules=("tests",), profiler_memory="768Mi", profiler_deadline_s=90
    )
    spec = parse_spec(raw, config.spec_policy())
    pod = profiler_pod("mine", "ml", spec, config, "ab" * 32)
    podspec = pod["spec"]
    (c,) = podspec["containers"]
    assert c["args"][:3] == ["--profiler", "--model", c["args"][2]] and "--port" not in c["args"]
    assert "--tls-ca" in c["args"] and "--insecure" not in c["args"]
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "768Mi"}
    assert c["resources"]["requests"] == {"cpu": "0", "memory": "0"}  # schedules on a full node
    assert podspec["activeDeadlineSeconds"] == 90 and podspec["restartPolicy"] == "Never"
    assert podspec["automountServiceAccountToken"] is False
    assert "nodeSelector" not in podspec  # any node: none picked in advance
    tls = next(v for v in podspec["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == "mine-profiler-tls"
    claims = [v for v in podspec["volumes"] if "persistentVolumeClaim" in v]
    assert all(v["persistentVolumeClaim"]["readOnly"] for v in claims)
    assert not any(m["name"] == "model-pvc" for m in c["volumeMounts"])  # the claim: initializer only
    assert pod["metadata"]["labels"]["amp4ec.io/role"] == "profiler"
    policy = profiler_network_policy("mine", "ml", spec, config)
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "amp4ec-system"
    }
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
        kubernetes_validate.validate(policy, version, strict=True)


def _pod(phase: str = "Pending", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"phase": phase, **status}}


def _terminated(name: str, code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    return {"name": name, "state": {"terminated": {"exitCode": code, "reason": reason, "message": message}}}


@pytest.mark.parametrize(
    ("pod", "kind", "reason", "words"),
    [
        (_pod(), "starting", "", "Pending"),
        (
            _pod("Running", podIP="fd00::7", conditions=[{"type": "Ready", "status": "True"}]),
            "ready",
            "",
            "",
        ),
        (
            _pod(
                "Failed",
                initContainerStatuses=[
                    _terminated(
                        "storage-initializer",
                        2,
                        message="x\nstorage initializer: https://h/m.pt2: sha256 expected a, actual b",
                    )
                ],
            ),
            "failed",
            "InvalidStorage",
            "https://h/m.pt2: sha256 expected a, actual b",
        ),
        (
            _pod(
                "Failed",
                initContainerStatuses=[
                    _terminated(
                        "storage-initializer",
                        3,
                        message="storage initializer: https://h/m.pt2: [Errno 111] Connection refused",
                    )
                ],
            ),
            "failed",
            "StorageUnavailable",
            "Connection refused",
        ),
        (
            _pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "message": 'persistentvolumeclaim "models" not found',
                    }
                ]
            ),
            "failed",
            "StorageUnavailable",
            'persistentvolumeclaim "models" not found',
        ),
        (
            _pod("Failed", containerStatuses=[_terminated("profiler", 137, "OOMKilled")]),
            "failed",
            "ProfilerFailed",
            "ran out of memory (OOMKilled at its limit of 2Gi; chart value profiler.memory)",
        ),
        (
            _pod("Failed", reason="DeadlineExceeded"),
            "failed",
            "ProfilerFailed",
            "exceeded its deadline of 600 s",
        ),
    ],
    ids=["pending", "ready-ipv6", "bad-digest", "unreachable", "no-claim", "oom", "deadline"],
)
def test_what_a_profiler_pods_status_says(pod: dict[str, Any], kind: str, reason: str, words: str) -> None:
    state = profiler_state(pod, OperatorConfig())
    assert (state.kind, state.reason) == (kind, reason)
    assert words in state.message
    if kind == "ready":
        assert state.address == "[fd00::7]"


# --- the operator's steps ---------------------------------------------------------------------

COSTS = ModelCosts((LayerProfile("b0", 10**6, 10**5, 10**4, 5.0),), input_bytes=10**4, reference_ms=10.0)


class Answering(Profiler):
    """The real steps; the gRPC call answered here (or failing as told)."""

    def __init__(self, kube: FakeKube, config: OperatorConfig = CONFIG) -> None:
        super().__init__(kube, config, TransportSecurity.plaintext(), None)  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.answer: ModelCosts | Exception = COSTS

    async def _call(self, target: str, name: str, namespace: str, spec: Any) -> ModelCosts:
        self.calls.append(target)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _adopt(uid: str) -> Any:
    def adopt(obj: dict[str, Any]) -> None:
        obj["metadata"]["ownerReferences"] = [{"kind": "InferenceDeployment", "name": uid, "uid": uid}]

    return adopt


def _profiler_pods(kube: FakeKube) -> list[dict[str, Any]]:
    return [o for (k, _, _), o in kube.objects.items() if k == "Pod"]


def _run(
    kube: FakeKube, profiler: Profiler, name: str, namespace: str = "ml", raw: dict[str, Any] = PT2
) -> Any:
    try:
        return asyncio.run(profiler.costs(name, namespace, name, _spec(raw), _adopt(name)))
    except (Profiling, ProfilerFailed, InvalidSpec) as exc:
        return exc


def _ready(kube: FakeKube) -> None:
    for pod in _profiler_pods(kube):
        pod["status"] = {
            "phase": "Running",
            "podIP": "10.1.2.3",
            "conditions": [{"type": "Ready", "status": "True"}],
        }


def test_one_profiler_pod_per_key_then_the_cache_and_never_across_namespaces() -> None:
    kube = FakeKube()
    kube.delete = _deleting(kube)  # type: ignore[attr-defined]
    profiler = Answering(kube)
    assert isinstance(_run(kube, profiler, "a"), Profiling)
    assert isinstance(_run(kube, profiler, "b"), Profiling)  # same key, same namespace: waits for a's
    assert len(_profiler_pods(kube)) == 1
    _ready(kube)
    assert isinstance(_run(kube, profiler, "b"), Profiling)  # a's Pod: a's reconciliation calls it
    assert _run(kube, profiler, "a") == COSTS
    assert _run(kube, profiler, "b") == COSTS  # from the cache
    assert profiler.calls == ["10.1.2.3:50052"] and not _profiler_pods(kube)  # called once, Pod deleted
    assert isinstance(_run(kube, profiler, "a", namespace="other"), Profiling)  # another namespace: its own
    other = {**PT2, "model": {**PT2["model"], "sha256": "b" * 64}}
    assert ProfileKey.of(_spec(other), "ml") != ProfileKey.of(_spec(PT2), "ml")  # another archive


def _deleting(kube: FakeKube) -> Any:
    async def delete(kind: str, namespace: str | None, name: str) -> None:
        kube.deleted.append((kind, name))
        kube.objects.pop((kind, namespace, name), None)

    return delete


def test_a_permanent_failure_is_answered_again_without_a_new_pod_and_a_transient_one_backs_off() -> None:
    kube = FakeKube()
    kube.delete = _deleting(kube)  # type: ignore[attr-defined]
    profiler = Answering(kube, OperatorConfig(tls=False, infeasible_retry_s=3600))
    _run(kube, profiler, "a")
    (pod,) = _profiler_pods(kube)
    pod["status"] = {
        "phase": "Failed",
        "initContainerStatuses": [
            _terminated("storage-initializer", 2, message="sha256 expected a, actual b")
        ],
    }
    first = _run(kube, profiler, "a")
    assert isinstance(first, ProfilerFailed) and first.permanent and first.reason == "InvalidStorage"
    assert str(first).startswith("spec.model.storageUri: ")
    assert _run(kube, profiler, "a") is first and not _profiler_pods(kube)  # no Pod loop

    unreachable = {**PT2, "model": {**PT2["model"], "storageUri": "https://down.example/m.pt2"}}
    _run(kube, profiler, "a", raw=unreachable)
    (pod,) = _profiler_pods(kube)
    pod["status"] = {
        "phase": "Failed",
        "initContainerStatuses": [_terminated("storage-initializer", 3, message="refused")],
    }
    failed = _run(kube, profiler, "a", raw=unreachable)
    assert (
        isinstance(failed, ProfilerFailed) and not failed.permanent and failed.reason == "StorageUnavailable"
    )
    assert _run(kube, profiler, "a", raw=unreachable) is failed and not _profiler_pods(kube)  # backs off


def test_a_profiler_out_of_memory_is_its_own_failure_never_an_invalid_model() -> None:
    kube = FakeKube()
    kube.delete = _deleting(kube)  # type: ignore[attr-defined]
    profiler = Answering(kube)
    _run(kube, profiler, "a")
    _ready(kube)
    profiler.answer = ProfilerFailed("ProfilerFailed", "profiler x: out of memory while profiling")
    failed = _run(kube, profiler, "a")
    assert isinstance(failed, ProfilerFailed) and failed.reason == "ProfilerFailed" and not failed.permanent
    assert not _profiler_pods(kube)


def test_a_storage_failure_is_keyed_by_how_the_store_is_reached_a_profile_by_content() -> None:
    """One deployment's wrong Secret is not another's failure; a success is shared by digest."""
    s3 = {"storageUri": "s3://models/m.pt2", "sha256": SHA}
    a = ProfileKey.of(_spec({"model": {**s3, "s3": {"secretName": "a"}}}), "ml")
    b = ProfileKey.of(_spec({"model": {**s3, "s3": {"secretName": "b"}}}), "ml")
    assert a != b and a.digest() != b.digest() and a.content() == b.content()
    assert ProfileKey.of(_spec(PT2), "ml").access == ""


def test_a_batching_deployment_profiles_at_its_batch_sizes() -> None:
    plain = ProfileKey.of(_spec(PT2), "ml")
    batched = ProfileKey.of(_spec({**PT2, "batching": {"maxBatchRequests": 4}}), "ml")
    assert plain.batch_sizes == () and batched.batch_sizes == (2, 4)
    assert batched != plain and batched.digest() != plain.digest()  # its own profiler Pod and cache entry
    # A key without batch sizes (or storage access) keeps the digest it had before they existed.
    before = {k: v for k, v in dataclasses.asdict(plain).items() if k not in ("batch_sizes", "access")}
    assert plain.digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()


# --- the node-wide model cache ----------------------------------------------------------------

CACHE = "amp4ec-monitor-cache.amp4ec-system.svc:50054"


def test_with_the_node_cache_initializers_present_the_pods_leaf_and_may_reach_the_monitors() -> None:
    config = OperatorConfig(model_cache_address=CACHE)
    spec = _spec(PT2)
    pods = [o for o in desired_objects("mine", "ml", spec, _record(spec), config) if o["kind"] == "Pod"]
    for pod in [*pods, profiler_pod("mine", "ml", spec, config, "k" * 64)]:
        (init,) = pod["spec"]["initContainers"]
        args = init["args"]
        assert args[args.index("--cache") + 1] == CACHE
        leaf = {a: args[args.index(a) + 1] for a in ("--tls-ca", "--tls-cert", "--tls-key")}
        assert leaf == {
            "--tls-ca": "/var/run/amp4ec/tls/ca.crt",
            "--tls-cert": "/var/run/amp4ec/tls/tls.crt",
            "--tls-key": "/var/run/amp4ec/tls/tls.key",
        }
        assert {"name": "tls", "mountPath": "/var/run/amp4ec/tls", "readOnly": True} in init["volumeMounts"]
        assert not any("hostPath" in v for v in pod["spec"]["volumes"])  # still restricted
    monitors = {
        "to": [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "amp4ec-system"}},
                "podSelector": {"matchLabels": dict(config.monitor_pod_labels)},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 50054}],
    }
    assert monitors in (deployment_policy("mine", "ml", spec, config) or {})["spec"]["egress"]
    assert monitors in profiler_network_policy("mine", "ml", spec, config)["spec"]["egress"]


@pytest.mark.parametrize(
    ("raw", "config"),
    [
        (PT2, OperatorConfig(model_cache_address="")),  # the chart's cache off
        (PT2, OperatorConfig(model_cache_address=CACHE, tls=False)),  # no certificate to key it by
        ({"model": {"name": "mobilenet_v2", "storageUri": "pvc://m/w.pt"}}, None),  # no digest
    ],
    ids=["off", "insecure", "no-digest"],
)
def test_without_a_cache_address_a_leaf_or_a_digest_the_initializer_fetches_alone(
    raw: dict[str, Any], config: OperatorConfig | None
) -> None:
    config = config or OperatorConfig(model_cache_address=CACHE)
    spec = _spec(raw)
    pod = next(o for o in desired_objects("mine", "ml", spec, _record(spec), config) if o["kind"] == "Pod")
    (init,) = pod["spec"]["initContainers"]
    assert "--cache" not in init["args"] and "--tls-cert" not in init["args"]
    assert all(m["name"] != "tls" for m in init["volumeMounts"])
    policy = deployment_policy("mine", "ml", spec, config)
    ports = [p["port"] for rule in (policy or {}).get("spec", {}).get("egress", []) for p in rule["ports"]]
    assert 50054 not in ports


def test_a_cache_address_without_a_port_is_refused_naming_its_variable() -> None:
    with pytest.raises(ValueError, match="AMP4EC_MODEL_CACHE_ADDRESS: expected host:port"):
        OperatorConfig.from_env({"AMP4EC_MODEL_CACHE_ADDRESS": "amp4ec-monitor-cache"})
