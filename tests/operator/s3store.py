"""An S3-compatible store for tests: moto's server app over TLS on loopback, checking signatures.

moto's WSGI app (the one ``moto_server``/``ThreadedMotoServer`` runs) is served by werkzeug on
127.0.0.1 with a certificate from a ``trustme`` CA (a private CA, as edge MinIO often has).
Once ``S3Store`` is entered, moto's IAM check is on (``INITIAL_NO_AUTH_ACTION_COUNT`` 0: it
verifies every request's SigV4 signature with botocore and the user's policy); ``key_id`` and
``secret`` are an IAM user's allowed ``s3:GetObject``.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import urllib.request
from typing import Any

import boto3
import trustme
from moto import settings as moto_settings
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

__all__ = ["S3Store"]


class S3Store:
    """``https://127.0.0.1:<port>``: put objects with ``put``, before or after entering."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.ca_pem = self.ca.cert_pem.bytes().decode()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler, ssl_context=context
        )
        self.endpoint = f"https://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="s3")
        self.key_id = self.secret = ""
        self._before: float | None = None

    def _client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            verify=self._ca_file,
            aws_access_key_id=self.key_id or "testing",
            aws_secret_access_key=self.secret or "testing",
        )

    def put(self, bucket: str, key: str, body: bytes) -> None:
        s3 = self._client("s3")
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=key, Body=body)

    def __enter__(self) -> S3Store:
        self._thread.start()
        self._ca_handle = self.ca.cert_pem.tempfile()
        self._ca_file = self._ca_handle.__enter__()
        # moto's backends live in the process, not the server: start from an empty store
        # whatever an earlier S3Store in this test process left behind.
        reset = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset, context=ssl.create_default_context(cafile=self._ca_file)).close()
        iam = self._client("iam")
        iam.create_user(UserName="edge")
        actions = ["s3:GetObject", "s3:PutObject", "s3:CreateBucket"]
        statement = {"Effect": "Allow", "Action": actions, "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [statement]}
        iam.put_user_policy(UserName="edge", PolicyName="store", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="edge")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self._before = moto_settings.INITIAL_NO_AUTH_ACTION_COUNT
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is authenticated
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = self._before
        self._server.shutdown()
        self._server.server_close()
        self._ca_handle.__exit__(None, None, None)
