"""``amp4ec serve`` end to end: a real process, its real agents (mutual TLS), real HTTPS and
gRPC clients holding the client certificate it wrote. Answers equal the monolith's for JSON
and binary tensors; the protocol's errors for a wrong shape, datatype or model name; a re-plan
on a nodes-file change; nothing left after SIGINT (its TLS files included). The tests share one
server and run in file order (the last one stops it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from amp4ec.slicing import ModelSource, load_model
from amp4ec.wire.oip import grpc_predict_v2_pb2 as pb
from amp4ec.wire.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL, SEED = "tests.model_zoo:residual_net", 3
NAME = "residual_net"
URL_OF_REST = re.compile(r"v2 REST\s+(https://\S+?)/v2/models/")
GRPC_AT = re.compile(r"v2 gRPC\s+(\S+)\s")
TLS_FILES = re.compile(r"TLS:\s+CA (\S+); client certificate (\S+), key (\S+) \(required\)")


@dataclass
class Server:
    process: subprocess.Popen[str]
    nodes_file: Path
    lines: list[str] = field(default_factory=list)
    rest: str = ""
    grpc_target: str = ""
    tls: tuple[Path, Path, Path] = (Path(), Path(), Path())
    """(CA, client certificate, key) as the server printed them."""

    def output(self) -> str:
        return "\n".join(self.lines)


def _collect(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    nodes_file = tmp_path_factory.mktemp("serve") / "nodes.txt"
    nodes_file.write_text("# name cpu\nedge-a 1.0\nedge-b 0.5\n")
    cmd = [sys.executable, "-m", "amp4ec", "serve", "--model", MODEL, "--seed", str(SEED)]
    cmd += ["--nodes-file", str(nodes_file), "--http-port", "0", "--grpc-port", "0", "--strategy", "equal"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    s = Server(process, nodes_file)
    threading.Thread(target=_collect, args=(process.stdout, s.lines), daemon=True).start()
    try:
        wait_for(
            lambda: "ready; Ctrl-C" in s.output() or process.poll() is not None, 240, "serve to be ready"
        )
        assert process.poll() is None, s.output()
        s.rest = URL_OF_REST.search(s.output())[1]  # type: ignore[index]
        s.grpc_target = GRPC_AT.search(s.output())[1]  # type: ignore[index]
        s.tls = tuple(Path(p) for p in TLS_FILES.search(s.output()).groups())  # type: ignore[union-attr,assignment]
        _TLS.update(_tls(s))
        yield s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def monolith() -> torch.nn.Module:
    return load_model(ModelSource(MODEL, seed=SEED)).module


def _expected(monolith: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return monolith(x).numpy()


_TLS: dict[str, Any] = {}
"""The server's TLS as clients use it: ``context`` (urllib) and ``grpc`` (channel credentials)."""


def _tls(server: Server) -> dict[str, Any]:
    ca, cert, key = server.tls
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    grpc_credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    return {"context": context, "grpc": grpc_credentials}


def _channel(server: Server) -> grpc.Channel:
    return grpc.secure_channel(server.grpc_target, _TLS["grpc"])


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60, context=_TLS["context"]) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30, context=_TLS["context"]) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _x(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _json_infer(server: Server, x: torch.Tensor, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {
        "id": "r1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}],
    }
    status, _, raw = _post(f"{server.rest}/v2/models/{NAME}/infer", json.dumps({**body, **extra}).encode())
    return status, json.loads(raw)


def test_health_and_model_metadata_come_from_the_model(server: Server) -> None:
    assert _get(f"{server.rest}/v2/health/live")[0] == 200
    assert _get(f"{server.rest}/v2/health/ready")[0] == 200
    assert _get(f"{server.rest}/v2/models/{NAME}/ready")[0] == 200
    status, raw = _get(f"{server.rest}/v2/models/{NAME}")
    assert status == 200
    assert json.loads(raw) == {
        "name": NAME,
        "versions": ["1"],
        "platform": "amp4ec_pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}],
        "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert json.loads(_get(f"{server.rest}/v2")[1])["extensions"] == ["binary_tensor_data"]


def test_rest_json_answers_equal_the_monolith(server: Server, monolith: torch.nn.Module) -> None:
    for batch in (1, 3):
        x = _x(batch, seed=batch)
        status, reply = _json_infer(server, x)
        assert status == 200, reply
        assert reply["model_name"] == NAME and reply["id"] == "r1"
        out = reply["outputs"][0]
        assert (out["name"], out["datatype"], out["shape"]) == ("output_0", "FP32", [batch, 10])
        np.testing.assert_allclose(
            np.array(out["data"]).reshape(batch, 10), _expected(monolith, x), atol=1e-5
        )


def test_rest_binary_tensors_both_ways_equal_the_monolith(server: Server, monolith: torch.nn.Module) -> None:
    x = _x(seed=7)
    raw = x.numpy().tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, 3, 16, 16],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "output_0", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = _post(
        f"{server.rest}/v2/models/{NAME}/infer",
        header + raw,
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body[:300]
    n = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:n])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 40}
    got = np.frombuffer(body[n:], dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, _expected(monolith, x), atol=1e-5)


