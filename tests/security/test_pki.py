"""The CA and its leaves (amp4ec/pki.py), and the operator's Secrets of them (operator/certs.py)
over the real ``Kube`` client with an in-memory API (tests/deploy/test_rbac.RecordingKube)."""

from __future__ import annotations

import asyncio
import base64
import datetime

import pytest
from cryptography import x509

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.operator import certs
from tests.deploy.test_rbac import RecordingKube


def _sans(pem: bytes) -> list[str]:
    ext = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(v.value) for v in ext.value]


def test_leaves_carry_one_identity_and_chain_to_their_ca() -> None:
    ca = pki.CertificateAuthority.create()
    pair = ca.issue(pki.stage_identity("ns", "mnv2", 1))
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    assert _sans(pair.cert_pem) == ["stage-1.mnv2.ns.amp4ec", "spiffe://amp4ec/stage-1.mnv2.ns"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= pki.LEAF_VALIDITY + datetime.timedelta(
        minutes=5
    )
    assert pki.entry_identity_for_client(pki.client_identity("ns", "mnv2")) == "stage-0.mnv2.ns.amp4ec"
    with pytest.raises(InvalidSpec, match=r"^identity: expected a DNS name"):
        ca.issue("Evil Name")
    with pytest.raises(InvalidSpec, match=r"^cert: expected a client identity"):
        pki.entry_identity_for_client(pki.OPERATOR)


def test_operator_creates_the_ca_once_and_issues_per_stage_and_client_secrets() -> None:
    kube = RecordingKube()

    def data(namespace: str, name: str) -> dict[str, bytes]:
        secret = kube.objects[("secrets", namespace, name)]
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    async def main() -> None:
        ca = await certs.ensure_ca(kube, "amp4ec-system")
        again = await certs.ensure_ca(kube, "amp4ec-system")
        assert again.cert_pem == ca.cert_pem  # read back, not made twice
        owned: list[dict] = []
        issued = await certs.ensure_deployment(kube, ca, "mnv2", "team", 3, {}, owned.append, None)
        assert {o["metadata"]["name"] for o in owned} == {"mnv2-shard-tls", "mnv2-client-tls"}
        shard = data("team", "mnv2-shard-tls")
        assert set(shard) == {"ca.crt"} | {f"stage-{i}.{e}" for i in range(3) for e in ("crt", "key")}
        for i in range(3):
            assert _sans(shard[f"stage-{i}.crt"])[0] == f"stage-{i}.mnv2.team.amp4ec"
        client = data("team", "mnv2-client-tls")
        assert _sans(client["tls.crt"])[0] == "client.mnv2.team.amp4ec" and client["ca.crt"] == ca.cert_pem
        # What was issued still covers it: nothing written, nothing read.
        kube.used.clear()
        assert await certs.ensure_deployment(kube, ca, "mnv2", "team", 3, {}, owned.append, issued) is issued
        assert await certs.ensure_deployment(kube, ca, "mnv2", "team", 2, {}, owned.append, issued) is issued
        assert kube.used == set()
        # More stages, a leaf with less than a third of its life left, or another CA: issued again.
        for later in (
            certs.Issued(ca.cert_pem, 2, issued.not_after),
            certs.Issued(ca.cert_pem, 3, issued.not_after - certs.LEAF_VALIDITY * 0.7),
            certs.Issued(b"another CA", 3, issued.not_after),
        ):
            fresh = await certs.ensure_deployment(kube, ca, "mnv2", "team", 3, {}, owned.append, later)
            assert fresh.stages == 3 and data("team", "mnv2-shard-tls")["stage-1.crt"] != shard["stage-1.crt"]
            shard = data("team", "mnv2-shard-tls")
        assert {verb for _, resource, verb in kube.used if resource == "secrets"} == {"create"}  # never read
        await kube.close()

    asyncio.run(main())


@pytest.mark.parametrize("name", ["a" * 253, "a" * 64 + ".b", "x." * 100 + "y", "mnv2"])
def test_any_kubernetes_name_gets_a_valid_distinct_identity(name: str) -> None:
    identity = pki.stage_identity("ns", name, 12)
    assert pki.validate_identity(identity) == identity and identity.endswith(".ns.amp4ec")
    assert identity != pki.stage_identity("ns", name + "z", 12)
    assert pki.entry_identity_for_client(pki.client_identity("ns", name)) == pki.stage_identity("ns", name, 0)
    pki.CertificateAuthority.create().issue(identity)


def test_secret_names_stay_within_kubernetes_limits() -> None:
    name = "a" * 253
    assert len(certs.shard_secret_name(name)) <= 253 and certs.shard_secret_name(name).endswith("-shard-tls")
    assert certs.shard_secret_name(name) != certs.shard_secret_name("a" * 252)
