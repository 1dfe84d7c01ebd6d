"""The operator end to end: real kopf, KMock API, kubelet stand-in, real Prometheus and node agents.

The expensive, stateless processes (fake cluster, monitors, Prometheus, kopf) are shared by the
module (conftest.py's ``env``); every test creates the deployments it needs in a namespace of its
own (``ns``), which is emptied after it, so any test passes alone and in any order. A test that
disturbs a shared process (stops Prometheus, overrides a node's capacity, restarts the operator)
puts it back, and ``e2e`` checks that before and after each test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import io
import itertools
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509

from amp4ec.wire import transport
from tests.operator.cluster import CONFIGMAPS, CRD, PODS, PVCS, ROOT, SECRETS, SERVICES, environ
from tests.operator.conftest import MEASURE_WINDOW, NODE_NAMES, Env, Namespace, restore_capacity, wait_for
from tests.operator.s3store import S3Store
from tests.operator.store import Store

pytestmark = pytest.mark.slow

MODEL = {"name": "tests.model_zoo:residual_net", "seed": 3}
PINNED = {
    "model": MODEL,
    "objective": "throughput",
    "nodeSelector": {"amp4ec.io/edge": "true"},
    "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-a"}],
    "replan": {"intervalSeconds": 5, "gainThreshold": 0.05},
}
"""A deployment of at least two stages (the pin makes a pipeline: activations cross a hop)."""
LATENCY = {"model": MODEL, "objective": "latency", "replan": {"intervalSeconds": 5, "gainThreshold": 0.05}}
"""A deployment of one stage (latency on equal nodes: no hops)."""


def wait_serving(env: Env, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    def serving() -> dict[str, Any] | None:
        obj = env.deployment(namespace, name) or {}
        status = obj.get("status") or {}
        ready = env.condition(namespace, name, "Ready")
        ok = (
            status.get("phase") == "Serving"
            and ready
            and ready["status"] == "True"
            and not status.get("rollout")
        )
        return obj if ok else None

    try:
        return wait_for(serving, timeout, f"{namespace}/{name} to serve")
    except AssertionError:
        print(env.logs())
        raise


def entry_port(env: Env, namespace: str, name: str) -> int:
    """The entry Service's loopback port once kube-proxy's stand-in routes it to a ready shard
    (status says Serving a moment before the proxy follows the Service's selector)."""
    return wait_for(
        lambda: env.cluster.routed_port(namespace, name), 30, f"the Service {namespace}/{name} to route"
    )


def infer(
    env: Env, namespace: str, name: str, x: torch.Tensor, tmp_path: Path, classes: int = 10
) -> torch.Tensor:
    port = entry_port(env, namespace, name)
    (tmp_path / "x.pt").unlink(missing_ok=True)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "y.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "amp4ec", "infer", "--endpoint", f"127.0.0.1:{port}",
         "--input", str(tmp_path / "x.pt"), "--output", str(out), "--json", *env.client_tls(namespace, name)],
        env=environ(), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    answer = json.loads(proc.stdout)
    assert answer["outputs"][0]["shape"] == [1, classes]
    assert len(answer["outputs"][0]["top_k"][0]) == 5
    return torch.load(out, weights_only=True)


def monolith(x: torch.Tensor) -> torch.Tensor:
    from amp4ec.slicing import ModelSource, load_model

    loaded = load_model(ModelSource(MODEL["name"], seed=MODEL["seed"]))
    with torch.inference_mode():
        return loaded.module(x)


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def owned(env: Env, namespace: str, resource_: str, name: str) -> list[dict[str, Any]]:
    """A deployment's Services, or its shard Pods (not its short-lived profiler Pod)."""
    role = ",amp4ec.io/role=shard" if resource_ == PODS else ""
    return env.kubectl.list(resource_, namespace, f"amp4ec.io/deployment={name}{role}")


