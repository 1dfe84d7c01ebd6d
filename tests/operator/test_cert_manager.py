"""cert-manager as the issuer, end to end: the operator waits for its Certificates, then serves.

The emulated cluster serves cert-manager's ``Certificate`` kind (as installing its CRDs would)
and a tiny issuer in the test plays cert-manager: for each Certificate it signs the requested
names with a test CA into the Secret the Certificate names (``tls.crt``, ``tls.key``,
``ca.crt``, type ``kubernetes.io/tls``) and sets ``Ready=True``. Until then the operator
creates no shard Pod and says what it waits for; afterwards the real shard process mounts its
stage's Secret and a client with the client Secret gets the monolith's answer. Real kopf, one
real monitor, real Prometheus (one node keeps it cheap: one stage, the client hop under TLS).
"""

from __future__ import annotations

import base64
import datetime
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amp4ec import pki
from amp4ec.operator.certs import entry_hosts
from tests.deploy.cert_manager import go_duration_s, validate_certificate
from tests.operator.cluster import NODES, PODS, SECRETS, FakeCluster, Kubectl, environ
from tests.operator.conftest import (
    Env,
    Namespace,
    Operator,
    _node,
    _stop_all,
    require_prometheus,
    start_monitor,
    start_prometheus,
    wait_for,
)
from tests.operator.test_e2e import LATENCY, infer, monolith, wait_serving

pytestmark = pytest.mark.slow

CERTIFICATES = "cert-manager.io/v1/certificates"
ISSUER = "ClusterIssuer/test-ca"


def _sign(ca: pki.CertificateAuthority, spec: dict[str, Any]) -> tuple[bytes, bytes]:
    """What a CA issuer does with a Certificate's spec: a fresh key, the requested names."""
    assert spec["privateKey"] == {
        "algorithm": "ECDSA",
        "size": 256,
        "encoding": "PKCS8",
        "rotationPolicy": "Always",
    }
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH, "client auth": ExtendedKeyUsageOID.CLIENT_AUTH}
    names = [x509.DNSName(n) for n in spec["dnsNames"]]
    names += [x509.UniformResourceIdentifier(u) for u in spec["uris"]]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(seconds=go_duration_s(spec["duration"])))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([usages[u] for u in spec["usages"] if u in usages]), critical=False
        )
        .sign(ca._key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem


def issue(kubectl: Kubectl, ca: pki.CertificateAuthority, namespace: str) -> list[str]:
    """The test's cert-manager: every Certificate of ``namespace`` not Ready yet is issued."""
    done = []
    for c in kubectl.list(CERTIFICATES, namespace):
        if any(x["type"] == "Ready" for x in (c.get("status") or {}).get("conditions") or ()):
            continue
        spec = c["spec"]
        cert, key = _sign(ca, spec)
        data = {"tls.crt": cert, "tls.key": key, "ca.crt": ca.cert_pem}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": spec["secretName"],
                "namespace": namespace,
                **spec.get("secretTemplate", {}),
            },
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        kubectl.create(SECRETS, secret)
        ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "issued by the test CA"}
        kubectl.patch(
            CERTIFICATES, namespace, c["metadata"]["name"] + "/status", {"status": {"conditions": [ready]}}
        )
        done.append(c["metadata"]["name"])
    return done


@pytest.fixture(scope="module")
def cm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, pki.CertificateAuthority]]:
    binary = require_prometheus()
    workdir = tmp_path_factory.mktemp("cert-manager")
    started: list[subprocess.Popen[bytes]] = []
    with FakeCluster(workdir, environ()) as cluster:
        assert cluster.emulator is not None
        cluster.emulator.register(CERTIFICATES, "Certificate")
        kubectl = Kubectl(cluster.url)
        operator = None
        try:
            kubectl.create(NODES, _node("edge-a"))
            # The chart's two Certificates, as cert-manager would have filled their Secrets.
            ca = pki.CertificateAuthority.create("cert-manager test CA")
            leaves = {}
            for identity, folder in ((pki.MONITOR, "monitor-tls"), (pki.OPERATOR, "operator-tls")):
                leaves[identity] = workdir / folder
                leaves[identity].mkdir(mode=0o700)
                (leaves[identity] / "ca.crt").write_bytes(ca.cert_pem)
                ca.issue(identity).write(leaves[identity], "tls")
            monitor = start_monitor("edge-a", workdir, leaves[pki.MONITOR])
            started.append(monitor.proc)
            prometheus = start_prometheus(
                binary, workdir, [f"127.0.0.1:{monitor.metrics_port}"], cluster.sd_dir
            )
            started.append(prometheus.proc)
            env = environ(
                {
                    "KUBECONFIG": str(cluster.kubeconfig(workdir / "kubeconfig.json")),
                    "AMP4EC_PROMETHEUS_URL": prometheus.url,
                    "AMP4EC_OPERATOR_METRICS_PORT": "0",
                    "AMP4EC_METRICS_PORT_FILE": str(workdir / "operator-metrics.port"),
                    "AMP4EC_READY_POLL_S": "1",
                    "AMP4EC_CAPACITY_MAX_AGE_S": "10",
                    "AMP4EC_ALLOWED_FACTORY_MODULES": "tests",
                    "AMP4EC_CERT_ISSUER": ISSUER,
                    "AMP4EC_TLS_DIR": str(leaves[pki.OPERATOR]),
                }
            )
            operator = Operator(
                env, workdir / "operator.log", metrics_port_file=workdir / "operator-metrics.port"
            )
            operator.start()
            wait_for(lambda: prometheus.query("amp4ec_node_workload_ms"), 60, "node metrics")
            yield Env(cluster, kubectl, prometheus, {"edge-a": monitor}, operator, workdir), ca
        finally:
            if operator is not None:
                operator.stop()
            _stop_all(started)


