"""cert-manager as the issuer of a deployment's leaves (``tls.issuer.kind: cert-manager``), pure.

Instead of signing leaves itself (``certs.py``), the operator asks cert-manager for them: one
``Certificate`` (``cert-manager.io/v1``) per identity a deployment needs, the same identities
and subjectAltNames the built-in CA writes (``pki.stage_identity``/``client_identity`` as a DNS
name and as a ``spiffe://amp4ec/...`` URI), EC P-256 keys in PKCS#8, usable at both ends of a
connection. cert-manager writes each into its own Secret (``tls.crt``, ``tls.key``, ``ca.crt``);
a shard Pod mounts its stage's Secret at the same paths as the built-in one's
(``desired._tls_volume``), and the client Secret has the built-in name and keys, so
``amp4ec infer --ca --cert --key`` works unchanged. Renewal is cert-manager's
(``duration``/``renewBefore``); the agents read renewed files at the next handshake.

[Note: waiting on Certificates, not Secrets] The operator learns that a leaf is there from the
Certificate's ``Ready`` condition (cert-manager sets it once the Secret holds a valid, matching
certificate), never by reading the Secret: it keeps its "no Secret read outside its namespace"
rule (certs.py, [Note: write-only Secrets]) and needs no Secret permission at all in this mode.

The operator's own identity and the monitors' are Certificates the chart renders (the
operator mounts its Secret, ``config.tls_dir``), so this module only covers deployments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amp4ec import pki
from amp4ec.operator.certs import client_secret_name, entry_hosts, profiler_secret_name, stage_secret_name

__all__ = [
    "API_VERSION",
    "Issuer",
    "certificates",
    "not_ready",
    "profiler_certificate",
    "same_request",
]

API_VERSION = "cert-manager.io/v1"
_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_KIND = re.compile(r"^[A-Z][A-Za-z0-9]{0,62}$")
_KEY = {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8", "rotationPolicy": "Always"}
"""EC P-256 in PKCS#8, a fresh key at each renewal: what the built-in CA issues."""
_GROUP = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class Issuer:
    """Which cert-manager issuer signs the leaves, and what lifetime to ask for."""

    name: str
    kind: str = "ClusterIssuer"
    """``Issuer`` (namespaced: one of that name must exist in every deployment's namespace) or
    ``ClusterIssuer``; an external issuer's kind with its own ``group``."""
    group: str = "cert-manager.io"
    duration: str = "720h"
    """Requested lifetime (a Go duration), like the built-in CA's 30 days."""
    renew_before: str = "240h"
    """cert-manager renews this long before expiry (a third of the lifetime, as the built-in CA)."""

    @classmethod
    def parse(cls, ref: str, duration: str = "720h", renew_before: str = "240h") -> Issuer:
        """``<Kind>/<name>`` or ``<Kind>.<group>/<name>``; ValueError naming the setting otherwise."""
        kind_group, sep, name = ref.partition("/")
        kind, _, group = kind_group.partition(".")
        group = group or "cert-manager.io"
        if not sep or not _KIND.match(kind) or not _GROUP.match(group) or not _NAME.match(name):
            raise ValueError(
                "AMP4EC_CERT_ISSUER: expected <Kind>/<name> or <Kind>.<group>/<name>"
                f" (e.g. ClusterIssuer/amp4ec-ca), got {ref!r}"
            )
        if group == "cert-manager.io" and kind not in ("Issuer", "ClusterIssuer"):
            raise ValueError(
                f"AMP4EC_CERT_ISSUER: kind {kind!r} of cert-manager.io must be Issuer or ClusterIssuer"
            )
        durations = (("AMP4EC_CERT_DURATION", duration), ("AMP4EC_CERT_RENEW_BEFORE", renew_before))
        for setting, value in durations:
            if not _GO_DURATION.match(value):
                raise ValueError(f"{setting}: expected a Go duration like 720h or 90m, got {value!r}")
        return cls(name, kind, group, duration, renew_before)

    def ref(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "group": self.group}


def _certificate(
    secret: str,
    namespace: str,
    identity: str,
    issuer: Issuer,
    labels: Mapping[str, str],
    hosts: Sequence[str] = (),
) -> dict[str, Any]:
    """``hosts``: DNS names beside the identity (the entry Service's, for stage 0's v2 front door)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "Certificate",
        "metadata": {"name": secret, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "secretName": secret,
            # The CN is for humans (at most 64 characters), as the built-in CA writes it.
            "commonName": identity[:64],
            "dnsNames": [identity, *hosts],
            "uris": [pki.identity_uri(identity)],
            "duration": issuer.duration,
            "renewBefore": issuer.renew_before,
            "privateKey": _KEY,
            "usages": ["digital signature", "server auth", "client auth"],
            "issuerRef": issuer.ref(),
            "secretTemplate": {"labels": dict(labels)},
        },
    }


def certificates(
    deployment: str,
    namespace: str,
    stages: int,
    issuer: Issuer,
    labels: Mapping[str, str],
    stage_label: str,
) -> list[dict[str, Any]]:
    """The Certificates of a deployment of ``stages`` stage indices: one per stage (Secret
    ``<deployment>-stage-<i>-tls``) and the client's (``<deployment>-client-tls``)."""
    out = [
        _certificate(
            stage_secret_name(deployment, i),
            namespace,
            pki.stage_identity(namespace, deployment, i),
            issuer,
            {**labels, stage_label: str(i)},
            entry_hosts(deployment, namespace) if i == 0 else (),
        )
        for i in range(stages)
    ]
    client = pki.client_identity(namespace, deployment)
    out.append(_certificate(client_secret_name(deployment), namespace, client, issuer, labels))
    return out


def profiler_certificate(
    deployment: str, namespace: str, issuer: Issuer, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The Certificate of a deployment's profiler Pod (Secret ``<deployment>-profiler-tls``,
    identity ``profiler.<deployment>.<namespace>.amp4ec``); the kubelet starts the Pod once
    cert-manager has written it."""
    identity = pki.profiler_identity(namespace, deployment)
    return _certificate(profiler_secret_name(deployment), namespace, identity, issuer, labels)


def same_request(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether a live Certificate asks for what ``wanted`` does (else it is replaced)."""
    spec = live.get("spec") or {}
    return all(spec.get(k) == v for k, v in wanted["spec"].items())


def not_ready(live: Mapping[str, Any] | None) -> str | None:
    """None when cert-manager says the Certificate is issued (``Ready=True``), else why not."""
    if live is None:
        return "not created yet"
    for c in (live.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            if c.get("status") == "True":
                return None
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            return f"Ready={c.get('status')}" + (f" ({detail})" if detail else "")
    return "no Ready condition yet"
