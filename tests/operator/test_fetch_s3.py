"""The storage initializer against a real S3-compatible server: moto's, over TLS, checking signatures.

``tests/operator/s3store.py``: moto's server app over TLS from a ``trustme`` CA on 127.0.0.1, so
the initializer's https path, its pinned connection and a private CA bundle are all exercised.
With moto's IAM check on, every request must carry a valid SigV4 signature of an IAM user's key,
which moto verifies with botocore: a wrong secret is refused as S3 refuses it.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from amp4ec.operator.fetch import EXIT_PERMANENT, EXIT_TRANSIENT, FetchError, fetch, main
from amp4ec.operator.s3 import S3Options
from amp4ec.operator.storage_hosts import parse_networks
from tests.operator.s3store import S3Store

BODY = b"\x00model bytes\xff" * 4096
DIGEST = hashlib.sha256(BODY).hexdigest()
LOOPBACK = parse_networks(["127.0.0.0/8"])
BUCKET, KEY = "models", "edge/net+v1(é)~.pt"


@dataclass(frozen=True)
class Store:
    endpoint: str
    ca: str
    env: dict[str, str]
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY of an IAM user allowed s3:GetObject."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    ca_file = tmp_path_factory.mktemp("s3") / "ca.pem"
    with S3Store() as s3:
        ca_file.write_text(s3.ca_pem)
        s3.put(BUCKET, KEY, BODY)
        s3.put(BUCKET, "junk.pt2", b"not a zip")
        yield Store(
            s3.endpoint, str(ca_file), {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret}
        )


def _options(store: Store, **kw: str) -> S3Options:
    return S3Options(**{"endpoint": store.endpoint, "secret": "minio-creds", **kw})  # type: ignore[arg-type]


def test_the_right_credentials_and_digest_fetch_the_object(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    got = fetch(
        f"s3://{BUCKET}/{KEY}", out, DIGEST, allowed_networks=LOOPBACK, cafile=store.ca,
        s3=_options(store), environ=store.env,
    )  # fmt: skip
    assert got == DIGEST and out.read_bytes() == BODY


@pytest.mark.parametrize(
    ("env", "uri", "sha", "match"),
    [
        (
            {"AWS_SECRET_ACCESS_KEY": "wrong"},
            f"s3://{BUCKET}/{KEY}",
            DIGEST,
            "SignatureDoesNotMatch.*Secret minio-creds",
        ),
        (
            {"AWS_ACCESS_KEY_ID": "AKIANOBODY"},
            f"s3://{BUCKET}/{KEY}",
            DIGEST,
            "InvalidAccessKeyId.*Secret minio-creds",
        ),
        ({}, f"s3://{BUCKET}/missing.pt", DIGEST, "HTTP 404 NoSuchKey"),
        ({}, f"s3://{BUCKET}/{KEY}", "0" * 64, f"sha256 expected {'0' * 64}, actual {DIGEST}"),
        ({}, f"s3://{BUCKET}/junk.pt2", None, "not a .pt2 archive"),
    ],
)
def test_what_only_the_spec_or_the_secret_can_fix_is_permanent(
    store: Store, tmp_path: Path, env: dict[str, str], uri: str, sha: str | None, match: str
) -> None:
    out = tmp_path / "m.pt"
    with pytest.raises(FetchError, match=match) as info:
        fetch(
            uri, out, sha, allowed_networks=LOOPBACK, cafile=store.ca,
            s3=_options(store), environ={**store.env, **env},
        )  # fmt: skip
    assert not info.value.transient
    assert not out.exists() and not out.with_name("m.pt.part").exists()
    assert "wrong" not in str(info.value) and store.env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def test_no_credentials_at_all_are_refused_by_an_authenticating_store(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"HTTP 403.*spec\.model\.s3\.secretName") as info:
        fetch(
            f"s3://{BUCKET}/{KEY}", tmp_path / "m.pt", DIGEST, allowed_networks=LOOPBACK, cafile=store.ca,
            s3=S3Options(endpoint=store.endpoint), environ={},
        )  # fmt: skip
    assert not info.value.transient


def test_the_image_ca_bundle_does_not_trust_a_private_store(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"CERTIFICATE_VERIFY_FAILED.*spec\.model\.caBundle") as info:
        fetch(
            f"s3://{BUCKET}/{KEY}", tmp_path / "m.pt", DIGEST, allowed_networks=LOOPBACK,
            s3=_options(store), environ=store.env,
        )  # fmt: skip
    assert not info.value.transient  # only the spec (its caBundle) can fix it
    with pytest.raises(FetchError, match="not PEM certificates"):
        fetch(
            f"s3://{BUCKET}/{KEY}", tmp_path / "m.pt", DIGEST, allowed_networks=LOOPBACK,
            s3=_options(store), environ=store.env, cadata="not a certificate",
        )  # fmt: skip


def test_a_private_https_store_is_verified_against_the_bundle_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https:// store with a certificate of a private CA: the PEM the Pod passes from the
    caBundle ConfigMap (AMP4EC_STORE_CA) verifies it; the image's CAs alone do not."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"https://127.0.0.1:{server.server_address[1]}/m.pt"
        args = [
            "--uri",
            uri,
            "--sha256",
            DIGEST,
            "--out",
            str(tmp_path / "m.pt"),
            "--allow-network",
            "127.0.0.0/8",
        ]
        monkeypatch.delenv("AMP4EC_STORE_CA", raising=False)
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == EXIT_PERMANENT
        assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
        monkeypatch.setenv("AMP4EC_STORE_CA", ca.cert_pem.bytes().decode())
        main(args)
        assert (tmp_path / "m.pt").read_bytes() == BODY
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_command_line_exit_codes(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the init container runs it: credentials and the store's CA from the environment."""
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AMP4EC_STORE_CA", Path(store.ca).read_text())
    common = ["--out", str(tmp_path / "m.pt"), "--allow-network", "127.0.0.0/8"]
    s3 = ["--s3-endpoint", store.endpoint, "--s3-secret", "minio-creds"]
    main(["--uri", f"s3://{BUCKET}/{KEY}", "--sha256", DIGEST, *common, *s3])
    assert (tmp_path / "m.pt").read_bytes() == BODY
    unreachable = ["--s3-endpoint", f"https://127.0.0.1:{_closed_port()}"]
    cases = [
        ([*s3, "--sha256", DIGEST], {"AWS_SECRET_ACCESS_KEY": "wrong"}, EXIT_PERMANENT, "Secret minio-creds"),
        ([*unreachable, "--sha256", DIGEST], {}, EXIT_TRANSIENT, "refused"),
    ]
    for args, env, code, message in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as info:
            main(["--uri", f"s3://{BUCKET}/{KEY}", *common, *args])
        assert info.value.code == code, args
        assert message in capsys.readouterr().err.splitlines()[-1], args