def test_the_operator_waits_for_cert_manager_then_serves(
    cm_env: tuple[Env, pki.CertificateAuthority], tmp_path: Path
) -> None:
    env, ca = cm_env
    ns = Namespace(env, "cert-manager-0")
    try:
        _scenario(env, ca, ns.name, tmp_path)
    except AssertionError:
        print(env.logs())
        raise
    finally:
        ns.clean()


def _scenario(env: Env, ca: pki.CertificateAuthority, n: str, tmp_path: Path) -> None:
    kubectl = env.kubectl
    created = Namespace(env, n).create("resnet", {**LATENCY, "nodeSelector": {"amp4ec.io/edge": "true"}})
    uid = created["metadata"]["uid"]

    # 0. The model is profiled in a Pod of the namespace, whose leaf cert-manager issues too.
    profiler = wait_for(
        lambda: kubectl.get(CERTIFICATES, n, "resnet-profiler-tls"), 60, "the profiler's Certificate"
    )
    validate_certificate(profiler)
    assert profiler["spec"]["dnsNames"] == [pki.profiler_identity(n, "resnet")]
    assert issue(kubectl, ca, n) == ["resnet-profiler-tls"]

    # 1. The operator asks cert-manager for the stage's and the client's leaves, and waits.
    def pending() -> dict[str, Any] | None:
        c = env.condition(n, "resnet", "ShardsReady")
        return c if c and c["reason"] == "CertificatesPending" else None

    condition = wait_for(pending, 90, "ShardsReady=False, CertificatesPending")
    assert condition["status"] == "False"
    assert re.search(
        r"waiting for cert-manager \(ClusterIssuer test-ca\) to issue Certificate", condition["message"]
    )
    assert "resnet-stage-0-tls (no Ready condition yet)" in condition["message"]
    assert "resnet-client-tls" in condition["message"]
    certificates = {c["metadata"]["name"]: c for c in kubectl.list(CERTIFICATES, n)}
    assert set(certificates) == {"resnet-stage-0-tls", "resnet-client-tls", "resnet-profiler-tls"}
    for name, identity in (
        ("resnet-stage-0-tls", pki.stage_identity(n, "resnet", 0)),
        ("resnet-client-tls", pki.client_identity(n, "resnet")),
    ):
        c = certificates[name]
        validate_certificate(c)
        hosts = entry_hosts("resnet", n) if "stage-0" in name else []
        assert c["spec"]["dnsNames"] == [identity, *hosts] and c["spec"]["secretName"] == name
        assert c["spec"]["issuerRef"] == {
            "name": "test-ca",
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        }
        assert [o["uid"] for o in c["metadata"]["ownerReferences"]] == [uid]
    # It keeps waiting across its retries (kopf records each in the resource), creating no Pod.
    seen = len(env.cluster.history("amp4ec.io/v1alpha1/inferencedeployments", n, "resnet"))
    wait_for(
        lambda: len(env.cluster.history("amp4ec.io/v1alpha1/inferencedeployments", n, "resnet")) >= seen + 2,
        30,
        "two more reconciliations",
    )
    assert pending() is not None and kubectl.list(PODS, n, "amp4ec.io/role=shard") == []
    issued = {c["spec"]["secretName"] for c in certificates.values()}
    secrets = {s["metadata"]["name"] for s in kubectl.list(SECRETS, n)}
    assert secrets <= issued, "the operator writes no Secret under cert-manager"

    # 2. cert-manager issues: the operator proceeds, the shard mounts its stage's Secret, serves.
    assert sorted(issue(kubectl, ca, n)) == ["resnet-client-tls", "resnet-stage-0-tls"]
    wait_serving(env, n, "resnet")
    (pod,) = kubectl.list(PODS, n, "amp4ec.io/role=shard")
    (tls,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "resnet-stage-0-tls"
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(infer(env, n, "resnet", x, tmp_path), monolith(x))

    # 3. Deleting the deployment takes its Certificates with it (owner references).
    kubectl.delete("amp4ec.io/v1alpha1/inferencedeployments", n, "resnet")
    wait_for(lambda: not kubectl.list(CERTIFICATES, n), 60, "the Certificates to be collected")
