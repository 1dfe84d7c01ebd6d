"""The storage initializer: fetch a model file (https://, s3:// or a mounted pvc://) and verify its SHA-256.

Runs as a shard Pod's init container (``python -m amp4ec.operator.fetch``, the operator
image), KServe's storage-initializer pattern: the shard only starts once the file is in
place and its digest matches. Standard library only. An ``s3://bucket/key`` is an https GET
of the store's endpoint (``s3.py``), signed with SigV4 (``sigv4.py``) when the Pod passes
credentials as environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from the Secret
the resource names); the store's redirects are not followed (a signed request goes nowhere
the spec did not name). With ``--cache`` it first asks the node's model cache
(``node_cache.py``), and falls back to the store whenever the cache cannot serve.

What it refuses (the operator checks the same, earlier): a ``pvc://`` path that is absolute or
leaves the claim (``..``, or a symlink out of it); an https host that resolves to a loopback,
link-local or cloud-metadata address (``storage_hosts``), checked on every address it resolves
to and on every redirect. It connects to the address it checked (TLS still verifies the name),
so a DNS answer that changes between the check and the connection cannot redirect it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import socket
import ssl
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urljoin, urlsplit

from amp4ec.operator.s3 import ACCESS_KEY_ENV, SECRET_KEY_ENV, SESSION_TOKEN_ENV, S3Options, refusal
from amp4ec.operator.sigv4 import UNSIGNED_PAYLOAD, authorization_headers
from amp4ec.operator.storage_hosts import (
    HostRefused,
    HostUnresolved,
    Network,
    parse_networks,
    resolve_checked,
)

__all__ = ["EXIT_PERMANENT", "EXIT_TRANSIENT", "STORE_CA_ENV", "FetchError", "fetch", "main"]

PVC_MOUNT = Path("/mnt/pvc")
STORE_CA_ENV = "AMP4EC_STORE_CA"
"""PEM CA bundle that replaces the image's when verifying the store (``spec.model.caBundle``)."""
MAX_REDIRECTS = 5
_REDIRECTS = {301, 302, 303, 307, 308}
EXIT_PERMANENT = 2
"""Exit code for what only the spec can fix: a digest mismatch, a refused host or path, HTTP 4xx."""
EXIT_TRANSIENT = 3
"""Exit code for what may pass: an unreachable host, a timeout, HTTP 5xx/429, a file not there yet."""


class FetchError(Exception):
    """The file could not be fetched, or its digest differs from the expected one.

    ``transient``: trying again later may succeed (the operator retries; else the spec is wrong)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to ``address`` (already checked), with TLS and Host for the URI's own host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _claim_file(uri: str, pvc_mount: Path) -> Path:
    """The file of a ``pvc://claim/path`` URI inside the mounted claim, or FetchError."""
    _, _, path = uri[len("pvc://") :].partition("/")
    if not path or path.startswith("/") or ".." in PurePosixPath(path).parts:
        raise FetchError(f"{uri}: path escapes the claim (absolute or '..')")
    source = (pvc_mount / path).resolve()
    if pvc_mount.resolve() not in source.parents:
        raise FetchError(f"{uri}: path escapes the claim (a symlink out of it)")
    return source


