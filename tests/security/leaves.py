"""Certificate files on disk as a Pod sees its mounted Secret, for the renewal tests."""

from __future__ import annotations

from pathlib import Path

from amp4ec import pki

__all__ = ["write_leaf"]


def write_leaf(ca: pki.CertificateAuthority, folder: Path, identity: str, name: str = "agent") -> None:
    """Write ``ca.crt``, ``<name>.crt`` and ``<name>.key`` (a leaf of ``identity`` issued by ``ca``)
    into ``folder`` the way kubelet updates a Secret volume: each file replaced, never edited."""
    tmp = folder / ".new"
    tmp.mkdir(exist_ok=True)
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue(identity).write(tmp, name)
    for file in ("ca.crt", f"{name}.crt", f"{name}.key"):
        (tmp / file).replace(folder / file)
