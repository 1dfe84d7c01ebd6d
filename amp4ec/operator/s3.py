"""S3-compatible stores: where an ``s3://bucket/key`` is fetched from, and what a store's error means.

Standard library only (the storage initializer imports it; so does the operator's spec check).
The endpoint, region and addressing style are spec fields (``spec.model.s3``), not annotations
on the credentials' Secret as KServe spells them: the operator never reads the Secret (the Pod
names it in ``secretKeyRef``), so what it must know to plan egress and check hosts lives in the
resource. Path-style addressing (``https://endpoint/bucket/key``) is the default: MinIO and most
edge stores serve it; ``virtual`` asks ``https://bucket.endpoint/key`` (AWS's preferred form).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from amp4ec.operator.sigv4 import object_path

__all__ = [
    "ACCESS_KEY_ENV",
    "DEFAULT_REGION",
    "SECRET_KEYS",
    "SECRET_KEY_ENV",
    "SESSION_TOKEN_ENV",
    "S3Options",
    "S3Refusal",
    "parse_s3_uri",
    "refusal",
]

DEFAULT_REGION = "us-east-1"
ACCESS_KEY_ENV, SECRET_KEY_ENV, SESSION_TOKEN_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
SECRET_KEYS = {
    ACCESS_KEY_ENV: "accessKeyId",
    SECRET_KEY_ENV: "secretAccessKey",
    SESSION_TOKEN_ENV: "sessionToken",
}
"""The initializer's environment variable → the key of the Secret it comes from (sessionToken optional)."""

_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<key>[^\x00-\x20\x7f]+)$")
_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
_MISSING = {"NoSuchKey", "NoSuchBucket"}
_LATER = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ValueError naming the expected form."""
    m = _URI.match(uri)
    if not m or ".." in m["bucket"]:
        raise ValueError(
            f"expected s3://bucket/key (bucket: 3-63 of a-z 0-9 . -; key: no spaces), got {uri!r}"
        )
    return m["bucket"], m["key"]


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store (``spec.model.s3``)."""

    endpoint: str | None = None
    """``https://host[:port]``; None: AWS's ``https://s3.<region>.amazonaws.com``."""
    region: str = DEFAULT_REGION
    """The signing region (MinIO accepts its configured one, by default us-east-1)."""
    addressing: Literal["path", "virtual"] = "path"
    secret: str | None = None
    """The Secret holding the credentials, for messages only (its values arrive as environment)."""

    def base(self) -> str:
        return (self.endpoint or f"https://s3.{self.region}.amazonaws.com").rstrip("/")

    def object_url(self, uri: str) -> str:
        """The https URL a GET of ``uri`` goes to."""
        bucket, key = parse_s3_uri(uri)
        base = urlsplit(self.base())
        if self.addressing == "virtual":
            return f"https://{bucket}.{base.netloc}{object_path(key)}"
        return f"https://{base.netloc}{object_path(bucket, key)}"


@dataclass(frozen=True)
class S3Refusal:
    """What a store's error answer means: the message's cause, and whether to try again later."""

    message: str
    transient: bool


def refusal(status: int, body: bytes, options: S3Options) -> S3Refusal:
    """Read an error answer (S3's ``<Error><Code>…``) into a cause a user can act on."""
    m = _CODE.search(body[:65536])
    code = m[1].decode() if m else ""
    what = f"HTTP {status}" + (f" {code}" if code else "")
    if code in _CREDENTIALS or (status == 403 and not code):
        where = (
            f"the accessKeyId/secretAccessKey of Secret {options.secret} (spec.model.s3.secretName)"
            if options.secret
            else "spec.model.s3.secretName (no credentials were given: the store refuses anonymous reads)"
        )
        return S3Refusal(f"{what}: the store refuses the credentials; check {where}", transient=False)
    if code in _MISSING or status == 404:
        return S3Refusal(f"{what}: no such object (bucket or key) at {options.base()}", transient=False)
    if code in _LATER or status >= 500 or status in (408, 429):
        hint = " (the node's clock differs from the store's)" if code == "RequestTimeTooSkewed" else ""
        return S3Refusal(f"{what}{hint}", transient=True)
    if 300 <= status < 400:
        return S3Refusal(
            f"{what}: the store redirects (a bucket in another region? check spec.model.s3.region, "
            "spec.model.s3.endpoint)",
            transient=False,
        )
    return S3Refusal(what, transient=False)