def test_grpc_raw_and_typed_contents_equal_the_monolith(server: Server, monolith: torch.nn.Module) -> None:
    x = _x(batch=2, seed=11)
    with _channel(server) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=NAME), timeout=10)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 3, 16, 16])]
        tensor = pb.ModelInferRequest.InferInputTensor
        raw = pb.ModelInferRequest(
            model_name=NAME,
            id="g1",
            inputs=[tensor(name="x", datatype="FP32", shape=[2, 3, 16, 16])],
            raw_input_contents=[x.numpy().tobytes()],
        )
        typed = pb.ModelInferRequest(
            model_name=NAME,
            inputs=[
                tensor(
                    name="x",
                    datatype="FP32",
                    shape=[2, 3, 16, 16],
                    contents=pb.InferTensorContents(fp32_contents=x.flatten().tolist()),
                )
            ],
        )
        for request in (raw, typed):
            reply = stub.ModelInfer(request, timeout=60)
            assert reply.id == request.id and reply.outputs[0].name == "output_0"
            assert list(reply.outputs[0].shape) == [2, 10]
            got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
            np.testing.assert_allclose(got, _expected(monolith, x), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"shape": [1, 3, 16]}, 400, "inputs[0].shape: expected [-1, 3, 16, 16]"),
        ({"datatype": "INT64"}, 400, "inputs[0].datatype: expected FP32, actual 'INT64'"),
        ({"name": "y"}, 400, "inputs[0].name: expected 'x', actual 'y'"),
        ({"data": [1.0, 2.0]}, 400, "inputs[0].data: expected 768 elements"),
        ({"shape": [65, 3, 16, 16]}, 400, "(-1: 1..64)"),
    ],
)
def test_rest_refusals_name_the_field(
    server: Server, change: dict[str, Any], status: int, message: str
) -> None:
    x = _x()
    tensor = {
        "name": "x",
        "datatype": "FP32",
        "shape": [1, 3, 16, 16],
        "data": x.flatten().tolist(),
        **change,
    }
    code, _, raw = _post(f"{server.rest}/v2/models/{NAME}/infer", json.dumps({"inputs": [tensor]}).encode())
    assert code == status and message in json.loads(raw)["error"]