def test_create_plans_places_shards_and_answers_like_the_monolith(ns: Namespace, tmp_path: Path) -> None:
    env, n = ns.env, ns.name
    ns.create("resnet", PINNED)
    obj = wait_serving(env, n, "resnet")
    status = obj["status"]
    stages = status["plan"]["stages"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert status["stages"] == len(stages) >= 1
    assert {c["type"] for c in status["conditions"]} == {"Planned", "ShardsReady", "Ready", "Degraded"}
    assert status["endpoint"] == f"resnet.{n}.svc:50051"
    assert status["predicted"]["throughputRps"] > 0
    for p in {s["pipeline"] for s in stages}:
        chain = [s for s in stages if s["pipeline"] == p]
        assert chain[0]["firstBlock"] == 0
        for a, b in itertools.pairwise(chain):
            assert b["firstBlock"] == a["lastBlock"] + 1
    assert {s["node"] for s in stages} <= set(NODE_NAMES)
    assert any((s["node"], s["firstBlock"], s["lastBlock"]) == ("edge-a", 0, 1) for s in stages)
    assert len(stages) >= 2  # the pin makes a pipeline: activations cross a hop

    pods = owned(env, n, PODS, "resnet")
    assert len(pods) == len(stages)
    uid = obj["metadata"]["uid"]
    for pod in pods:
        assert pod["metadata"]["ownerReferences"][0]["uid"] == uid
        labels = pod["metadata"]["labels"]
        where = (labels["amp4ec.io/pipeline"], labels["amp4ec.io/stage"])
        stage = next(s for s in stages if (str(s["pipeline"]), str(s["stage"])) == where)
        assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": stage["node"]}
        args = pod["spec"]["containers"][0]["args"]
        assert args[args.index("--first-block") + 1] == str(stage["firstBlock"])
        assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"].endswith("m")
    services = {s["metadata"]["name"] for s in owned(env, n, SERVICES, "resnet")}
    assert "resnet" in services and len(services) == len(stages) + 1

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(infer(env, n, "resnet", x, tmp_path), monolith(x))


TILED = {
    "model": {"name": "mobilenet_v2"},
    "inputShape": [1, 3, 160, 160],
    "objective": "latency",
    "replan": {"intervalSeconds": 5, "gainThreshold": 0.05},
}
"""One request's convolutions split into row tiles over the three nodes (MobileNetV2 at 160x160
is long enough to compute, and its feature maps tall enough, for tiles to cut latency)."""


def test_a_tiled_plan_is_served_by_tile_pods_and_answers_like_the_monolith(
    ns: Namespace, tmp_path: Path
) -> None:
    from amp4ec.slicing import ModelSource, load_model

    env, n = ns.env, ns.name
    ns.create("tiled", TILED)
    obj = wait_serving(env, n, "tiled", timeout=240)
    stages = obj["status"]["plan"]["stages"]
    tiled = [s for s in stages if s.get("tiles")]
    assert tiled, f"the planner chose no tiles: {stages}"
    (stage,) = tiled
    tiles = stage["tiles"]
    others = [t["node"] for t in tiles["nodes"]]
    assert others and stage["node"] not in others
    for phase in tiles["phases"]:
        assert phase["rows"][0]["node"] == stage["node"]
        assert {r["node"] for r in phase["rows"]} == {stage["node"], *others}

    pods = owned(env, n, PODS, "tiled")
    assert len(pods) == len(stages) + len(others)
    by_label = {p["metadata"]["labels"]["amp4ec.io/stage"]: p for p in pods}
    for k, node in enumerate(others, start=1):
        pod = by_label[f"{stage['stage']}-t{k}"]
        assert pod["spec"]["nodeSelector"] == {"kubernetes.io/hostname": node}
        assert "--tile-only" in pod["spec"]["containers"][0]["args"]
    args = by_label[str(stage["stage"])]["spec"]["containers"][0]["args"]
    assert args.count("--tile-phase") == len(tiles["phases"])

    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    loaded = load_model(ModelSource("mobilenet_v2", input_shape=(1, 3, 160, 160)))
    with torch.inference_mode():
        expected = loaded.module(x)
    out = infer(env, n, "tiled", x, tmp_path, classes=1000)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def _https(
    port: int, host: str, context: ssl.SSLContext, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    """One HTTPS request to the loopback ``port`` as if to ``host`` (SNI and the certificate's
    name check both use ``host``, as they would through the Service's DNS name)."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=60), server_hostname=host
    )
    try:
        conn.request("POST" if body is not None else "GET", path, body=body)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"null")
    finally:
        conn.close()


def test_the_entry_serves_the_open_inference_protocol_like_the_monolith(ns: Namespace) -> None:
    from amp4ec.wire.oip import grpc_predict_v2_pb2 as pb
    from amp4ec.wire.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    env, n = ns.env, ns.name
    ns.create("resnet", PINNED)
    obj = wait_serving(env, n, "resnet")
    assert len(obj["status"]["plan"]["stages"]) >= 2  # the answer crosses a hop
    host = f"resnet.{n}.svc"
    assert obj["status"]["v2"] == {"rest": f"https://{host}:8000/v2/models/resnet", "grpc": f"{host}:8001"}
    rest_port, grpc_port = (
        wait_for(lambda t=t: env.cluster.routed_port(n, "resnet", t), 30, f"the entry's {t} port")
        for t in ("v2-rest", "v2-grpc")
    )
    tls = env.client_tls(n, "resnet")  # --ca CA --cert CERT --key KEY: the client Secret
    ca, cert, key = tls[1], tls[3], tls[5]
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    expected = monolith(x).numpy()

    status, meta = _https(rest_port, host, context, "/v2/models/resnet")
    assert status == 200 and meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 3, 16, 16], "data": x.flatten().tolist()}
    status, reply = _https(
        rest_port, host, context, "/v2/models/resnet/infer", json.dumps({"inputs": [tensor]}).encode()
    )
    assert status == 200, reply
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(2, 10), expected, atol=1e-5)
    for change, code, message in [
        ({"shape": [2, 3, 16]}, 400, "inputs[0].shape: expected [-1, 3, 16, 16]"),
        ({"datatype": "INT32"}, 400, "inputs[0].datatype: expected FP32, actual 'INT32'"),
    ]:
        body = json.dumps({"inputs": [{**tensor, **change}]}).encode()
        status, reply = _https(rest_port, host, context, "/v2/models/resnet/infer", body)
        assert status == code and message in reply["error"], reply
    status, reply = _https(rest_port, host, context, "/v2/models/mobilenet/infer", b"{}")
    assert status == 404 and "model 'mobilenet' is not served here" in reply["error"]
    with pytest.raises((ssl.SSLError, ConnectionError)):  # no client certificate: no handshake
        _https(rest_port, host, ssl.create_default_context(cafile=ca), "/v2/health/ready")

    credentials = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes()
    )
    options = [("grpc.ssl_target_name_override", host)]
    with grpc.secure_channel(f"127.0.0.1:{grpc_port}", credentials, options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        spec = pb.ModelInferRequest.InferInputTensor
        request = pb.ModelInferRequest(
            model_name="resnet",
            inputs=[spec(name="x", datatype="FP32", shape=[2, 3, 16, 16])],
            raw_input_contents=[x.numpy().tobytes()],
        )
        reply = stub.ModelInfer(request, timeout=60)
        got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        for wrong, code in [
            (pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
            (
                pb.ModelInferRequest(
                    model_name="resnet",
                    inputs=[spec(name="x", datatype="FP32", shape=[2, 3, 8, 8])],
                    raw_input_contents=[bytes(1536)],
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                pb.ModelInferRequest(
                    model_name="resnet",
                    inputs=[spec(name="x", datatype="FP64", shape=[2, 3, 16, 16])],
                    raw_input_contents=[bytes(12288)],
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(wrong, timeout=30)
            assert info.value.code() == code, info.value.details()

    if shutil.which("curl"):  # the README's recipe: the Service's name resolved to a port-forward
        done = subprocess.run(
            ["curl", "-sf", "--cacert", ca, "--cert", cert, "--key", key,
             "--resolve", f"{host}:{rest_port}:127.0.0.1", f"https://{host}:{rest_port}/v2/models/resnet/ready"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


async def _traffic(port: int, x: torch.Tensor, at_least: int, for_s: float, tls: list[str]) -> list[float]:
    """Closed-loop requests through the entry Service; the client-side latency of each, in s."""
    from amp4ec import pki
    from amp4ec.client import Client, Endpoint
    from amp4ec.wire.transport import TransportSecurity

    latencies: list[float] = []
    deadline = time.monotonic() + for_s
    security = TransportSecurity.from_files(tls[1], tls[3], tls[5])  # --ca X --cert Y --key Z
    entry = pki.entry_identity_for_client(security.identity)
    async with Client([Endpoint(f"127.0.0.1:{port}", identity=entry)], security) as client:
        while len(latencies) < at_least or time.monotonic() < deadline:
            latencies.append((await client.infer([x])).latency_s)
            await asyncio.sleep(0.05)  # pacing (spread over scrapes), not synchronisation
    return latencies


def measured_numbers(env: Env, namespace: str, name: str) -> dict[str, Any] | None:
    measured = ((env.deployment(namespace, name) or {}).get("status") or {}).get("measured") or {}
    return measured if "throughputRps" in measured else None


def test_measured_throughput_and_latency_come_from_real_requests(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("resnet", PINNED)
    obj = wait_serving(env, n, "resnet")
    assert len(obj["status"]["plan"]["stages"]) >= 2  # the latency spans a hop
    port = entry_port(env, n, "resnet")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    # Spread over several scrapes (1 s): a rate needs two samples of the counter.
    latencies = asyncio.run(_traffic(port, x, at_least=30, for_s=4.0, tls=env.client_tls(n, "resnet")))
    sent_after = time.time()
    try:
        measured = wait_for(
            lambda: (
                (m := measured_numbers(env, n, "resnet"))
                and m["observedAt"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sent_after))
                and m
            ),
            60,
            "status.measured after the requests",
        )
    except AssertionError:
        print(env.logs())
        raise
    assert measured["window"] == MEASURE_WINDOW
    assert 0 < measured["throughputRps"] <= len(latencies)
    assert measured["latencyP95Ms"] >= measured["latencyP50Ms"] > 0
    # The entry shard's time is inside the client's; a quantile lands somewhere in its bucket,
    # and neighbouring bucket bounds are at most 2.5x apart.
    assert measured["latencyP95Ms"] <= 2.5 * 1000 * max(latencies), (measured, max(latencies))
    # Only the entry stage observes the end-to-end histogram, under the Pod's target labels.
    series = env.prometheus.query(f'amp4ec_request_seconds_count{{namespace="{n}",deployment="resnet"}}')
    assert series and {s["metric"]["stage"] for s in series} == {"0"}, series


HTTPS = "https://models.example/m.pt"


def pins(*spans: tuple[int, int, str]) -> list[dict[str, Any]]:
    return [{"firstBlock": a, "lastBlock": b, "node": n} for a, b, n in spans]


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("model-not-object", {"model": "resnet"}, "InvalidSpec"),
    ("model-missing", {"objective": "latency"}, "InvalidSpec"),
    ("model-name-path", {"model": {"name": "../etc/passwd"}}, "InvalidSpec"),
    ("model-unknown", {"model": {"name": "mobilenet_v9"}}, "InvalidModel"),
    ("factory-unknown", {"model": {"name": "tests.model_zoo:nope"}}, "InvalidModel"),
    ("https-no-sha", {"model": {"name": "mobilenet_v2", "storageUri": HTTPS}}, "InvalidSpec"),
    ("sha-malformed", {"model": {**MODEL, "storageUri": HTTPS, "sha256": "abc"}}, "InvalidSpec"),
    ("uri-scheme", {"model": {**MODEL, "storageUri": "s3://bucket/m.pt"}}, "InvalidSpec"),
    ("pvc-no-path", {"model": {**MODEL, "storageUri": "pvc://claim"}}, "InvalidSpec"),
    ("shape-zero", {"model": MODEL, "inputShape": [1, 3, 0, 16]}, "InvalidSpec"),
    ("shape-strings", {"model": MODEL, "inputShape": ["1", "3"]}, "InvalidSpec"),
    ("shape-impossible", {"model": MODEL, "inputShape": [1, 5, 16, 16]}, "InvalidModel"),
    ("objective-enum", {"model": MODEL, "objective": "fastest"}, "InvalidSpec"),
    ("strategy-enum", {"model": MODEL, "strategy": "magic"}, "InvalidSpec"),
    ("max-stages-zero", {"model": MODEL, "maxStages": 0}, "InvalidSpec"),
    ("max-stages-string", {"model": MODEL, "maxStages": "3"}, "InvalidSpec"),
    ("replan-too-often", {"model": MODEL, "replan": {"intervalSeconds": 1}}, "InvalidSpec"),
    ("gain-negative", {"model": MODEL, "replan": {"gainThreshold": -1}}, "InvalidSpec"),
    ("no-nodes-match", {"model": MODEL, "nodeSelector": {"amp4ec.io/edge": "nowhere"}}, "NoNodes"),
    ("selector-key", {"model": MODEL, "nodeSelector": {"bad key!": "x"}}, "InvalidSpec"),
    ("pins-overlap", {"model": MODEL, "placement": pins((0, 2, "edge-a"), (2, 3, "edge-b"))}, "InvalidSpec"),
    ("pin-reversed", {"model": MODEL, "placement": pins((3, 1, "edge-a"))}, "InvalidSpec"),
    ("pin-out-of-range", {"model": MODEL, "placement": pins((40, 41, "edge-a"))}, "InvalidPlacement"),
    ("unknown-field", {"model": MODEL, "replicas": 3}, "InvalidSpec"),
]


def reason_is(env: Env, namespace: str, name: str, kind: str, reason: str) -> dict[str, Any] | None:
    c = env.condition(namespace, name, kind)
    return c if c is not None and c["reason"] == reason else None


def test_malformed_resources_each_get_a_clear_condition_and_the_operator_serves_others(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    assert len(MALFORMED) >= 20
    for name, spec, _ in MALFORMED:
        ns.create(name, spec)
    ns.create("good", {"model": MODEL, "objective": "latency"})
    for name, _, reason in MALFORMED:
        ready = wait_for(
            lambda name=name, reason=reason: reason_is(env, n, name, "Ready", reason),
            60,
            f"{name} to report {reason}",
        )
        assert ready["status"] == "False"
        planned = env.condition(n, name, "Planned")
        assert planned is not None and planned["status"] == "False" and planned["message"], planned
        assert not owned(env, n, PODS, name), f"{name} got shard Pods"
    bad_type = env.condition(n, "max-stages-string", "Planned")
    assert bad_type is not None and "spec.maxStages" in bad_type["message"]
    wait_serving(env, n, "good")
    # Nobody calls it: the operator measures, and says so with no numbers rather than zeros.
    idle = wait_for(
        lambda: ((env.deployment(n, "good") or {}).get("status") or {}).get("measured"),
        30,
        "status.measured of an idle deployment",
    )
    assert idle["window"] == MEASURE_WINDOW and idle["observedAt"]
    assert not {"throughputRps", "latencyP50Ms", "latencyP95Ms"} & set(idle), idle
    failed = env.deployment(n, "model-unknown")
    assert failed is not None and failed["status"]["phase"] == "Failed"
    errors = (
        f'amp4ec_reconcile_errors_total{{deployment="model-unknown",namespace="{n}",reason="InvalidModel"}}'
    )
    assert errors in env.operator.metrics()


def scheduler_count(text: str, namespace: str, name: str) -> float:
    """``amp4ec_scheduler_overhead_seconds_count`` of one deployment in the operator's /metrics."""
    labels = rf'deployment="{name}",namespace="{namespace}",strategy="\w+"'
    found = re.search(rf"amp4ec_scheduler_overhead_seconds_count\{{{labels}\}} (\S+)", text)
    return float(found[1]) if found else 0.0


def replans(text: str, namespace: str, name: str, trigger: str = r"\w+") -> float:
    """``amp4ec_replans_total`` of one deployment, summed over the triggers ``trigger`` matches."""
    labels = rf'deployment="{name}",namespace="{namespace}",trigger="{trigger}"'
    return sum(float(v) for v in re.findall(rf"amp4ec_replans_total\{{{labels}\}} (\S+)", text))


def test_capacity_change_replans_make_before_break(ns: Namespace, tmp_path: Path) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    before = wait_serving(env, n, "lat")["status"]["plan"]
    old_pods = {p["metadata"]["name"] for p in owned(env, n, PODS, "lat")}
    assert old_pods
    assert len(before["stages"]) == 1  # latency on equal nodes: one stage, no hops
    slowed = before["stages"][0]["node"]
    env.monitors[slowed].set_capacity(workload_ms=1000.0)  # 100-1000x slower than the others
    try:
        after = wait_for(
            lambda: (
                (s := (env.deployment(n, "lat") or {}).get("status") or {}).get("phase") == "Serving"
                and s["plan"]["id"] != before["id"]
                and s["plan"]
            ),
            90,
            "a new plan after the capacity change",
        )
    finally:
        restore_capacity(env, slowed)
    assert all(s["node"] != slowed for s in after["stages"])
    # The operator's metrics say so: every plan timed, and two applied (the first and the re-plan,
    # triggered by the timer or by a retry of the create handler, whichever looked first).
    text = env.operator.metrics()
    assert scheduler_count(text, n, "lat") >= 2, text[-3000:]
    assert replans(text, n, "lat") >= 2, text[-3000:]

    def rv(version: dict[str, Any] | None) -> int:
        return int(version["metadata"]["resourceVersion"]) if version else 0

    new_ready = []
    for name in {p["metadata"]["name"] for p in owned(env, n, PODS, "lat")} - old_pods:
        history = env.cluster.history(PODS, n, name)
        ready_at = [rv(v) for v in history if v and _ready(v)]
        new_ready.append(min(ready_at))
    assert new_ready
    for name in old_pods:
        # Old shards drain: marked deleted (SIGTERM), gone once their process ended.
        history = wait_for(
            lambda name=name: (h := env.cluster.history(PODS, n, name)) and h[-1] is None and h,
            30,
            f"old shard {name} to be deleted",
        )
        marked = [rv(v) for v in history if v and v["metadata"].get("deletionTimestamp")]
        deleted_at = min(marked) if marked else rv(history[-2])
        assert deleted_at > max(new_ready), "an old shard went before every new shard was ready"
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(infer(env, n, "lat", x, tmp_path), monolith(x))


def test_prometheus_unreachable_keeps_the_plan_and_says_so(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    before = wait_serving(env, n, "lat")["status"]["plan"]["id"]
    env.prometheus.proc.send_signal(signal.SIGSTOP)  # queries hang until the operator's timeout
    try:
        degraded = wait_for(
            lambda: (c := env.condition(n, "lat", "Degraded")) and c["reason"] == "CapacityUnavailable" and c,
            60,
            "Degraded=CapacityUnavailable",
        )
        assert degraded["status"] == "True"
        ready = env.condition(n, "lat", "Ready")
        assert ready is not None and ready["status"] == "True"
        assert (env.deployment(n, "lat") or {})["status"]["plan"]["id"] == before
    finally:
        env.prometheus.proc.send_signal(signal.SIGCONT)
    wait_for(
        lambda: (c := env.condition(n, "lat", "Degraded")) and c["status"] == "False",
        60,
        "Degraded=False",
    )


def test_operator_metrics_per_deployment_and_forgotten_with_it(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    ns.create("unknown", {"model": {"name": "mobilenet_v9"}})
    wait_serving(env, n, "lat")
    wait_for(lambda: reason_is(env, n, "unknown", "Ready", "InvalidModel"), 60, "unknown to fail")
    text = env.operator.metrics()
    assert scheduler_count(text, n, "lat") >= 1, text[-3000:]
    assert replans(text, n, "lat", "create") >= 1, text[-3000:]  # the first plan counts
    errors = f'amp4ec_reconcile_errors_total{{deployment="unknown",namespace="{n}",reason="InvalidModel"}}'
    assert errors in text
    phase = f'amp4ec_deployment_phase{{deployment="lat",namespace="{n}",phase="Serving"}} 1.0'
    assert phase in text
    env.kubectl.delete(CRD, n, "lat")
    wait_for(
        lambda: f'deployment="lat",namespace="{n}"' not in env.operator.metrics(),
        30,
        "the deleted deployment's series to go",
    )


def test_operator_restart_mid_reconcile_converges_without_duplicates(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("pinned", {"model": MODEL, "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-b"}]})
    wait_for(lambda: owned(env, n, PODS, "pinned"), 60, "the first shard Pods", every=0.05)
    env.operator.kill()
    env.operator.start()
    obj = wait_serving(env, n, "pinned")
    stages = obj["status"]["plan"]["stages"]
    assert len(stages) >= 2
    assert any(s["node"] == "edge-b" and (s["firstBlock"], s["lastBlock"]) == (0, 1) for s in stages)
    pods = owned(env, n, PODS, "pinned")
    assert len(pods) == len(stages)
    shards = {p for p in env.cluster.names(PODS, n) if "-profiler-" not in p}
    assert len(shards) == len(stages), "a Pod was created twice"


def test_delete_removes_everything_owned(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("resnet", LATENCY)
    wait_serving(env, n, "resnet")
    assert owned(env, n, PODS, "resnet") and owned(env, n, SERVICES, "resnet")
    assert env.cluster.pod_processes(n)
    env.kubectl.delete(CRD, n, "resnet")
    wait_for(lambda: env.deployment(n, "resnet") is None, 60, "the resource to go")
    wait_for(
        lambda: not owned(env, n, PODS, "resnet") and not owned(env, n, SERVICES, "resnet"),
        60,
        "owned Pods and Services to go",
    )
    wait_for(lambda: not env.cluster.pod_processes(n), 30, "shard processes to stop")


# --- A user's own model: a .pt2 from storage, profiled in the user's namespace ---------------


@pytest.fixture(scope="module")
def store(env: Env) -> Iterator[Store]:
    """An HTTPS model store on loopback whose certificate the cluster's processes trust."""
    assert env.store_tls is not None
    with Store(*env.store_tls) as s:
        yield s


def exported(seed: int = 11) -> tuple[torch.export.ExportedProgram, bytes]:
    """A user's model as a user makes it: a tiny CNN with a residual, torch.export'ed and saved."""
    from tests.model_zoo import ResidualNet

    torch.manual_seed(seed)
    program = torch.export.export(ResidualNet().eval(), (torch.randn(1, 3, 16, 16),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return program, buffer.getvalue()


def history_of(env: Env, namespace: str, name: str) -> list[dict[str, Any]]:
    return [v for v in env.cluster.history(CRD, namespace, name) if v is not None]


def profiler_pods(env: Env, namespace: str) -> list[str]:
    return sorted(p for p in env.cluster.names(PODS, namespace) if "-profiler-" in p)


def test_a_users_pt2_from_https_or_a_claim_is_profiled_in_its_namespace_and_serves_like_the_monolith(
    ns: Namespace, store: Store, tmp_path: Path
) -> None:
    env, n = ns.env, ns.name
    program, data = exported()
    digest = hashlib.sha256(data).hexdigest()
    store.files["/models/residual.pt2"] = data
    # The same archive on a claim in the namespace (mounted read-only by the initializer only).
    env.kubectl.create(PVCS, {"metadata": {"name": "models", "namespace": n}, "spec": {}})
    (env.cluster.claim_dir(n, "models") / "team").mkdir()
    (env.cluster.claim_dir(n, "models") / "team" / "residual.pt2").write_bytes(data)
    spec = {
        "model": {"storageUri": store.url("/models/residual.pt2"), "sha256": digest},
        "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-a"}],  # two stages at least
        "replan": {"intervalSeconds": 5, "gainThreshold": 0.05},
    }
    uid = ns.create("mine", spec)["metadata"]["uid"]
    wait_for(lambda: profiler_pods(env, n), 60, "mine's profiler Pod")
    claimed = {
        "model": {"storageUri": "pvc://models/team/residual.pt2", "sha256": digest},
        "objective": "latency",
    }
    ns.create("claimed", claimed)  # waits for mine's profile: the same archive
    obj = wait_serving(env, n, "mine")
    stages = obj["status"]["plan"]["stages"]
    assert len(stages) >= 2

    # Profiled once (the claim holds the same archive: its digest names it), in a Pod of the
    # user's namespace: its identity, its limits, then deleted.
    (name,) = profiler_pods(env, n)
    versions = env.cluster.history(PODS, n, name)
    assert versions[-1] is None, "the profiler Pod is deleted once it answered"
    pod = versions[0]
    assert pod is not None and pod["metadata"]["ownerReferences"][0]["uid"] == uid
    podspec = pod["spec"]
    (container,) = podspec["containers"]
    assert "--profiler" in container["args"] and "--port" not in container["args"]  # Profile only
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert podspec["activeDeadlineSeconds"] == 600 and podspec["restartPolicy"] == "Never"
    assert podspec["automountServiceAccountToken"] is False
    assert (
        podspec["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    )
    (init,) = podspec["initContainers"]
    assert init["args"][init["args"].index("--sha256") + 1] == digest
    tls = next(v for v in podspec["volumes"] if v["name"] == "tls")["secret"]["secretName"]
    leaf = base64.b64decode(env.kubectl.get(SECRETS, n, tls)["data"]["tls.crt"])
    names = x509.load_pem_x509_certificate(leaf).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == [
        f"profiler.mine.{n}.amp4ec"
    ]  # never the monitors'
    policy = env.kubectl.get("networking.k8s.io/v1/networkpolicies", n, "mine.profiler")
    assert policy is not None and len(policy["spec"]["ingress"]) == 1  # the operator only
    said = [c for v in history_of(env, n, "mine") for c in (v.get("status") or {}).get("conditions") or ()]
    assert any(c["type"] == "Planned" and c["reason"] == "Profiling" and name in c["message"] for c in said)

    # Each shard fetched and verified the archive itself and serves only its blocks of it.
    for shard in owned(env, n, PODS, "mine"):
        args = shard["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1] == f"/mnt/models/{digest}.pt2"
        stage = next(s for s in stages if str(s["stage"]) == shard["metadata"]["labels"]["amp4ec.io/stage"])
        assert args[args.index("--first-block") + 1] == str(stage["firstBlock"])
        assert args[args.index("--last-block") + 1] == str(stage["lastBlock"])
    assert store.requests.count("/models/residual.pt2") == 1 + len(stages)  # the profiler, each shard

    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = program.module()(x)
    torch.testing.assert_close(infer(env, n, "mine", x, tmp_path), expected)
    wait_serving(env, n, "claimed")
    torch.testing.assert_close(infer(env, n, "claimed", x, tmp_path), expected)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_wrong_digest_an_unreachable_uri_a_non_archive_and_a_missing_claim_each_say_so(
    ns: Namespace, store: Store
) -> None:
    env, n = ns.env, ns.name
    _, data = exported(seed=12)
    digest = hashlib.sha256(data).hexdigest()
    junk = b"PK\x03\x04 not an archive"
    store.files["/m.pt2"], store.files["/junk.pt2"] = data, junk
    ns.create("wrong-digest", {"model": {"storageUri": store.url("/m.pt2"), "sha256": "0" * 64}})
    unreachable = f"https://127.0.0.1:{_closed_port()}/m.pt2"
    ns.create("unreachable", {"model": {"storageUri": unreachable, "sha256": digest}})
    junk_sha = hashlib.sha256(junk).hexdigest()
    ns.create("not-archive", {"model": {"storageUri": store.url("/junk.pt2"), "sha256": junk_sha}})
    ns.create("no-claim", {"model": {"storageUri": "pvc://nowhere/m.pt2", "sha256": digest}})
    expected = {
        "wrong-digest": ("InvalidStorage", f"sha256 expected {'0' * 64}, actual {digest}"),
        "unreachable": ("StorageUnavailable", "Connection refused"),
        "not-archive": ("InvalidStorage", "not a .pt2 archive"),
        "no-claim": ("StorageUnavailable", 'persistentvolumeclaim "nowhere" not found'),
    }
    try:
        for name, (reason, cause) in expected.items():
            planned = wait_for(
                lambda name=name, reason=reason: reason_is(env, n, name, "Planned", reason),
                90,
                f"{name}: {reason}",
            )
            assert planned["message"].startswith("spec.model.storageUri: ") and cause in planned["message"], (
                planned
            )
            assert not owned(env, n, PODS, name), f"{name} got shard Pods"
    except AssertionError:
        print(env.logs())
        raise
    assert (env.deployment(n, "wrong-digest") or {})["status"]["phase"] == "Failed"  # the spec must change
    assert (env.deployment(n, "unreachable") or {})["status"]["phase"] == "Planning"  # retried


def test_a_pt2_from_an_s3_store_with_a_private_ca_serves_and_a_missing_or_wrong_secret_says_so(
    ns: Namespace, tmp_path: Path
) -> None:
    """An edge MinIO stand-in (moto over TLS from a private CA, checking every signature): the
    credentials reach only the initializers (secretKeyRef), the CA through caBundle; a Secret that
    does not exist yet is StorageUnavailable naming it and heals once it is created; a wrong one
    is InvalidStorage naming it; neither Secret's value appears in any status."""
    env, n = ns.env, ns.name
    program, data = exported(seed=13)
    digest = hashlib.sha256(data).hexdigest()

    def secret(name: str, key_id: str, value: str) -> None:
        encoded = {
            k: base64.b64encode(v.encode()).decode()
            for k, v in (("accessKeyId", key_id), ("secretAccessKey", value))
        }
        env.kubectl.create(SECRETS, {"metadata": {"name": name, "namespace": n}, "data": encoded})

    with S3Store() as s3:
        s3.put("models", "team/residual.pt2", data)
        env.kubectl.create(
            CONFIGMAPS, {"metadata": {"name": "edge-ca", "namespace": n}, "data": {"ca.crt": s3.ca_pem}}
        )
        secret("wrong-creds", s3.key_id, "not-the-secret")

        def model(secret_name: str) -> dict[str, Any]:
            return {
                "model": {
                    "storageUri": "s3://models/team/residual.pt2",
                    "sha256": digest,
                    "s3": {"endpoint": s3.endpoint, "secretName": secret_name},
                    "caBundle": {"configMapName": "edge-ca"},
                },
                "placement": [{"firstBlock": 0, "lastBlock": 1, "node": "edge-a"}],  # two stages at least
            }

        ns.create("wrong-secret", model("wrong-creds"))
        ns.create("mine", model("minio-creds"))  # its Secret does not exist yet
        try:
            wrong = wait_for(
                lambda: reason_is(env, n, "wrong-secret", "Planned", "InvalidStorage"), 90, "wrong"
            )
            assert wrong["message"].startswith("spec.model.storageUri: ")
            assert "SignatureDoesNotMatch" in wrong["message"] and "Secret wrong-creds" in wrong["message"]
            missing = wait_for(
                lambda: reason_is(env, n, "mine", "Planned", "StorageUnavailable"), 90, "missing"
            )
            assert 'secret "minio-creds" not found (spec.model.s3.secretName)' in missing["message"], missing
            secret("minio-creds", s3.key_id, s3.secret)  # retried after AMP4EC_INFEASIBLE_RETRY_S
            obj = wait_serving(env, n, "mine", timeout=240)
        except AssertionError:
            print(json.dumps((env.deployment(n, "mine") or {}).get("status"), indent=1))
            for pod in env.kubectl.list(PODS, n):
                print(pod["metadata"]["name"], json.dumps(pod.get("status"))[:1500])
            raise
        assert len(obj["status"]["plan"]["stages"]) >= 2
        for shard in owned(env, n, PODS, "mine"):
            (init,) = shard["spec"]["initContainers"]
            credentials = [e for e in init["env"] if e["name"].startswith("AWS_")]
            assert len(credentials) == 3 and all("valueFrom" in e for e in credentials)  # by reference
            assert "env" not in shard["spec"]["containers"][0] or all(
                not e["name"].startswith("AWS_") for e in shard["spec"]["containers"][0]["env"]
            )
        said = json.dumps(
            [v.get("status") for v in history_of(env, n, "mine") + history_of(env, n, "wrong-secret")]
        )
        assert s3.secret not in said and "not-the-secret" not in said
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
        with torch.inference_mode():
            expected = program.module()(x)
        torch.testing.assert_close(infer(env, n, "mine", x, tmp_path), expected)


def test_a_shards_store_that_changed_after_profiling_is_named_in_its_status(
    ns: Namespace, store: Store
) -> None:
    """The profiler fetched the archive; the store then serves other bytes: each shard's
    initializer fails the digest, and the deployment says so (ShardsReady, Degraded) with the
    initializer's own cause, without giving up a node for it."""
    env, n = ns.env, ns.name
    _, data = exported(seed=14)
    digest = hashlib.sha256(data).hexdigest()
    replaced = b"PK\x03\x04 replaced"
    store.files["/changed.pt2"], store.then["/changed.pt2"] = data, replaced
    ns.create("changed", {"model": {"storageUri": store.url("/changed.pt2"), "sha256": digest}})
    try:
        shards = wait_for(
            lambda: reason_is(env, n, "changed", "ShardsReady", "InvalidStorage"), 120, "shards"
        )
        degraded = wait_for(
            lambda: reason_is(env, n, "changed", "Degraded", "InvalidStorage"), 30, "degraded"
        )
    except AssertionError:
        print(env.logs())
        raise
    cause = f"sha256 expected {digest}, actual {hashlib.sha256(replaced).hexdigest()}"
    for c in (shards, degraded):
        assert "spec.model.storageUri: " in c["message"] and cause in c["message"], c
        assert "storage-initializer" in c["message"]
    planned = env.condition(n, "changed", "Planned")
    assert planned is not None and planned["status"] == "True"  # the plan stands: the store is at fault


def test_the_cluster_wide_monitor_refuses_to_profile_any_model(e2e: Env) -> None:
    from amp4ec import pki
    from amp4ec.wire.transport import TransportSecurity
    from amp4ec.wire.v1 import agent_pb2, agent_pb2_grpc

    secret = e2e.kubectl.get(SECRETS, "amp4ec-system", "amp4ec-ca")
    ca = pki.CertificateAuthority.load(*(base64.b64decode(secret["data"][k]) for k in ("ca.crt", "ca.key")))
    own = ca.issue(pki.OPERATOR)  # even the operator's own identity
    security = TransportSecurity(ca.cert_pem, own.cert_pem, own.key_pem)
    monitor = e2e.monitors[NODE_NAMES[0]]

    async def profile(model: str) -> grpc.StatusCode:
        async with transport.channel(monitor.address, security, expect_identity=pki.MONITOR) as channel:
            request = agent_pb2.ProfileRequest(model=agent_pb2.StageSpec(model=model))
            try:
                await agent_pb2_grpc.MonitorStub(channel).Profile(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert "profiles no model" in (exc.details() or ""), exc.details()
                return exc.code()
        return grpc.StatusCode.OK

    for model in ("tests.model_zoo:residual_net", "mobilenet_v2"):  # an allowed factory, a zoo model
        assert asyncio.run(profile(model)) == grpc.StatusCode.PERMISSION_DENIED
    assert monitor.proc.poll() is None  # alive, and still publishing capacity
    assert e2e.prometheus.query(f'amp4ec_node_workload_ms{{node="{monitor.node}"}}')