def _connect(
    url: str,
    timeout_s: float,
    allowed: Sequence[Network],
    context: ssl.SSLContext,
    headers: dict[str, str] | None = None,
) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise FetchError(f"{url}: expected https://host/path")
    port = parts.port or 443
    try:
        addresses = resolve_checked(parts.hostname, port, allowed)
    except HostUnresolved as exc:  # DNS may answer later
        raise FetchError(f"{url}: {exc}", transient=True) from None
    except HostRefused as exc:
        raise FetchError(f"{url}: refused: {exc}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    last: OSError | None = None
    for address in addresses:
        conn = _PinnedHTTPSConnection(parts.hostname, port, address, timeout_s, context)
        try:
            conn.request(
                "GET", target, headers={"User-Agent": "amp4ec-storage-initializer", **(headers or {})}
            )
            return conn, conn.getresponse()
        except ssl.SSLCertVerificationError as exc:  # the store's certificate: only the spec can fix it
            conn.close()
            raise FetchError(
                f"{url}: {exc} (a store with a private CA needs spec.model.caBundle)", transient=False
            ) from None
        except OSError as exc:  # try the next checked address
            conn.close()
            last = exc
    raise FetchError(f"{url}: {last}", transient=True)


def _tls(cafile: str | None, cadata: str | None) -> ssl.SSLContext:
    """Verification against the image's CAs, or only against the store's own (a file or PEM text)."""
    try:
        return ssl.create_default_context(cafile=cafile, cadata=cadata or None)
    except (ssl.SSLError, ValueError) as exc:  # not PEM certificates
        raise FetchError(
            f"the store's CA bundle (spec.model.caBundle) is not PEM certificates: {exc}"
        ) from None


@contextmanager
def _https(
    uri: str, timeout_s: float, allowed: Sequence[Network], context: ssl.SSLContext
) -> Iterator[IO[bytes]]:
    """The body of ``uri``, following at most MAX_REDIRECTS redirects, each one checked."""
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        conn, resp = _connect(url, timeout_s, allowed, context)
        if resp.status in _REDIRECTS and resp.getheader("Location"):
            url = urljoin(url, resp.getheader("Location") or "")
            conn.close()
            continue
        try:
            if resp.status != 200:
                transient = resp.status >= 500 or resp.status in (408, 429)
                raise FetchError(f"{url}: HTTP {resp.status} {resp.reason}", transient=transient)
            yield resp
        finally:
            conn.close()
        return
    raise FetchError(f"{uri}: more than {MAX_REDIRECTS} redirects")


@contextmanager
def _s3(
    uri: str,
    options: S3Options,
    timeout_s: float,
    allowed: Sequence[Network],
    context: ssl.SSLContext,
    environ: dict[str, str],
) -> Iterator[IO[bytes]]:
    """The body of the object ``uri`` on the store ``options`` names (no redirects followed)."""
    try:
        url = options.object_url(uri)
    except ValueError as exc:
        raise FetchError(str(exc)) from None
    headers: dict[str, str] = {}
    key_id, secret = environ.get(ACCESS_KEY_ENV, ""), environ.get(SECRET_KEY_ENV, "")
    if options.secret and not (key_id and secret):
        raise FetchError(
            f"{uri}: Secret {options.secret} has no accessKeyId and secretAccessKey (both are needed)"
        )
    if key_id and secret:
        headers = authorization_headers(
            "GET",
            url,
            region=options.region,
            access_key_id=key_id,
            secret_access_key=secret,
            payload_sha256=UNSIGNED_PAYLOAD,  # the body is checked against spec.model.sha256
            session_token=environ.get(SESSION_TOKEN_ENV) or None,
        )
    conn, resp = _connect(url, timeout_s, allowed, context, headers)
    try:
        if resp.status != 200:
            why = refusal(resp.status, resp.read(65536), options)
            raise FetchError(f"{uri}: {why.message}", transient=why.transient)
        yield resp
    finally:
        conn.close()


def fetch(
    uri: str,
    out: Path,
    sha256: str | None = None,
    pvc_mount: Path = PVC_MOUNT,
    timeout_s: float = 600,
    allowed_networks: Sequence[Network] = (),
    cafile: str | None = None,
    s3: S3Options | None = None,
    environ: dict[str, str] | None = None,
    cadata: str | None = None,
) -> str:
    """Copy ``uri`` to ``out`` (atomically) and return its hex SHA-256; raise FetchError on a
    mismatch or a refused source. ``allowed_networks`` exempts networks from the host check
    (the chart's ``operator.storageAllowedNetworks``: tests); ``cafile`` replaces the image's
    CA bundle (a private store's CA), as does ``cadata`` (PEM text); ``environ`` (default: the
    process's) holds S3 credentials."""
    tmp = partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        if uri.startswith("pvc://"):
            source = _claim_file(uri, pvc_mount)
            if not source.is_file():  # not there (yet): a claim being filled, or a wrong path
                raise FetchError(
                    f"{uri}: no file {source.relative_to(pvc_mount.resolve())} in the claim", True
                )
            stream = source.open("rb")
        elif uri.startswith("https://"):
            stream = _https(uri, timeout_s, allowed_networks, _tls(cafile, cadata))
        elif uri.startswith("s3://"):
            env = dict(os.environ) if environ is None else environ
            stream = _s3(uri, s3 or S3Options(), timeout_s, allowed_networks, _tls(cafile, cadata), env)
        else:
            raise FetchError(f"{uri}: expected pvc://, https:// or s3://")
        with stream as src, tmp.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (OSError, http.client.HTTPException) as exc:  # connection lost, timed out, unreadable
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: {exc}", transient=True) from None
    except FetchError:
        tmp.unlink(missing_ok=True)
        raise
    return place(tmp, out, uri, sha256, digest.hexdigest())


def partial(out: Path) -> Path:
    """Where a file bound for ``out`` is written until ``place`` checks it."""
    return out.with_name(out.name + ".part")


def place(tmp: Path, out: Path, uri: str, sha256: str | None, actual: str) -> str:
    """Move ``tmp`` (its SHA-256 ``actual``) to ``out`` if it is the file expected: the digest
    ``sha256`` and, for a ``.pt2`` URI, a zip; else delete it and raise FetchError."""
    if sha256 and actual != sha256:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: sha256 expected {sha256}, actual {actual}")
    if uri.endswith(".pt2") and not zipfile.is_zipfile(tmp):  # the agent checks the entries
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{uri}: not a .pt2 archive (torch.export.save writes a zip file; this is not one)")
    shutil.move(tmp, out)
    return actual


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m amp4ec.operator.fetch", description=__doc__)
    p.add_argument("--uri", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sha256")
    p.add_argument("--pvc-mount", type=Path, default=PVC_MOUNT, help="where the pvc:// claim is mounted")
    p.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="reachable although loopback/link-local (tests only; repeatable)",
    )
    p.add_argument("--ca-file", help="CA bundle that replaces the image's (a private store's CA)")
    p.add_argument("--s3-endpoint", help="https://host[:port] of the S3-compatible store (default: AWS)")
    p.add_argument("--s3-region", default="us-east-1")
    p.add_argument("--s3-addressing", choices=["path", "virtual"], default="path")
    p.add_argument("--s3-secret", help="the Secret the credentials come from (named in messages)")
    p.add_argument("--cache", metavar="HOST:PORT", help="the node's model cache (the monitor's ModelCache)")
    p.add_argument("--tls-ca", type=Path, help="with --cache: the CA the monitor's certificate is under")
    p.add_argument("--tls-cert", type=Path, help="with --cache: this Pod's certificate (its namespace)")
    p.add_argument("--tls-key", type=Path, help="with --cache: the key of --tls-cert")
    a = p.parse_args(argv)
    try:
        allowed = parse_networks(a.allow_network)
        s3 = S3Options(a.s3_endpoint, a.s3_region, a.s3_addressing, a.s3_secret)
        cadata = os.environ.get(STORE_CA_ENV) or None

        def store() -> str:
            return fetch(
                a.uri,
                a.out,
                a.sha256,
                a.pvc_mount,
                allowed_networks=allowed,
                cafile=a.ca_file,
                s3=s3,
                cadata=cadata,
            )

        source = "the store"
        if a.cache and a.sha256:  # entries are named by their digest
            # grpc and the Pod's certificate only when a cache is used: see node_cache.py.
            from amp4ec.operator.node_cache import fetch_through_cache

            tls = (a.tls_ca, a.tls_cert, a.tls_key)
            digest, source = fetch_through_cache(a.cache, tls, a.uri, a.out, a.sha256, store)
        else:
            digest = store()
        print(f"{digest}  {a.out}  (from {source})")
    except (FetchError, ValueError) as exc:
        # The last line is the cause the operator reports (terminationMessagePolicy FallbackToLogsOnError).
        print(f"storage initializer: {exc}", file=sys.stderr)
        sys.exit(EXIT_TRANSIENT if getattr(exc, "transient", False) else EXIT_PERMANENT)


if __name__ == "__main__":
    main()
