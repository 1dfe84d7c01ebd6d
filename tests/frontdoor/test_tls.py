"""The v2 front door over real TLS (``frontdoor.listen``), in process: REST and gRPC listeners
with a certificate of one CA, a backend running the model itself. A client with the CA and the
right client certificate is answered; no certificate, one from another CA, or a plaintext
client fail the handshake; the right CA with another identity is refused 403 /
PERMISSION_DENIED; with client authentication off, TLS alone suffices. curl too, as the README
shows it."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from amp4ec import pki
from amp4ec.frontdoor import listen
from amp4ec.frontdoor.door import FrontDoor
from amp4ec.frontdoor.model import model_meta
from amp4ec.wire.oip import grpc_predict_v2_pb2 as pb
from amp4ec.wire.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from amp4ec.wire.transport import TransportSecurity
from tests.model_zoo import residual_net

SERVER, USER, OTHER = "frontdoor.test.amp4ec", "client.serve.local.amp4ec", "client.run.local.amp4ec"
X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": X.flatten().tolist()}]}
).encode()


class _Model:
    """The backend: the model itself, in this process (the listeners are what is tested here)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def ready(self) -> bool:
        return True

    async def infer(
        self, inputs: Sequence[torch.Tensor], deadline_s: float | None
    ) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return (self.module(*inputs),)


@dataclass
class Door:
    http: int
    grpc: int
    files: Path
    expected: np.ndarray

    def url(self, path: str = "/v2/models/residual_net/infer", host: str = "localhost") -> str:
        return f"https://{host}:{self.http}{path}"


def _write(directory: Path, stem: str, pair: pki.KeyPair) -> None:
    pair.write(directory, stem)


def _serve(tmp: Path, client_auth: bool) -> Iterator[Door]:
    ca, other_ca = pki.CertificateAuthority.create("front door CA"), pki.CertificateAuthority.create("other")
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    (tmp / "other-ca.crt").write_bytes(other_ca.cert_pem)
    _write(tmp, "server", ca.issue(SERVER, hosts=["localhost", "127.0.0.1"]))
    _write(tmp, "user", ca.issue(USER))
    _write(tmp, "other-identity", ca.issue(OTHER))
    _write(tmp, "other-ca", other_ca.issue(USER))  # the right name, the wrong CA
    security = TransportSecurity.from_files(tmp / "ca.crt", tmp / "server.crt", tmp / "server.key")
    module = residual_net().eval()
    with torch.inference_mode():
        out = module(X)
    meta = model_meta("residual_net", module, (X,), (out,), batch_flexible=True)
    door = FrontDoor(meta, _Model(module))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    authorise = (lambda peers: USER in peers) if client_auth else None
    started = asyncio.run_coroutine_threadsafe(
        listen.start(door, "127.0.0.1", 0, 0, security, authorise), loop
    ).result(30)
    try:
        yield Door(started.http_port, started.grpc_port, tmp, out.numpy())
    finally:
        asyncio.run_coroutine_threadsafe(started.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    yield from _serve(tmp_path_factory.mktemp("tls"), client_auth=True)


def _context(door: Door, cert: str | None, ca: str = "ca.crt") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(door.files / ca))
    if cert is not None:
        context.load_cert_chain(door.files / f"{cert}.crt", door.files / f"{cert}.key")
    return context


def _post(door: Door, context: ssl.SSLContext, url: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url or door.url(), data=BODY, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_rest_with_the_ca_and_the_client_certificate_answers_like_the_model(door: Door) -> None:
    for host in ("localhost", "127.0.0.1"):  # both are in the server certificate
        status, reply = _post(door, _context(door, "user"), door.url(host=host))
        assert status == 200, reply
        got = np.array(reply["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, door.expected, atol=1e-6)


@pytest.mark.parametrize("cert", [None, "other-ca"])
def test_rest_without_a_client_certificate_of_this_ca_fails_the_handshake(
    door: Door, cert: str | None
) -> None:
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _post(door, _context(door, cert))


def test_rest_refuses_another_identity_of_the_ca_naming_it(door: Door) -> None:
    status, reply = _post(door, _context(door, "other-identity"))
    assert status == 403
    assert reply["error"] == f"{OTHER} may not call POST /v2/models/residual_net/infer"


def test_rest_plaintext_and_an_untrusted_server_certificate_get_nothing(door: Door) -> None:
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"http://localhost:{door.http}/v2/health/live", timeout=10)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _post(door, _context(door, "user", ca="other-ca.crt"))  # the client does not trust the server


def _stub(
    door: Door, cert: str | None, ca: str = "ca.crt"
) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    key = (door.files / f"{cert}.key").read_bytes() if cert else None
    chain = (door.files / f"{cert}.crt").read_bytes() if cert else None
    credentials = grpc.ssl_channel_credentials((door.files / ca).read_bytes(), key, chain)
    channel = grpc.secure_channel(f"localhost:{door.grpc}", credentials)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _infer_request() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3, 16, 16])
    return pb.ModelInferRequest(
        model_name="residual_net", inputs=[tensor], raw_input_contents=[X.numpy().tobytes()]
    )


def test_grpc_answers_the_client_certificate_and_refuses_the_rest(door: Door) -> None:
    channel, stub = _stub(door, "user")
    with channel:
        reply = stub.ModelInfer(_infer_request(), timeout=30)
        got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(1, 10)
        np.testing.assert_allclose(got, door.expected, atol=1e-6)
    channel, stub = _stub(door, "other-identity")
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_infer_request(), timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and OTHER in info.value.details()
    for cert in (None, "other-ca"):
        channel, stub = _stub(door, cert)
        with channel, pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, cert
    with grpc.insecure_channel(f"localhost:{door.grpc}") as plain, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(plain).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert_cert_and_key(door: Door) -> None:
    f = door.files
    base = ["curl", "-s", "--cacert", str(f / "ca.crt"), "--data-binary", "@-", door.url()]
    done = subprocess.run(
        [*base[:4], "--cert", str(f / "user.crt"), "--key", str(f / "user.key"), *base[4:]],
        input=BODY, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    got = np.array(json.loads(done.stdout)["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, door.expected, atol=1e-6)
    refused = subprocess.run(base, input=BODY, capture_output=True, timeout=60)
    assert refused.returncode != 0 and not refused.stdout  # no client certificate: no answer


def test_without_client_authentication_tls_alone_is_enough(tmp_path: Path) -> None:
    for door in _serve(tmp_path, client_auth=False):
        status, reply = _post(door, _context(door, None))
        assert status == 200, reply
        np.testing.assert_allclose(
            np.array(reply["outputs"][0]["data"], dtype=np.float32).reshape(1, 10), door.expected, atol=1e-6
        )
        channel, stub = _stub(door, None)
        with channel:
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
