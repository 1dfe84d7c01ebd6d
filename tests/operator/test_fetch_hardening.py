"""The storage initializer as an attacker would aim it: metadata addresses, redirects, claim escapes.

A real HTTPS server on loopback (a throwaway CA from ``cryptography``) stands for the model
store; loopback is forbidden by default, so the tests that should reach it allow 127.0.0.0/8
exactly as the chart's ``operator.storageAllowedNetworks`` would.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from amp4ec.operator.fetch import FetchError, fetch, main
from amp4ec.operator.storage_hosts import parse_networks
from tests.operator.store import certificate

BODY = b"weights" * 1000
LOOPBACK = parse_networks(["127.0.0.0/8"])


class _Store(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        redirects = {
            "/to-metadata": "https://169.254.169.254/latest/meta-data/",
            "/to-decimal-metadata": "https://2852039166/latest/",
            "/to-http": "http://127.0.0.1/w.pt",
            "/to-weights": "/w.pt",
            "/loop": "/loop",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
        elif self.path == "/w.pt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, CA file) of an HTTPS model store on 127.0.0.1."""
    cert, key = certificate(tmp_path_factory.mktemp("store"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(cert)
    server.shutdown()
    server.server_close()


def test_an_allowed_store_is_fetched_and_verified(store: tuple[str, str], tmp_path: Path) -> None:
    base, ca = store
    digest = hashlib.sha256(BODY).hexdigest()
    out = tmp_path / "w.pt"
    assert fetch(f"{base}/w.pt", out, digest, allowed_networks=LOOPBACK, cafile=ca) == digest
    assert out.read_bytes() == BODY
    again = tmp_path / "again.pt"  # a redirect within the allowed store is followed
    assert fetch(f"{base}/to-weights", again, digest, allowed_networks=LOOPBACK, cafile=ca) == digest


def test_loopback_is_refused_before_any_connection_unless_allowed(
    store: tuple[str, str], tmp_path: Path
) -> None:
    base, ca = store
    before = len(_Store.requests)
    with pytest.raises(FetchError, match=r"refused: 127\.0\.0\.1 is a loopback address"):
        fetch(f"{base}/w.pt", tmp_path / "w.pt", cafile=ca)
    assert len(_Store.requests) == before and not (tmp_path / "w.pt.part").exists()


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/to-metadata", "169.254.169.254 is a link-local address"),
        ("/to-decimal-metadata", "169.254.169.254 is a link-local address"),
        ("/to-http", "expected https"),
        ("/loop", "more than 5 redirects"),
    ],
)
def test_redirects_are_checked_like_the_first_request(
    store: tuple[str, str], tmp_path: Path, path: str, error: str
) -> None:
    base, ca = store
    with pytest.raises(FetchError, match=error):
        fetch(f"{base}{path}", tmp_path / "w.pt", allowed_networks=LOOPBACK, cafile=ca)
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.pt.part").exists()


def test_a_certificate_from_elsewhere_is_refused(store: tuple[str, str], tmp_path: Path) -> None:
    base, _ = store
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(f"{base}/w.pt", tmp_path / "w.pt", allowed_networks=LOOPBACK)


@pytest.mark.parametrize(
    "uri",
    [
        "https://169.254.169.254/latest/meta-data/",
        "https://[fe80::1]/w.pt",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://localhost/w.pt",
        "http://models.example/w.pt",
    ],
)
def test_metadata_and_link_local_hosts_are_refused_without_connecting(uri: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"refused|expected"):
        fetch(uri, tmp_path / "w.pt", timeout_s=2)


def test_claim_paths_stay_inside_the_claim(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    claim.mkdir()
    (tmp_path / "secret").write_bytes(b"not yours")
    (claim / "link.pt").symlink_to(tmp_path / "secret")
    for uri in ("pvc://models/../secret", "pvc://models//etc/passwd", "pvc://models/link.pt"):
        with pytest.raises(FetchError, match="escapes the claim"):
            fetch(uri, tmp_path / "out.pt", pvc_mount=claim)
    assert not (tmp_path / "out.pt").exists()


def test_the_command_line_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--uri", "https://169.254.169.254/x", "--out", str(tmp_path / "w.pt")])
    assert info.value.code == 2
    assert "storage initializer:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--uri", "https://h/x", "--out", str(tmp_path / "w.pt"), "--allow-network", "nonsense"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_exit_code_says_whether_trying_again_may_help(
    store: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2: only the spec can fix it (digest, 404, refused); 3: it may pass (unreachable, a claim's
    file not there yet). The operator retries only the second (operator/storage.py)."""
    base, ca = store
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    digest = hashlib.sha256(BODY).hexdigest()
    out = str(tmp_path / "w.pt")
    loopback = ["--allow-network", "127.0.0.0/8"]
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 not a zip file")
    cases = [
        (["--uri", "pvc://models/junk.pt2", "--pvc-mount", str(tmp_path)], 2, "not a .pt2 archive"),
        (["--uri", f"{base}/w.pt", "--sha256", "0" * 64], 2, f"sha256 expected {'0' * 64}, actual {digest}"),
        (["--uri", f"{base}/missing.pt"], 2, "HTTP 404"),
        (["--uri", f"https://127.0.0.1:{_closed_port()}/w.pt"], 3, "refused"),
        (
            ["--uri", "pvc://models/not-yet.pt", "--pvc-mount", str(tmp_path)],
            3,
            "no file not-yet.pt in the claim",
        ),
    ]
    for args, code, message in cases:
        with pytest.raises(SystemExit) as info:
            main([*args, "--out", out, *loopback])
        assert info.value.code == code, args
        assert message in capsys.readouterr().err.splitlines()[-1], args
