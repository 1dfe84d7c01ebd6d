"""The certificate authority behind mutual TLS: EC P-256 keys, one identity per certificate.

Torch-free and grpc-free, so the operator (which runs the cluster's CA) and local mode (an
ephemeral CA per run) share it. An identity is a DNS name under ``.amp4ec`` written into
the certificate's subjectAltName twice: as a DNS name (what gRPC's own hostname check
compares with ``ssl_target_name_override``, so a client pins the identity of the server it
calls) and as a ``spiffe://amp4ec/...`` URI for humans and other tooling. Names:

- ``operator.amp4ec``: the operator, or the local supervisor (the only control-plane caller);
- ``monitor.amp4ec``: the monitor agents (a DaemonSet shares one certificate; the operator
  reaches "any monitor" through a Service);
- ``agent.<node>.amp4ec``: a local-mode node agent (its stage is loaded later, by the supervisor);
- ``stage-<i>.<deployment>.<namespace>.amp4ec``: stage *i* of a deployment's pipelines;
- ``client.<deployment>.<namespace>.amp4ec``: a client authorised to call that deployment.

[Note: private keys on disk] Every private key is written 0600 through ``os.open`` with the
mode (never chmod after the fact: the file is never world-readable, not even for a moment),
and a directory holding keys is 0700.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from amp4ec.errors import InvalidSpec

__all__ = [
    "MONITOR",
    "OPERATOR",
    "CertificateAuthority",
    "KeyPair",
    "agent_identity",
    "client_identity",
    "entry_identity_for_client",
    "identity_uri",
    "not_after",
    "private_dir",
    "profiler_identity",
    "san_for_host",
    "stage_identity",
    "validate_identity",
    "workload_namespace",
    "write_private",
]

OPERATOR = "operator.amp4ec"
MONITOR = "monitor.amp4ec"
_SUFFIX = ".amp4ec"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
LEAF_VALIDITY = datetime.timedelta(days=7)
"""Short-lived leaves: the operator rotates them when less than a third is left."""
CA_VALIDITY = datetime.timedelta(days=3650)


def validate_identity(name: str, field: str = "identity") -> str:
    """A DNS name of lowercase labels ending in ``.amp4ec``; InvalidSpec naming ``field`` otherwise."""
    if not name.endswith(_SUFFIX) or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
        raise InvalidSpec(f"{field}: expected a DNS name ending in {_SUFFIX} (≤253 characters), got {name!r}")
    return name


def _deployment_part(deployment: str) -> str:
    """The deployment's name as DNS labels of an identity: itself when it fits, else a cut and a
    hash of the whole (a Kubernetes name may be 253 characters, one label of them)."""
    if len(deployment) <= 150 and all(_LABEL.match(p) for p in deployment.split(".")):
        return deployment
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:10]
    return f"{deployment[:40].replace('.', '-').strip('-')}-{digest}"


def stage_identity(namespace: str, deployment: str, stage: int) -> str:
    return validate_identity(f"stage-{stage}.{_deployment_part(deployment)}.{namespace}{_SUFFIX}")


def client_identity(namespace: str, deployment: str) -> str:
    return validate_identity(f"client.{_deployment_part(deployment)}.{namespace}{_SUFFIX}")


def profiler_identity(namespace: str, deployment: str) -> str:
    """The identity of a deployment's short-lived profiler Pod: never the monitors' (whoever
    controls the namespace controls that Pod, so its answers plan that namespace only)."""
    return validate_identity(f"profiler.{_deployment_part(deployment)}.{namespace}{_SUFFIX}")


_WORKLOAD = re.compile(r"^(stage-[0-9]+|profiler)\.")


def workload_namespace(identity: str) -> str | None:
    """The namespace of a Pod that loads a deployment's model: ``stage-<i>.<deployment>.<namespace>.amp4ec``
    or ``profiler.<deployment>.<namespace>.amp4ec`` (read from the right: a deployment's part may
    hold dots, a namespace never does); None for any other identity (a client, a monitor)."""
    labels = identity.removesuffix(_SUFFIX).split(".")
    if not identity.endswith(_SUFFIX) or len(labels) < 3 or not _WORKLOAD.match(identity):
        return None
    return labels[-1]


def agent_identity(node: str) -> str:
    return validate_identity(f"agent.{node}{_SUFFIX}")


def entry_identity_for_client(client: str) -> str:
    """``client.<d>.<ns>.amp4ec`` → ``stage-0.<d>.<ns>.amp4ec``: the entry a client certificate is for."""
    if not client.startswith("client."):
        raise InvalidSpec(f"cert: expected a client identity client.<deployment>.<namespace>, got {client!r}")
    return validate_identity("stage-0." + client.removeprefix("client."))


def identity_uri(name: str) -> str:
    """``stage-1.mnv2.default.amp4ec`` → ``spiffe://amp4ec/stage-1.mnv2.default`` (same identity)."""
    return f"spiffe://amp4ec/{name.removesuffix(_SUFFIX)}"


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.crt`` (0644) and ``<stem>.key`` (0600) in ``directory``."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        write_private(key, self.key_pem)
        return cert, key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateAuthority:
    """A self-signed CA issuing one leaf certificate per identity."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self._key = key

    @classmethod
    def create(
        cls, name: str = "amp4ec CA", validity: datetime.timedelta = CA_VALIDITY
    ) -> CertificateAuthority:
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidSpec("ca.key: expected an EC private key")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self._key)

    def issue(
        self, identity: str, validity: datetime.timedelta = LEAF_VALIDITY, *, hosts: Sequence[str] = ()
    ) -> KeyPair:
        """A leaf for ``identity``, valid for both ends of a connection (server and client auth).

        ``hosts``: DNS names or IP addresses a server is also reached by (curl and other TLS
        clients check the address they dialled), written after the identity; never an identity.
        """
        validate_identity(identity)
        names: list[x509.GeneralName] = [x509.DNSName(identity)]
        for host in hosts:
            names.append(san_for_host(host))
        key = _new_key()
        now = _now()
        cert = (
            x509.CertificateBuilder()
            # The CN is for humans (at most 64 characters); peers check the subjectAltName only.
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + validity, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([*names, x509.UniformResourceIdentifier(identity_uri(identity))]),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def san_for_host(host: str) -> x509.GeneralName:
    """An IP address or a DNS name for a subjectAltName; a name under ``.amp4ec`` is refused:
    identities are only ever issued as identities."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    labels = name.split(".")
    if name.endswith(_SUFFIX) or len(name) > 253 or not all(_LABEL.match(p) for p in labels):
        raise InvalidSpec(f"hosts: expected an IP address or a DNS name not under {_SUFFIX}, got {host!r}")
    return x509.DNSName(name)


def not_after(cert_pem: bytes) -> datetime.datetime:
    """When a PEM certificate expires (UTC): what rotation compares against."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def write_private(path: Path, data: bytes) -> None:
    """Write a secret 0600 from its first byte (see [Note: private keys on disk])."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing tmp file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_dir(prefix: str) -> Path:
    """A fresh 0700 temporary directory (``tempfile.mkdtemp`` makes it so) for keys."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix))
