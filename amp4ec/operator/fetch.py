"""The storage initializer: fetch a model file (https:// or a mounted pvc://) and verify its SHA-256.

Runs as a shard Pod's init container (``python -m amp4ec.operator.fetch``, the operator
image), KServe's storage-initializer pattern: the shard only starts once the file is in
place and its digest matches. Standard library only.

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

from amp4ec.operator.storage_hosts import (
    HostRefused,
    HostUnresolved,
    Network,
    parse_networks,
    resolve_checked,
)

__all__ = ["EXIT_PERMANENT", "EXIT_TRANSIENT", "FetchError", "fetch", "main"]

PVC_MOUNT = Path("/mnt/pvc")
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
    url: str, timeout_s: float, allowed: Sequence[Network], context: ssl.SSLContext
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
            conn.request("GET", target, headers={"User-Agent": "amp4ec-storage-initializer"})
            return conn, conn.getresponse()
        except OSError as exc:  # try the next checked address
            conn.close()
            last = exc
    raise FetchError(f"{url}: {last}", transient=True)


@contextmanager
def _https(uri: str, timeout_s: float, allowed: Sequence[Network], cafile: str | None) -> Iterator[IO[bytes]]:
    """The body of ``uri``, following at most MAX_REDIRECTS redirects, each one checked."""
    context = ssl.create_default_context(cafile=cafile)
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


def fetch(
    uri: str,
    out: Path,
    sha256: str | None = None,
    pvc_mount: Path = PVC_MOUNT,
    timeout_s: float = 600,
    allowed_networks: Sequence[Network] = (),
    cafile: str | None = None,
) -> str:
    """Copy ``uri`` to ``out`` (atomically) and return its hex SHA-256; raise FetchError on a
    mismatch or a refused source. ``allowed_networks`` exempts networks from the host check
    (the chart's ``operator.storageAllowedNetworks``: tests)."""
    tmp = out.with_name(out.name + ".part")
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
            stream = _https(uri, timeout_s, allowed_networks, cafile)
        else:
            raise FetchError(f"{uri}: expected pvc:// or https://")
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
    actual = digest.hexdigest()
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
    a = p.parse_args(argv)
    try:
        allowed = parse_networks(a.allow_network)
        print(f"{fetch(a.uri, a.out, a.sha256, a.pvc_mount, allowed_networks=allowed)}  {a.out}")
    except (FetchError, ValueError) as exc:
        # The last line is the cause the operator reports (terminationMessagePolicy FallbackToLogsOnError).
        print(f"storage initializer: {exc}", file=sys.stderr)
        sys.exit(EXIT_TRANSIENT if getattr(exc, "transient", False) else EXIT_PERMANENT)


if __name__ == "__main__":
    main()
