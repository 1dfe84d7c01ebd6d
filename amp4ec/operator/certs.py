"""The cluster's certificate authority, run by the operator, and the Secrets it issues.

- ``amp4ec-ca`` (the operator's namespace): the CA certificate and key, created when missing
  (a cluster admin may create it beforehand to bring their own CA). Only the operator reads it.
- ``amp4ec-monitor-tls`` (the operator's namespace): the monitors' leaf (``monitor.amp4ec``),
  mounted by the monitor DaemonSet.
- ``<deployment>-shard-tls`` (the deployment's namespace): one leaf per stage index
  (``stage-<i>.crt``/``.key``, identity ``stage-<i>.<deployment>.<namespace>.amp4ec``); a shard
  Pod mounts only its own stage's pair (desired.py).
- ``<deployment>-client-tls``: the deployment's client leaf (``ca.crt``, ``tls.crt``,
  ``tls.key``), what ``amp4ec infer --ca --cert --key`` takes (docs/security.md).
- ``<deployment>-profiler-tls``: the leaf of the deployment's short-lived profiler Pod
  (``profiler.<deployment>.<namespace>.amp4ec``, valid ``PROFILER_VALIDITY``), issued afresh
  for each profiler Pod (profiler_pod.py); never the monitors' identity.

With ``tls.issuer.kind: cert-manager`` none of this runs: cert-manager issues the leaves
(``certmanager.py``) into ``<deployment>-stage-<i>-tls`` and the same client Secret.

Leaves live ``LEAF_VALIDITY`` and are re-issued once less than a third of that is left
(every reconciliation checks; kubelet refreshes the mounted files). Deployment Secrets are
owned by their InferenceDeployment (deleted with it).

[Note: write-only Secrets] The operator never reads a Secret outside its own namespace: being
able to read every Secret of the cluster is a privilege it does not need. It remembers what
it issued per deployment (``Issued``, in memory) and writes a deployment's Secrets whole
(create, or patch when they exist); after a restart it issues them once more. In its own
namespace it reads the CA and the monitors' Secret, and the chart grants ``get`` on those two
names only.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from amp4ec import pki
from amp4ec.operator.k8s import Conflict, Kube
from amp4ec.operator.names import child_base

__all__ = [
    "CA_SECRET",
    "LEAF_VALIDITY",
    "MONITOR_SECRET",
    "Issued",
    "client_secret_name",
    "ensure_ca",
    "ensure_deployment",
    "ensure_leaves",
    "ensure_monitors",
    "ensure_profiler",
    "entry_hosts",
    "profiler_secret_name",
    "shard_secret_name",
    "stage_secret_name",
]

CA_SECRET = "amp4ec-ca"
MONITOR_SECRET = "amp4ec-monitor-tls"
LEAF_VALIDITY = datetime.timedelta(days=30)
PROFILER_VALIDITY = datetime.timedelta(days=1)
"""A profiler Pod lives minutes (its ``activeDeadlineSeconds``); its leaf a day at most."""
_RENEW_WITHIN = LEAF_VALIDITY / 3


def _name(deployment: str, suffix: str) -> str:
    """``<deployment>-<suffix>``, cut with a hash when too long for a Secret name (253)."""
    name = f"{deployment}-{suffix}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:8]
    return f"{deployment[: 252 - len(suffix) - 9].rstrip('-.')}-{digest}-{suffix}"


def shard_secret_name(deployment: str) -> str:
    return _name(deployment, "shard-tls")


def client_secret_name(deployment: str) -> str:
    return _name(deployment, "client-tls")


def stage_secret_name(deployment: str, stage: int) -> str:
    """Stage ``stage``'s own Secret when cert-manager issues the leaves (one leaf per Secret)."""
    return _name(deployment, f"stage-{stage}-tls")


def entry_hosts(deployment: str, namespace: str) -> list[str]:
    """The entry Service's DNS names, written into the stage-0 leaf beside its identity: the
    v2 front door serves with it, and curl checks the name it dialled."""
    svc = child_base(deployment)
    return [svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local"]


def profiler_secret_name(deployment: str) -> str:
    return _name(deployment, "profiler-tls")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode(secret: dict[str, Any] | None) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}


def _secret(name: str, namespace: str, data: dict[str, bytes], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {k: _b64(v) for k, v in data.items()},
    }


async def ensure_ca(kube: Kube, namespace: str) -> pki.CertificateAuthority:
    """The CA of ``amp4ec-ca``, created (once, whoever wins a race) when missing."""
    secret = await kube.get("Secret", namespace, CA_SECRET)
    if secret is None:
        ca = pki.CertificateAuthority.create("amp4ec cluster CA")
        labels = {"app.kubernetes.io/managed-by": "amp4ec-operator"}
        obj = _secret(CA_SECRET, namespace, {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}, labels)
        with contextlib.suppress(Conflict):  # another operator made it first: use theirs
            await kube.create(obj)
            return ca
        secret = await kube.get("Secret", namespace, CA_SECRET)
    data = _decode(secret)
    if "ca.crt" not in data or "ca.key" not in data:
        raise ValueError(f"Secret {namespace}/{CA_SECRET}: expected keys ca.crt and ca.key")
    return pki.CertificateAuthority.load(data["ca.crt"], data["ca.key"])


