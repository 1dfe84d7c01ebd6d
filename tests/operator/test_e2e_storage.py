"""The operator end to end with a user's own model from storage (https, a claim, an S3 store):
the same shared cluster as test_e2e.py (conftest.py's ``env``), in a file of its own so the
test workers run the two halves side by side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509

from amp4ec.wire import transport
from tests.operator.cluster import CONFIGMAPS, CRD, PODS, PVCS, SECRETS
from tests.operator.conftest import NODE_NAMES, Env, Namespace, wait_for
from tests.operator.s3store import S3Store
from tests.operator.store import Store
from tests.operator.test_e2e import infer, owned, reason_is, wait_serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(env: Env) -> Iterator[Store]:
    """An HTTPS model store on loopback whose certificate the cluster's processes trust."""
    assert env.store_tls is not None
    with Store(*env.store_tls) as s:
        yield s


def exported(seed: int = 11) -> tuple[torch.export.ExportedProgram, bytes]:
    """A user's model as a user makes it: a tiny CNN with a residual, torch.export'ed and saved."""
    from tests.model_zoo import ResidualNet

    torch.manual_seed(seed)
    program = torch.export.export(ResidualNet().eval(), (torch.randn(1, 3, 16, 16),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return program, buffer.getvalue()


def history_of(env: Env, namespace: str, name: str) -> list[dict[str, Any]]:
    return [v for v in env.cluster.history(CRD, namespace, name) if v is not None]


def profiler_pods(env: Env, namespace: str) -> list[str]:
    return sorted(p for p in env.cluster.names(PODS, namespace) if "-profiler-" in p)


def node_of(env: Env, namespace: str, pod: str) -> str:
    """The node a Pod was bound to (it may be gone since)."""
    return next(
        v["spec"]["nodeName"]
        for v in env.cluster.history(PODS, namespace, pod)
        if v and v["spec"].get("nodeName")
    )


def initializer_sources(env: Env, namespace: str, pod: str) -> list[str]:
    """Where each run of a Pod's storage initializer got the file (its last line says so)."""
    uid = next(v for v in env.cluster.history(PODS, namespace, pod) if v)["metadata"]["uid"]
    logs = sorted(env.workdir.glob(f"{namespace}-{pod}-{uid[:8]}-init0-*.log"))
    return [log.read_text().strip().splitlines()[-1].rsplit("(from ", 1)[-1].rstrip(")") for log in logs]


def test_a_users_pt2_from_https_or_a_claim_is_profiled_in_its_namespace_and_serves_like_the_monolith(
    ns: Namespace, store: Store, tmp_path: Path
) -> None:
    env, n = ns.env, ns.name
    program, data = exported()
    digest = hashlib.sha256(data).hexdigest()
    store.files["/models/residual.pt2"] = data
    # The same archive on a claim in the namespace (mounted read-only by the initializer only).
    env.kubectl.create(PVCS, {"metadata": {"name": "models", "namespace": n}, "spec": {}})
    (env.cluster.claim_dir(n, "models") / "team").mkdir()
    (env.cluster.claim_dir(n, "models") / "team" / "residual.pt2").write_bytes(data)
    spec = {
        "model": {"storageUri": store.url("/models/residual.pt2"), "sha256": digest},
        "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-a"}],  # two stages at least
        "replan": {"intervalSeconds": 5, "gainThreshold": 0.05},
    }
    uid = ns.create("mine", spec)["metadata"]["uid"]
    wait_for(lambda: profiler_pods(env, n), 60, "mine's profiler Pod")
    claimed = {
        "model": {"storageUri": "pvc://models/team/residual.pt2", "sha256": digest},
        "objective": "latency",
    }
    ns.create("claimed", claimed)  # waits for mine's profile: the same archive
    obj = wait_serving(env, n, "mine")
    stages = obj["status"]["plan"]["stages"]
    assert len(stages) >= 2

    # Profiled once (the claim holds the same archive: its digest names it), in a Pod of the
    # user's namespace: its identity, its limits, then deleted.
    (name,) = profiler_pods(env, n)
    versions = env.cluster.history(PODS, n, name)
    assert versions[-1] is None, "the profiler Pod is deleted once it answered"
    pod = versions[0]
    assert pod is not None and pod["metadata"]["ownerReferences"][0]["uid"] == uid
    podspec = pod["spec"]
    (container,) = podspec["containers"]
    assert "--profiler" in container["args"] and "--port" not in container["args"]  # Profile only
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert podspec["activeDeadlineSeconds"] == 600 and podspec["restartPolicy"] == "Never"
    assert podspec["automountServiceAccountToken"] is False
    assert (
        podspec["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    )
    (init,) = podspec["initContainers"]
    assert init["args"][init["args"].index("--sha256") + 1] == digest
    tls = next(v for v in podspec["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    leaf = base64.b64decode(env.kubectl.get(SECRETS, n, tls)["data"]["tls.crt"])
    names = x509.load_pem_x509_certificate(leaf).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == [
        f"profiler.mine.{n}.amp4ec"
    ]  # never the monitors'
    policy = env.kubectl.get("networking.k8s.io/v1/networkpolicies", n, "mine.profiler")
    assert policy is not None and len(policy["spec"]["ingress"]) == 1  # the operator only
    said = [c for v in history_of(env, n, "mine") for c in (v.get("status") or {}).get("conditions") or ()]
    assert any(c["type"] == "Planned" and c["reason"] == "Profiling" and name in c["message"] for c in said)

    # Each shard verified the archive in its own volume and serves only its blocks of it; each
    # node fetched it once (the profiler's node's monitor kept its copy for the shards there).
    shards = owned(env, n, PODS, "mine")
    for shard in shards:
        args = shard["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1] == f"/mnt/models/{digest}.pt2"
        stage = next(s for s in stages if str(s["stage"]) == shard["metadata"]["labels"]["amp4ec.io/stage"])
        assert args[args.index("--first-block") + 1] == str(stage["firstBlock"])
        assert args[args.index("--last-block") + 1] == str(stage["lastBlock"])
    nodes = {node_of(env, n, name)} | {s["spec"]["nodeName"] for s in shards}
    # At most once per node: the claim's shards (the same archive in this namespace) may have
    # filled a node's cache from the claim first, and then mine's shard there fetches nothing.
    assert 1 <= store.requests.count("/models/residual.pt2") <= len(nodes), (store.requests, nodes)

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = program.module()(x)
    torch.testing.assert_close(infer(env, n, "mine", x, tmp_path), expected)
    wait_serving(env, n, "claimed")
    torch.testing.assert_close(infer(env, n, "claimed", x, tmp_path), expected)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_wrong_digest_an_unreachable_uri_a_non_archive_and_a_missing_claim_each_say_so(
    ns: Namespace, store: Store
) -> None:
    env, n = ns.env, ns.name
    _, data = exported(seed=12)
    digest = hashlib.sha256(data).hexdigest()
    junk = b"PK\x03\x04 not an archive"
    store.files["/m.pt2"], store.files["/junk.pt2"] = data, junk
    ns.create("wrong-digest", {"model": {"storageUri": store.url("/m.pt2"), "sha256": "0" * 64}})
    unreachable = f"https://127.0.0.1:{_closed_port()}/m.pt2"
    ns.create("unreachable", {"model": {"storageUri": unreachable, "sha256": digest}})
    junk_sha = hashlib.sha256(junk).hexdigest()
    ns.create("not-archive", {"model": {"storageUri": store.url("/junk.pt2"), "sha256": junk_sha}})
    ns.create("no-claim", {"model": {"storageUri": "pvc://nowhere/m.pt2", "sha256": digest}})
    expected = {
        "wrong-digest": ("InvalidStorage", f"sha256 expected {'0' * 64}, actual {digest}"),
        "unreachable": ("StorageUnavailable", "Connection refused"),
        "not-archive": ("InvalidStorage", "not a .pt2 archive"),
        "no-claim": ("StorageUnavailable", 'persistentvolumeclaim "nowhere" not found'),
    }
    try:
        for name, (reason, cause) in expected.items():
            planned = wait_for(
                lambda name=name, reason=reason: reason_is(env, n, name, "Planned", reason),
                90,
                f"{name}: {reason}",
            )
            assert planned["message"].startswith("spec.model.storageUri: ") and cause in planned["message"], (
                planned
            )
            assert not owned(env, n, PODS, name), f"{name} got shard Pods"
    except AssertionError:
        print(env.logs())
        raise
    assert (env.deployment(n, "wrong-digest") or {})["status"]["phase"] == "Failed"  # the spec must change
    assert (env.deployment(n, "unreachable") or {})["status"]["phase"] == "Planning"  # retried


def test_a_pt2_from_an_s3_store_with_a_private_ca_serves_and_a_missing_or_wrong_secret_says_so(
    ns: Namespace, tmp_path: Path
) -> None:
    """An edge MinIO stand-in (moto over TLS from a private CA, checking every signature): the
    credentials reach only the initializers (secretKeyRef), the CA through caBundle; a Secret that
    does not exist yet is StorageUnavailable naming it and heals once it is created; a wrong one
    is InvalidStorage naming it; neither Secret's value appears in any status."""
    env, n = ns.env, ns.name
    program, data = exported(seed=13)
    digest = hashlib.sha256(data).hexdigest()

    def secret(name: str, key_id: str, value: str) -> None:
        encoded = {
            k: base64.b64encode(v.encode()).decode()
            for k, v in (("accessKeyId", key_id), ("secretAccessKey", value))
        }
        env.kubectl.create(SECRETS, {"metadata": {"name": name, "namespace": n}, "data": encoded})

    with S3Store() as s3:
        s3.put("models", "team/residual.pt2", data)
        env.kubectl.create(
            CONFIGMAPS, {"metadata": {"name": "edge-ca", "namespace": n}, "data": {"ca.crt": s3.ca_pem}}
        )
        secret("wrong-creds", s3.key_id, "not-the-secret")

        def model(secret_name: str) -> dict[str, Any]:
            return {
                "model": {
                    "storageUri": "s3://models/team/residual.pt2",
                    "sha256": digest,
                    "s3": {"endpoint": s3.endpoint, "secretName": secret_name},
                    "caBundle": {"configMapName": "edge-ca"},
                },
                "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-a"}],  # two stages at least
            }

        ns.create("wrong-secret", model("wrong-creds"))
        ns.create("mine", model("minio-creds"))  # its Secret does not exist yet
        try:
            wrong = wait_for(
                lambda: reason_is(env, n, "wrong-secret", "Planned", "InvalidStorage"), 90, "wrong"
            )
            assert wrong["message"].startswith("spec.model.storageUri: ")
            assert "SignatureDoesNotMatch" in wrong["message"] and "Secret wrong-creds" in wrong["message"]
            missing = wait_for(
                lambda: reason_is(env, n, "mine", "Planned", "StorageUnavailable"), 90, "missing"
            )
            assert 'secret "minio-creds" not found (spec.model.s3.secretName)' in missing["message"], missing
            secret("minio-creds", s3.key_id, s3.secret)  # retried within AMP4EC_RETRY_CAP_S
            obj = wait_serving(env, n, "mine", timeout=240)
        except AssertionError:
            print(json.dumps((env.deployment(n, "mine") or {}).get("status"), indent=1))
            for pod in env.kubectl.list(PODS, n):
                print(pod["metadata"]["name"], json.dumps(pod.get("status"))[:1500])
            raise
        assert len(obj["status"]["plan"]["stages"]) >= 2
        for shard in owned(env, n, PODS, "mine"):
            (init,) = shard["spec"]["initContainers"]
            credentials = [e for e in init["env"] if e["name"].startswith("AWS_")]
            assert len(credentials) == 3 and all("valueFrom" in e for e in credentials)  # by reference
            assert "env" not in shard["spec"]["containers"][0] or all(
                not e["name"].startswith("AWS_") for e in shard["spec"]["containers"][0]["env"]
            )
        said = json.dumps(
            [v.get("status") for v in history_of(env, n, "mine") + history_of(env, n, "wrong-secret")]
        )
        assert s3.secret not in said and "not-the-secret" not in said
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
        with torch.inference_mode():
            expected = program.module()(x)
        torch.testing.assert_close(infer(env, n, "mine", x, tmp_path), expected)


def test_a_shards_store_that_changed_after_profiling_is_named_in_its_status(
    ns: Namespace, store: Store
) -> None:
    """The profiler fetched the archive; the store then serves other bytes: each shard's
    initializer fails the digest, and the deployment says so (ShardsReady, Degraded) with the
    initializer's own cause, without giving up a node for it."""
    env, n = ns.env, ns.name
    _, data = exported(seed=14)
    digest = hashlib.sha256(data).hexdigest()
    replaced = b"PK\x03\x04 replaced"
    store.files["/changed.pt2"], store.then["/changed.pt2"] = data, replaced
    # Its shard away from the profiler's node (the scheduler's first: edge-a), whose monitor kept
    # the archive the profiler verified: a shard there would never ask the store.
    ns.create(
        "changed",
        {
            "model": {"storageUri": store.url("/changed.pt2"), "sha256": digest},
            "nodeSelector": {"kubernetes.io/hostname": "edge-b"},
        },
    )
    try:
        shards = wait_for(
            lambda: reason_is(env, n, "changed", "ShardsReady", "InvalidStorage"), 120, "shards"
        )
        degraded = wait_for(
            lambda: reason_is(env, n, "changed", "Degraded", "InvalidStorage"), 30, "degraded"
        )
    except AssertionError:
        print(env.logs())
        raise
    cause = f"sha256 expected {digest}, actual {hashlib.sha256(replaced).hexdigest()}"
    for c in (shards, degraded):
        assert "spec.model.storageUri: " in c["message"] and cause in c["message"], c
        assert "storage-initializer" in c["message"]
    planned = env.condition(n, "changed", "Planned")
    assert planned is not None and planned["status"] == "True"  # the plan stands: the store is at fault
    assert node_of(env, n, profiler_pods(env, n)[0]) != "edge-b"


def test_shards_on_one_node_fetch_the_model_from_the_store_once(ns: Namespace, store: Store) -> None:
    """Two shards start together on edge-b (two deployments of one archive, one stage each): the
    node's monitor lets one initializer fetch and keep the file and the other read its copy; the
    profiler's node fetched once too. A copy is kept per namespace, on the node's monitor."""
    env, n = ns.env, ns.name
    _, data = exported(seed=15)
    digest = hashlib.sha256(data).hexdigest()
    store.files["/once.pt2"] = data
    spec = {
        "model": {"storageUri": store.url("/once.pt2"), "sha256": digest},
        "objective": "latency",
        "nodeSelector": {"kubernetes.io/hostname": "edge-b"},
    }
    ns.create("one", spec)
    ns.create("two", spec)  # waits for one's profile (the same key)
    for name in ("one", "two"):
        wait_serving(env, n, name)
    shards = [p["metadata"]["name"] for name in ("one", "two") for p in owned(env, n, PODS, name)]
    assert len(shards) == 2 and {node_of(env, n, p) for p in shards} == {"edge-b"}
    (profiler,) = profiler_pods(env, n)
    assert store.requests.count("/once.pt2") == len({node_of(env, n, profiler), "edge-b"})
    sources = sorted(source for p in shards for source in initializer_sources(env, n, p))
    assert sources in (
        ["the node cache", "the store, now in the node cache"],  # edge-b's first shard filled it
        ["the node cache", "the node cache"],  # the profiler ran on edge-b and filled it
    ), sources
    assert (env.monitors["edge-b"].cache_dir / n / digest).read_bytes() == data


def test_the_cluster_wide_monitor_refuses_to_profile_any_model(e2e: Env) -> None:
    from amp4ec import pki
    from amp4ec.wire.transport import TransportSecurity
    from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

    secret = e2e.kubectl.get(SECRETS, "amp4ec-system", "amp4ec-ca")
    ca = pki.CertificateAuthority.load(*(base64.b64decode(secret["data"][k]) for k in ("ca.crt", "ca.key")))
    own = ca.issue(pki.OPERATOR)  # even the operator's own identity
    security = TransportSecurity(ca.cert_pem, own.cert_pem, own.key_pem)
    monitor = e2e.monitors[NODE_NAMES[0]]

    async def profile(model: str) -> grpc.StatusCode:
        async with transport.channel(monitor.address, security, expect_identity=pki.MONITOR) as channel:
            request = agent_pb2.ProfileRequest(model=agent_pb2.StageSpec(model=model))
            try:
                await agent_pb2_grpc.MonitorStub(channel).Profile(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert "profiles no model" in (exc.details() or ""), exc.details()
                return exc.code()
        return grpc.StatusCode.OK

    for model in ("tests.model_zoo:residual_net", "mobilenet_v2"):  # an allowed factory, a zoo model
        assert asyncio.run(profile(model)) == grpc.StatusCode.PERMISSION_DENIED
    assert monitor.proc.poll() is None  # alive, and still publishing capacity
    assert e2e.prometheus.query(f'amp4ec_node_workload_ms{{node="{monitor.node}"}}')