def test_rest_unknown_model_bad_json_and_too_big_a_body(server: Server) -> None:
    code, _, raw = _post(f"{server.rest}/v2/models/resnet/infer", b"{}")
    assert code == 404 and "model 'resnet' is not served here" in json.loads(raw)["error"]
    assert _get(f"{server.rest}/v2/models/resnet")[0] == 404
    code, _, raw = _post(f"{server.rest}/v2/models/{NAME}/infer", b"{not json")
    assert code == 400 and json.loads(raw)["error"].startswith("request body: not valid JSON")
    header = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3,16,16],'
        b'"parameters":{"binary_data_size":3072}}]}'
    )
    code, _, raw = _post(
        f"{server.rest}/v2/models/{NAME}/infer",
        header + bytes(3000),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert code == 400 and "binary_data_size: expected 0..3000" in json.loads(raw)["error"]
    code, _, raw = _post(f"{server.rest}/v2/models/{NAME}/infer", bytes(65 * 1024 * 1024))
    assert code == 413 and "limit of 67108864 bytes" in json.loads(raw)["error"]
    code, _, raw = _post(f"{server.rest}/v2/models/{NAME}/infer", b" " * (17 * 1024 * 1024))
    assert code == 413 and "send large tensors as binary data" in json.loads(raw)["error"]


def test_grpc_refusals_are_status_codes_naming_the_field(server: Server) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor
    cases = [
        (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
        (
            pb.ModelInferRequest(
                model_name=NAME,
                inputs=[tensor(name="x", datatype="FP16", shape=[1, 3, 16, 16])],
                raw_input_contents=[bytes(1536)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[0].datatype: expected FP32, actual 'FP16'",
        ),
        (
            pb.ModelInferRequest(
                model_name=NAME,
                inputs=[tensor(name="x", datatype="FP32", shape=[1, 3, 16, 16])],
                raw_input_contents=[bytes(10)],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "raw_input_contents[0]: expected 3072 bytes",
        ),
    ]
    with _channel(server) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for request, code, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=30)
            assert info.value.code() == code and message in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_printed_curl_example_runs(server: Server, monolith: torch.nn.Module) -> None:
    command = next(line for line in server.lines if "try:" in line).split("try:", 1)[1].strip()
    assert f"curl -s --cacert {server.tls[0]} --cert {server.tls[1]} --key {server.tls[2]} " in command
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, timeout=60)
    out = json.loads(done.stdout)["outputs"][0]
    assert out["shape"] == [1, 10]
    x = torch.full((1, 3, 16, 16), float(np.frombuffer(b"\x3f" * 4, dtype=np.float32)[0]))  # what it sends
    np.testing.assert_allclose(np.array(out["data"]).reshape(1, 10), _expected(monolith, x), atol=1e-5)


def test_a_nodes_file_change_replans_and_serves_on(server: Server, monolith: torch.nn.Module) -> None:
    server.nodes_file.write_text("edge-a 1.0\nedge-c 0.5\nedge-d 0.5\n")  # edge-b gone, two new
    line = wait_for(
        lambda: next((x for x in server.lines if x.startswith("re-planned on ")), None), 180, "the re-plan"
    )
    assert line.startswith("re-planned on edge-a, edge-c, edge-d:") and "edge-b" not in line, server.output()
    x = _x(seed=5)
    status, reply = _json_infer(server, x)
    assert status == 200, reply
    np.testing.assert_allclose(
        np.array(reply["outputs"][0]["data"]).reshape(1, 10), _expected(monolith, x), atol=1e-5
    )
    server.nodes_file.write_text("edge-a 1.0\nedge-c oops\n")
    wait_for(lambda: "nodes file not applied" in server.output(), 30, "the refusal of a bad nodes file")
    assert "CPU share of edge-c: expected a number > 0, got 'oops'" in server.output()
    assert _json_infer(server, x)[0] == 200
    server.nodes_file.write_text("edge-a 1.0\nedge-c 0.7\nedge-d 0.5\n")  # edge-c changes: restarted
    wait_for(
        lambda: _replans(server) == 2 or server.output().count("not applied") == 2, 180, "the second re-plan"
    )
    assert _replans(server) == 2, server.output()
    limits = {}
    for pid in _children(server.process.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        limits[argv[argv.index("--node") + 1]] = argv[argv.index("--cpu-limit") + 1]
    assert limits == {"edge-a": "1.0", "edge-c": "0.7", "edge-d": "0.5"}
    status, reply = _json_infer(server, x)
    assert status == 200, reply
    np.testing.assert_allclose(
        np.array(reply["outputs"][0]["data"]).reshape(1, 10), _expected(monolith, x), atol=1e-5
    )


def _replans(server: Server) -> int:
    return sum(x.startswith("re-planned on ") for x in server.lines)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigint_leaves_nothing_behind(server: Server) -> None:
    agents = _children(server.process.pid)
    assert len(agents) == 3, agents  # edge-a, edge-c, edge-d
    workdirs = {
        Path(a).parent
        for pid in agents
        for a in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        if a.endswith(".port")
    }
    assert workdirs and all(d.is_dir() for d in workdirs)
    tls_dir = server.tls[0].parent
    assert (
        oct(tls_dir.stat().st_mode & 0o777) == "0o700"
        and oct(server.tls[2].stat().st_mode & 0o777) == "0o600"
    )
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 130, server.output()
    assert not [p for p in agents if _alive(p)]
    assert not [d for d in workdirs if d.exists()]
    assert not tls_dir.exists()
    cgroups = Path("/sys/fs/cgroup/cpu")
    if cgroups.is_dir():
        assert not list(cgroups.glob(f"amp4ec-{server.process.pid}-*"))
