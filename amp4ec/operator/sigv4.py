"""AWS Signature Version 4 for the storage initializer's S3 GETs (standard library only).

The initializer runs in the operator image (no torch, no boto): signing a GET is ~60 lines of
``hashlib``/``hmac`` against AWS's published test vectors (tests/operator/test_sigv4.py), which is
lighter than botocore's 100 MB of service models. The canonical URI is S3's: the path as sent,
already percent-encoded once (``object_path``), never normalised or encoded again; other
services encode it twice and are not the initializer's concern.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from urllib.parse import parse_qsl, quote, urlsplit

__all__ = ["ALGORITHM", "EMPTY_SHA256", "UNSIGNED_PAYLOAD", "authorization_headers", "object_path"]

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def object_path(*segments: str) -> str:
    """``/a/b`` from segments, each byte but ``A-Z a-z 0-9 - . _ ~`` (and the key's ``/``)
    percent-encoded once, as S3 expects the canonical URI."""
    return "/" + "/".join(quote(s, safe="/-_.~") for s in segments)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _canonical_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def authorization_headers(
    method: str,
    url: str,
    *,
    region: str,
    access_key_id: str,
    secret_access_key: str,
    service: str = "s3",
    headers: dict[str, str] | None = None,
    payload_sha256: str = EMPTY_SHA256,
    now: datetime.datetime | None = None,
    session_token: str | None = None,
) -> dict[str, str]:
    """The headers to send with ``method url``: ``headers`` plus Host, X-Amz-Date,
    X-Amz-Content-Sha256 (S3 only), X-Amz-Security-Token (with a session token) and
    Authorization, every one of them signed. ``url``'s path must already be encoded."""
    parts = urlsplit(url)
    when = (now or datetime.datetime.now(datetime.timezone.utc)).astimezone(datetime.timezone.utc)
    stamp, day = when.strftime("%Y%m%dT%H%M%SZ"), when.strftime("%Y%m%d")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host += f":{parts.port}"
    out = {**(headers or {}), "Host": host, "X-Amz-Date": stamp}
    if service == "s3":
        out["X-Amz-Content-Sha256"] = payload_sha256
    if session_token:
        out["X-Amz-Security-Token"] = session_token
    canonical_headers = sorted((k.lower().strip(), " ".join(v.split())) for k, v in out.items())
    signed = ";".join(k for k, _ in canonical_headers)
    canonical = "\n".join(
        [
            method.upper(),
            parts.path or "/",
            _canonical_query(parts.query),
            "".join(f"{k}:{v}\n" for k, v in canonical_headers),
            signed,
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + secret_access_key).encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return out
