"""The storage initializer's SigV4 signer against AWS's published vectors and against botocore.

Vectors: the SigV4 test suite (get-vanilla, get-vanilla-query-order-key-case, post-vanilla;
service ``service``, AKIDEXAMPLE) and the S3 API reference, "Signature Calculations for the
Authorization Header" (GET Object with a Range, GET Bucket lifecycle, list objects).
"""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amp4ec.operator.sigv4 import EMPTY_SHA256, authorization_headers, object_path

SUITE = {"access_key_id": "AKIDEXAMPLE", "secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"}
SUITE_AT = datetime.datetime(2015, 8, 30, 12, 36, tzinfo=datetime.timezone.utc)
S3 = {
    "access_key_id": "AKIAIOSFODNN7EXAMPLE",
    "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}
S3_AT = datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc)


def _signature(headers: dict[str, str]) -> str:
    return headers["Authorization"].rsplit("Signature=", 1)[1]


@pytest.mark.parametrize(
    ("method", "url", "signature"),
    [
        (
            "GET",
            "https://example.amazonaws.com/",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "GET",
            "https://example.amazonaws.com/?Param2=value2&Param1=value1",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "POST",
            "https://example.amazonaws.com/",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        ),
    ],
)
def test_the_sigv4_test_suite(method: str, url: str, signature: str) -> None:
    headers = authorization_headers(method, url, region="us-east-1", service="service", now=SUITE_AT, **SUITE)
    assert headers["X-Amz-Date"] == "20150830T123600Z"
    assert "X-Amz-Content-Sha256" not in headers  # S3 only
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={signature}"
    )


@pytest.mark.parametrize(
    ("url", "extra", "signed", "signature"),
    [
        (
            "https://examplebucket.s3.amazonaws.com/test.txt",
            {"Range": "bytes=0-9"},
            "host;range;x-amz-content-sha256;x-amz-date",
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        ),
        (
            "https://examplebucket.s3.amazonaws.com/?lifecycle",
            {},
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
        (
            "https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2",
            {},
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    ],
)
def test_the_s3_reference_examples(url: str, extra: dict[str, str], signed: str, signature: str) -> None:
    headers = authorization_headers("GET", url, region="us-east-1", headers=extra, now=S3_AT, **S3)
    assert headers["X-Amz-Content-Sha256"] == EMPTY_SHA256
    assert headers["Host"] == "examplebucket.s3.amazonaws.com"
    assert f"SignedHeaders={signed}, " in headers["Authorization"]
    assert _signature(headers) == signature
    other = authorization_headers("GET", url, region="eu-west-1", headers=extra, now=S3_AT, **S3)
    assert _signature(other) != signature  # the region is in the scope


def test_a_key_is_encoded_once_and_a_port_kept_in_host() -> None:
    assert object_path("models", "a b/é+(1)~x_y-z.pt2") == "/models/a%20b/%C3%A9%2B%281%29~x_y-z.pt2"
    headers = authorization_headers("GET", "https://minio.edge:9000/m/k", region="us-east-1", now=S3_AT, **S3)
    assert headers["Host"] == "minio.edge:9000"
    assert (
        authorization_headers("GET", "https://[::1]:443/m/k", region="r", now=S3_AT, **S3)["Host"] == "[::1]"
    )


_KEY = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FF, exclude_characters="\\"), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(
    key=_KEY,
    region=st.sampled_from(["us-east-1", "eu-central-1", "minio"]),
    port=st.sampled_from([None, 443, 9000]),
    token=st.one_of(st.none(), st.text("abcdef0123", min_size=1, max_size=20)),
)
def test_signatures_equal_botocores(key: str, region: str, port: int | None, token: str | None) -> None:
    """botocore (a test dependency through moto) signs the same request the same way."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    netloc = "minio.edge" + (f":{port}" if port else "")
    url = f"https://{netloc}{object_path('bucket', key)}"
    ours = authorization_headers("GET", url, region=region, now=S3_AT, session_token=token, **S3)
    # As moto's server checks a signature: botocore's canonical request of the headers we signed.
    signed = {k: v for k, v in ours.items() if k != "Authorization"}
    request = AWSRequest(method="GET", url=url, headers=signed)
    request.context["timestamp"] = signed["X-Amz-Date"]
    auth = S3SigV4Auth(Credentials(S3["access_key_id"], S3["secret_access_key"], token), "s3", region)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    assert _signature(ours) == expected
