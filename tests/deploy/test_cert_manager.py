"""tls.issuer.kind: cert-manager, offline: the chart's Certificates and wiring, and the operator's.

Each Certificate is checked against cert-manager's API structurally (``cert_manager.py``); the
leaves it asks for must carry exactly the identities the built-in CA writes, and a shard Pod
must find its leaf at the same paths either way.
"""

from __future__ import annotations

import copy
from typing import Any

import helm_python
import jsonschema
import pytest
from cryptography import x509

from amp4ec import pki
from amp4ec.operator import certmanager
from amp4ec.operator.certs import entry_hosts
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.desired import LABEL_STAGE, desired_objects
from amp4ec.operator.planstatus import plan_record
from amp4ec.operator.spec import parse_spec
from amp4ec.planner.types import Pipeline, Plan, Prediction, Stage
from tests.deploy.cert_manager import validate_certificate
from tests.deploy.chart import CERT_MANAGER_VALUES, by_kind, one, render


def _env(objs: list[dict[str, Any]]) -> dict[str, str]:
    (c,) = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "amp4ec-system") for e in c["env"]}


def _sans(cert_pem: bytes) -> tuple[list[str], list[str]]:
    san = x509.load_pem_x509_certificate(cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return san.value.get_values_for_type(x509.DNSName), san.value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def test_default_is_the_builtin_ca_with_no_certificate() -> None:
    objs = render()
    assert not by_kind(objs, "Certificate")
    env = _env(objs)
    assert "AMP4EC_CERT_ISSUER" not in env and OperatorConfig.from_env(env).issuer() is None


def test_chart_certificates_are_the_operator_and_monitor_identities() -> None:
    objs = render(CERT_MANAGER_VALUES)
    certs = {c["spec"]["secretName"]: c for c in by_kind(objs, "Certificate")}
    assert set(certs) == {"amp4ec-operator-tls", "amp4ec-monitor-tls"}
    for secret, identity in (("amp4ec-operator-tls", pki.OPERATOR), ("amp4ec-monitor-tls", pki.MONITOR)):
        spec = certs[secret]["spec"]
        validate_certificate(certs[secret])
        assert certs[secret]["metadata"]["namespace"] == "amp4ec-system"
        assert spec["dnsNames"] == [identity] and spec["uris"] == [pki.identity_uri(identity)]
        assert spec["issuerRef"] == {"name": "amp4ec-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        # The same request the operator makes for a deployment's leaves (one place decides the key).
        issuer = certmanager.Issuer("amp4ec-ca")
        (client,) = [c for c in certmanager.certificates("d", "ns", 0, issuer, {}, LABEL_STAGE)]
        for key in ("privateKey", "usages", "duration", "renewBefore", "issuerRef"):
            assert spec[key] == client["spec"][key], key
    # The monitors mount the same Secret name either way; the operator mounts its own leaf.
    ds = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "amp4ec-monitor-tls", "defaultMode": 0o440}} in ds[
        "volumes"
    ]
    op = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "amp4ec-operator-tls", "defaultMode": 0o440}} in op[
        "volumes"
    ]
    env = _env(objs)
    (mount,) = [m for m in op["containers"][0]["volumeMounts"] if m["name"] == "tls"]
    config = OperatorConfig.from_env(env)
    assert config.tls_dir == mount["mountPath"] and mount["readOnly"] is True
    assert config.issuer() == certmanager.Issuer("amp4ec-ca", "ClusterIssuer", "cert-manager.io")