def _due(cert_pem: bytes | None, ca: pki.CertificateAuthority, now: datetime.datetime) -> bool:
    if not cert_pem:
        return True
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    # Re-issue when nearly expired or signed by another CA (the CA Secret was replaced).
    return cert.not_valid_after_utc - now < _RENEW_WITHIN or cert.issuer != ca.cert.subject


async def ensure_leaves(
    kube: Kube,
    ca: pki.CertificateAuthority,
    name: str,
    namespace: str,
    leaves: Iterable[tuple[str, str]],
    labels: dict[str, str],
    adopt: Callable[[dict[str, Any]], None] | None = None,
) -> bool:
    """Secret ``name`` holds ``ca.crt`` and, per (stem, identity), ``<stem>.crt``/``<stem>.key``
    valid for a while yet; issues what is missing or due. True when it wrote anything."""
    now = datetime.datetime.now(datetime.timezone.utc)
    secret = await kube.get("Secret", namespace, name)
    data = _decode(secret)
    update: dict[str, bytes] = {}
    if data.get("ca.crt") != ca.cert_pem:
        update["ca.crt"] = ca.cert_pem
    for stem, identity in leaves:
        if update.get("ca.crt") or _due(data.get(f"{stem}.crt"), ca, now):
            pair = ca.issue(identity, LEAF_VALIDITY)
            update[f"{stem}.crt"], update[f"{stem}.key"] = pair.cert_pem, pair.key_pem
    if not update:
        return False
    if secret is None:
        obj = _secret(name, namespace, update, labels)
        if adopt is not None:
            adopt(obj)
        try:
            await kube.create(obj)
            return True
        except Conflict:  # made meanwhile: patch it below
            pass
    await kube.patch("Secret", namespace, name, {"data": {k: _b64(v) for k, v in update.items()}})
    return True


async def ensure_monitors(kube: Kube, ca: pki.CertificateAuthority, namespace: str) -> None:
    """``amp4ec-monitor-tls``: the leaf every monitor presents (``monitor.amp4ec``)."""
    labels = {"app.kubernetes.io/managed-by": "amp4ec-operator"}
    await ensure_leaves(kube, ca, MONITOR_SECRET, namespace, [("tls", pki.MONITOR)], labels)


@dataclass(frozen=True)
class Issued:
    """What the operator last wrote into a deployment's Secrets (see [Note: write-only Secrets])."""

    ca: bytes
    """The issuing CA's certificate (PEM)."""
    stages: int
    not_after: datetime.datetime

    def covers(self, ca: pki.CertificateAuthority, stages: int, now: datetime.datetime) -> bool:
        return self.ca == ca.cert_pem and self.stages >= stages and self.not_after - now >= _RENEW_WITHIN


async def ensure_deployment(
    kube: Kube,
    ca: pki.CertificateAuthority,
    deployment: str,
    namespace: str,
    stages: int,
    labels: dict[str, str],
    adopt: Callable[[dict[str, Any]], None],
    issued: Issued | None,
) -> Issued:
    """The shard Secret (a leaf per stage index below ``stages``) and the client Secret, written
    whole unless ``issued`` (what was written last) still covers them; never read back."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if issued is not None and issued.covers(ca, stages, now):
        return issued
    shard = [(f"stage-{i}", pki.stage_identity(namespace, deployment, i)) for i in range(stages)]
    client = [("tls", pki.client_identity(namespace, deployment))]
    not_after = now + LEAF_VALIDITY
    for name, leaves in ((shard_secret_name(deployment), shard), (client_secret_name(deployment), client)):
        data = {"ca.crt": ca.cert_pem}
        for stem, identity in leaves:
            hosts = entry_hosts(deployment, namespace) if stem == "stage-0" else ()
            pair = ca.issue(identity, LEAF_VALIDITY, hosts=hosts)
            data[f"{stem}.crt"], data[f"{stem}.key"] = pair.cert_pem, pair.key_pem
            not_after = min(not_after, pki.not_after(pair.cert_pem))
        obj = _secret(name, namespace, data, labels)
        adopt(obj)
        try:
            await kube.create(obj)
        except Conflict:  # written before (an earlier plan, a restarted operator): replace its keys
            await kube.patch("Secret", namespace, name, {"data": obj["data"]})
    return Issued(ca.cert_pem, stages, not_after)


async def ensure_profiler(
    kube: Kube,
    ca: pki.CertificateAuthority,
    deployment: str,
    namespace: str,
    labels: dict[str, str],
    adopt: Callable[[dict[str, Any]], None],
) -> None:
    """Secret ``<deployment>-profiler-tls``: a fresh profiler leaf, written whole (never read back)."""
    pair = ca.issue(pki.profiler_identity(namespace, deployment), PROFILER_VALIDITY)
    data = {"ca.crt": ca.cert_pem, "tls.crt": pair.cert_pem, "tls.key": pair.key_pem}
    obj = _secret(profiler_secret_name(deployment), namespace, data, labels)
    adopt(obj)
    try:
        await kube.create(obj)
    except Conflict:  # an earlier profiler's: replace its key
        await kube.patch("Secret", namespace, obj["metadata"]["name"], {"data": obj["data"]})
