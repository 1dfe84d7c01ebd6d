"""``s3://`` and ``caBundle`` from the spec to the Pod, on plain data: validation naming the field,
the initializer's arguments and environment (credentials by reference only), egress, the CRD,
and a missing Secret or ConfigMap read from a Pod's status as the kubelet reports it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from amp4ec.errors import InvalidSpec
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.netpol import network_policy
from amp4ec.operator.profiler_pod import profiler_network_policy, profiler_state
from amp4ec.operator.spec import parse_spec
from amp4ec.operator.storage import INITIALIZER, initializer_blocked, pod_storage
from tests.deploy.test_crd_and_manifests import crd_validator

SHA = "ab" * 32
MODEL = {
    "storageUri": "s3://models/edge/net.pt2",
    "sha256": SHA,
    "s3": {"endpoint": "https://minio.edge:9000", "secretName": "minio-creds"},
    "caBundle": {"configMapName": "edge-ca"},
}


def _spec(**model: Any) -> Any:
    return parse_spec({"model": {**MODEL, **model}, "inputShape": [1, 3, 32, 32]})


def test_an_s3_model_reaches_the_initializer_by_reference_only() -> None:
    storage = pod_storage(_spec(), OperatorConfig())
    (init,) = storage.init_containers
    args = init["args"]
    assert args[args.index("--uri") + 1] == "s3://models/edge/net.pt2"
    assert args[args.index("--s3-endpoint") + 1] == "https://minio.edge:9000"
    assert args[args.index("--s3-region") + 1] == "us-east-1"
    assert args[args.index("--s3-addressing") + 1] == "path"
    assert args[args.index("--s3-secret") + 1] == "minio-creds"
    env = {e["name"]: e["valueFrom"] for e in init["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio-creds", "key": "accessKeyId"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "minio-creds", "key": "secretAccessKey"}}
    assert env["AWS_SESSION_TOKEN"]["secretKeyRef"]["optional"] is True
    assert env["AMP4EC_STORE_CA"] == {"configMapKeyRef": {"name": "edge-ca", "key": "ca.crt"}}
    assert all("value" not in e for e in init["env"])  # never a credential's value
    assert storage.model == f"/mnt/models/{SHA}.pt2"


def test_anonymous_aws_defaults() -> None:
    spec = _spec(s3=None, caBundle=None, storageUri="s3://public-models/net.pt2")
    (init,) = pod_storage(spec, OperatorConfig()).init_containers
    assert "env" not in init and "--s3-endpoint" not in init["args"] and "--s3-secret" not in init["args"]
    assert spec.model.remote_url == "https://s3.us-east-1.amazonaws.com/public-models/net.pt2"
    virtual = _spec(s3={"region": "eu-central-1", "addressing": "virtual"}, caBundle=None)
    assert virtual.model.remote_url == "https://models.s3.eu-central-1.amazonaws.com/edge/net.pt2"


def test_egress_opens_the_endpoints_port() -> None:
    spec = _spec()
    for policy in (
        network_policy("m", "ns", spec, OperatorConfig(), {}),
        profiler_network_policy("m", "ns", spec, OperatorConfig()),
    ):
        ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])]
        assert 9000 in ports


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (
            {"sha256": None, "name": "mobilenet_v2", "storageUri": "s3://models/w.pt"},
            "sha256: required with an s3:// storageUri",
        ),
        ({"storageUri": "s3://Models/x.pt2"}, r"spec\.model\.storageUri: .*expected s3://bucket/key"),
        ({"storageUri": "s3://models/"}, r"spec\.model\.storageUri"),
        ({"s3": {"endpoint": "http://minio:9000"}}, r"spec\.model\.s3\.endpoint: .*in the clear"),
        ({"s3": {"endpoint": "https://minio:9000/bucket"}}, r"spec\.model\.s3\.endpoint: .*without a path"),
        ({"s3": {"endpoint": "https://k:s@minio"}}, r"spec\.model\.s3\.endpoint: .*no user:password"),
        ({"s3": {"secretName": "Bad_Name"}}, r"spec\.model\.s3\.secretName"),
        ({"s3": {"addressing": "dns"}}, r"spec\.model\.s3\.addressing"),
        (
            {"s3": {"endpoint": "https://169.254.169.254"}},
            r"spec\.model\.s3\.endpoint: refused: .*link-local",
        ),
        ({"caBundle": {"configMapName": "x", "key": "../k"}}, r"spec\.model\.caBundle\.key"),
        ({"storageUri": "pvc://claim/m.pt2", "s3": None}, "caBundle: only with an https:// or s3://"),
        ({"storageUri": "https://h/m.pt2"}, "s3: only with an s3:// storageUri"),
    ],
)
def test_mistakes_name_the_field(model: dict[str, Any], field: str) -> None:
    raw = {**MODEL, **model}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(InvalidSpec, match=field):
        parse_spec({"model": raw})


def test_the_crd_accepts_an_s3_model_and_rejects_a_plain_http_endpoint() -> None:
    resource = {
        "apiVersion": "amp4ec.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": "m", "namespace": "ml"},
        "spec": {"model": copy.deepcopy(MODEL)},
    }
    crd_validator().validate(resource)
    resource["spec"]["model"]["s3"]["endpoint"] = "http://minio:9000"
    errors = list(crd_validator().iter_errors(resource))
    assert any(list(e.absolute_path) == ["spec", "model", "s3", "endpoint"] for e in errors)


def _blocked_pod(message: str) -> dict[str, Any]:
    waiting = {"reason": "CreateContainerConfigError", "message": message}
    return {
        "metadata": {"name": "m-profiler-1"},
        "status": {
            "phase": "Pending",
            "initContainerStatuses": [{"name": INITIALIZER, "state": {"waiting": waiting}}],
        },
    }


def test_a_missing_secret_or_configmap_is_a_storage_failure_naming_the_field() -> None:
    pod = _blocked_pod('secret "minio-creds" not found')
    assert initializer_blocked(pod) == 'secret "minio-creds" not found (spec.model.s3.secretName)'
    state = profiler_state(pod, OperatorConfig())
    assert (state.kind, state.reason, state.permanent) == ("failed", "StorageUnavailable", False)
    assert "minio-creds" in state.message and "spec.model.s3.secretName" in state.message
    ca = initializer_blocked(_blocked_pod('configmap "edge-ca" not found'))
    assert ca == 'configmap "edge-ca" not found (spec.model.caBundle)'
    assert initializer_blocked({"status": {"phase": "Pending"}}) is None


def _shard(init_status: dict[str, Any], node: str = "edge-a") -> dict[str, Any]:
    return {
        "metadata": {"name": "m-p1-s0", "labels": {}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": node}},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "Ready", "status": "False"}],
            "initContainerStatuses": [{"name": INITIALIZER, **init_status}],
            "containerStatuses": [{"name": "shard", "state": {"waiting": {"reason": "PodInitializing"}}}],
        },
    }


def test_a_shards_failing_initializer_is_a_fault_of_the_store_named_with_its_cause() -> None:
    """A restarting shard's initializer waits in back-off with the failure in lastState; the
    cause is its last line (FallbackToLogsOnError); the node is never lost for it."""
    from amp4ec.operator.faults import node_faults, shard_state

    message = "fetching...\nstorage initializer: https://h/m.pt2: sha256 expected aa, actual bb"
    digest = _shard(
        {
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 2, "reason": "Error", "message": message}},
        }
    )
    reason, text = shard_state(digest) or ("", "")
    assert reason == "InvalidStorage"
    assert text == (
        "spec.model.storageUri: https://h/m.pt2: sha256 expected aa, actual bb "
        f"(shard Pod m-p1-s0, {INITIALIZER})"
    )
    down = _shard({"state": {"terminated": {"exitCode": 3, "reason": "Error", "message": "x: HTTP 503"}}})
    assert shard_state(down) == (
        "StorageUnavailable",
        f"spec.model.storageUri: x: HTTP 503 (shard Pod m-p1-s0, {INITIALIZER})",
    )
    secret = _shard(
        {"state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}}}
    )
    assert shard_state(secret)[0] == "StorageUnavailable"  # type: ignore[index]
    nodes = [
        {"metadata": {"name": "edge-a"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    ]
    (fault,) = node_faults(["edge-a"], nodes, [digest]).values()
    assert (fault.reason, fault.lost) == ("InvalidStorage", False) and "sha256 expected aa" in fault.message
    fetching = _shard({"state": {"running": {}}, "lastState": {"terminated": {"exitCode": 3}}})
    assert shard_state(fetching) is None  # trying again: nothing to report yet