def test_an_issuer_of_another_group_and_lifetimes_reach_the_operator() -> None:
    values = copy.deepcopy(CERT_MANAGER_VALUES)
    values["tls"]["issuer"].update(
        ref={"name": "edge-pca", "kind": "AWSPCAClusterIssuer", "group": "awspca.cert-manager.io"},
        duration="2160h",
        renewBefore="360h",
    )
    config = OperatorConfig.from_env(_env(render(values)))
    assert config.issuer() == certmanager.Issuer(
        "edge-pca", "AWSPCAClusterIssuer", "awspca.cert-manager.io", "2160h", "360h"
    )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"tls": {"issuer": {"kind": "vault"}}}, helm_python.HelmValuesError),
        ({"tls": {"issuer": {"kind": "cert-manager", "duration": "30 days"}}}, helm_python.HelmValuesError),
        ({"tls": {"issuer": {"kind": "cert-manager"}}}, helm_python.HelmError),  # no ref.name
    ],
)
def test_mistakes_fail_the_render(values: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=r"kind|duration|tls\.issuer\.ref\.name is required"):
        render(values)


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"AMP4EC_CERT_ISSUER": "amp4ec-ca", "AMP4EC_TLS_DIR": "/t"}, "AMP4EC_CERT_ISSUER"),
        ({"AMP4EC_CERT_ISSUER": "Vault/x", "AMP4EC_TLS_DIR": "/t"}, "Issuer or ClusterIssuer"),
        (
            {"AMP4EC_CERT_ISSUER": "Issuer/x", "AMP4EC_TLS_DIR": "/t", "AMP4EC_CERT_DURATION": "1d"},
            "DURATION",
        ),
        ({"AMP4EC_CERT_ISSUER": "Issuer/x"}, "AMP4EC_TLS_DIR"),
    ],
)
def test_operator_settings_refuse_a_malformed_issuer(env: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        OperatorConfig.from_env(env)


def test_deployment_certificates_ask_for_the_builtin_identities() -> None:
    issuer = certmanager.Issuer("amp4ec-ca")
    labels = {"amp4ec.io/deployment": "mnv2"}
    objs = certmanager.certificates("mnv2", "vision", 3, issuer, labels, LABEL_STAGE)
    ca = pki.CertificateAuthority.create()
    wanted = [pki.stage_identity("vision", "mnv2", i) for i in range(3)] + [
        pki.client_identity("vision", "mnv2")
    ]
    entry = entry_hosts("mnv2", "vision")  # stage 0 serves the v2 front door under these names too
    hosts = [entry if i == 0 else [] for i in range(len(wanted))]
    assert [o["spec"]["dnsNames"] for o in objs] == [[w, *h] for w, h in zip(wanted, hosts, strict=True)]
    for obj, identity, extra in zip(objs, wanted, hosts, strict=True):
        validate_certificate(obj)
        builtin = _sans(ca.issue(identity, hosts=extra).cert_pem)
        assert (obj["spec"]["dnsNames"], obj["spec"]["uris"]) == builtin  # the same subjectAltNames
        assert obj["spec"]["secretTemplate"]["labels"]["amp4ec.io/deployment"] == "mnv2"
    names = [o["spec"]["secretName"] for o in objs]
    assert names == ["mnv2-stage-0-tls", "mnv2-stage-1-tls", "mnv2-stage-2-tls", "mnv2-client-tls"]
    assert [o["metadata"]["labels"].get(LABEL_STAGE) for o in objs] == ["0", "1", "2", None]
    # A long name: identities are cut and hashed as the built-in CA's, names stay within 253.
    long = "a" * 240
    for obj in certmanager.certificates(long, "vision", 1, issuer, {}, LABEL_STAGE):
        validate_certificate(obj)
        assert len(obj["metadata"]["name"]) <= 253


def test_the_certificate_check_is_not_vacuous() -> None:
    (obj,) = certmanager.certificates("d", "ns", 0, certmanager.Issuer("ca"), {}, LABEL_STAGE)
    for change in (
        lambda o: o["spec"].update(dnsName=["x"]),
        lambda o: o["spec"]["privateKey"].update(algorithm="EC"),
        lambda o: o["spec"].update(usages=["serverAuth"]),
        lambda o: o["spec"].update(commonName="x" * 65),
        lambda o: o["spec"].update(renewBefore="800h"),
    ):
        broken = copy.deepcopy(obj)
        change(broken)
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate_certificate(broken)


def test_a_shard_mounts_its_stage_certificate_at_the_builtin_paths() -> None:
    spec = parse_spec({"model": {"name": "mobilenet_v2"}, "inputShape": [1, 3, 64, 64]})
    stages = (Stage("edge-a", 0, 3, 2.0, 0.1, 10 << 20), Stage("edge-b", 4, 9, 3.0, 0.2, 20 << 20))
    plan = Plan("throughput", "optimal", (Pipeline(stages),), Prediction((2.1, 3.2), 3.2, 6.0, 312.5))
    record = plan_record(spec, plan, {"edge-a": 1.0, "edge-b": 1.0})
    builtin = OperatorConfig()
    managed = OperatorConfig(cert_issuer="ClusterIssuer/amp4ec-ca", tls_dir="/t")
    pods = [
        [o for o in desired_objects("mnv2", "vision", spec, record, cfg) if o["kind"] == "Pod"]
        for cfg in (builtin, managed)
    ]
    for a, b in zip(*pods, strict=True):
        ca, cb = a["spec"]["containers"][0], b["spec"]["containers"][0]
        assert ca["args"] == cb["args"] and ca["volumeMounts"] == cb["volumeMounts"]
        (va,) = [v for v in a["spec"]["volumes"] if v["name"] == "tls"]
        (vb,) = [v for v in b["spec"]["volumes"] if v["name"] == "tls"]
        assert [i["path"] for i in va["secret"]["items"]] == [i["path"] for i in vb["secret"]["items"]]
        stage = b["metadata"]["labels"][LABEL_STAGE]
        assert vb["secret"]["secretName"] == f"mnv2-stage-{stage}-tls"
        assert [i["key"] for i in vb["secret"]["items"]] == ["ca.crt", "tls.crt", "tls.key"]
        assert vb["secret"]["defaultMode"] == va["secret"]["defaultMode"] == 0o440
