"""The operator end to end: real kopf, KMock API, kubelet stand-in, real Prometheus and node agents.

The expensive, stateless processes (fake cluster, monitors, Prometheus, kopf) are shared by the
module (conftest.py's ``env``); every test creates the deployments it needs in a namespace of its
own (``ns``), which is emptied after it, so any test passes alone and in any order. A test that
disturbs a shared process (stops Prometheus, overrides a node's capacity, restarts the operator)
puts it back, and ``e2e`` checks that before and after each test.
"""

from __future__ import annotations

import asyncio
import http.client
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
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from tests.operator.cluster import CRD, PODS, ROOT, SERVICES, environ
from tests.operator.conftest import MEASURE_WINDOW, NODE_NAMES, Env, Namespace, restore_capacity, wait_for

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
    "model": {"name": "tests.model_zoo:conv_stack"},
    "objective": "latency",
    "replan": {"intervalSeconds": 5, "gainThreshold": 0.05},
}
"""One request's convolutions split into row tiles over the three nodes: ``ConvStack``'s time is
nearly all in wide convolutions on a 96-row map, where tiles cut latency on any CPU (predicted
about 0.55× one node here). Not MobileNetV2: on small maps a tile pays most of a block's time
whatever its rows, and the planner rightly keeps it on one node."""


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

    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(5))
    loaded = load_model(ModelSource("tests.model_zoo:conv_stack"))
    with torch.inference_mode():
        expected = loaded.module(x)
    out = infer(env, n, "tiled", x, tmp_path, classes=10)
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


def test_a_restarted_operator_replans_from_the_profile_in_status(ns: Namespace) -> None:
    """The profile cache is the operator's memory; the profile the deployment was planned from
    is also in its status, so a restarted operator re-plans (here: a spec change) without
    starting a profiler Pod again."""
    from amp4ec.operator import profilestatus
    from amp4ec.operator.config import OperatorConfig
    from amp4ec.operator.profiles import ProfileKey
    from amp4ec.operator.spec import parse_spec

    env, n = ns.env, ns.name
    ns.create("kept", {"model": MODEL})
    obj = wait_serving(env, n, "kept")
    spec = parse_spec(obj["spec"], OperatorConfig(allowed_factory_modules=("tests",)).spec_policy())
    kept = profilestatus.decode(obj["status"]["profile"], ProfileKey.of(spec, n))
    assert kept is not None and len(kept.blocks) > 1
    profilers = {
        p: len(env.cluster.history(PODS, n, p)) for p in env.cluster.names(PODS, n) if "-profiler-" in p
    }
    assert profilers, "the model was profiled in a profiler Pod"
    env.operator.kill()
    env.operator.start()
    env.kubectl.patch(CRD, n, "kept", {"spec": {"replan": {"gainThreshold": 0.2}}})
    wait_for(
        lambda: (
            (o := env.deployment(n, "kept")) is not None
            and o["status"].get("observedGeneration") == o["metadata"]["generation"] == 2
            and o["status"].get("phase") == "Serving"
        ),
        120,
        "the re-planned spec to serve",
    )
    again = {p: len(env.cluster.history(PODS, n, p)) for p in env.cluster.names(PODS, n) if "-profiler-" in p}
    assert again == profilers, "the restarted operator profiled the model again"


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
