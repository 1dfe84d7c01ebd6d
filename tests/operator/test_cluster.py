"""The test cluster itself (tests/operator/cluster.py): the emulator's cost per request and the
kubelet stand-in's restarts and Pod status, against small local processes (no torch, no kopf)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from kmock._internal import dsl

from tests.operator.cluster import NODES, PODS, SERVICES, FakeCluster, Kubectl, environ
from tests.operator.conftest import wait_for

HEALTH_SERVER = """
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(2))
servicer = health.HealthServicer()
servicer.set("amp4ec.wire.v1.Shard", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
port_file = sys.argv[sys.argv.index("--port-file") + 1]
with open(port_file + ".tmp", "w") as f:
    f.write(str(port))
import os; os.replace(port_file + ".tmp", port_file)
server.wait_for_termination()
"""
"""A container that serves gRPC health (SERVING) on the port the kubelet asks for, like a shard."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeCluster, Kubectl]]:
    with FakeCluster(tmp_path, environ(), backoff_initial_s=2.0, backoff_max_s=4.0) as c:
        kubectl = Kubectl(c.url)
        kubectl.create(NODES, node("n0", cpu="1", memory="1Gi"))
        yield c, kubectl


def node(name: str, cpu: str, memory: str) -> dict[str, Any]:
    allocatable = {"cpu": cpu, "memory": memory}
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": allocatable},
    }


def pod(
    name: str, script: str, restart_policy: str = "Always", requests: dict[str, str] | None = None
) -> dict[str, Any]:
    resources = {"requests": requests} if requests else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "labels": {"app": name}},
        "spec": {
            "restartPolicy": restart_policy,
            "containers": [
                {
                    "name": "main",
                    "command": ["python", "-c", script],
                    "args": ["--port", "50051"],  # the kubelet rewrites it: --port 0 --port-file F
                    "readinessProbe": {"grpc": {"port": 50051, "service": "amp4ec.wire.v1.Shard"}},
                    "resources": resources,
                }
            ],
        },
    }


def container(kubectl: Kubectl, name: str) -> dict[str, Any]:
    status = (kubectl.get(PODS, "ns", name) or {}).get("status") or {}
    return (status.get("containerStatuses") or [{}])[0]


def test_a_request_costs_the_same_however_many_came_before(
    cluster: tuple[FakeCluster, Kubectl], monkeypatch: pytest.MonkeyPatch
) -> None:
    """KMock matches a request to a reaction by replaying every request served so far through the
    reaction's filters; the emulator must judge the request alone, so replaying is forbidden here."""
    _, kubectl = cluster

    def replay(self: dsl.Root) -> Iterator[Any]:
        raise AssertionError("the emulator replayed the requests it has served")

    monkeypatch.setattr(dsl.Root, "__iter__", replay)
    kubectl.create(NODES, {"metadata": {"name": "n1", "labels": {"a": "b"}}})
    for i in range(30):
        kubectl.create(SERVICES, {"metadata": {"name": f"s{i}", "namespace": "ns", "labels": {"i": str(i)}}})
        assert kubectl.get(SERVICES, "ns", f"s{i}")["metadata"]["name"] == f"s{i}"
        kubectl.patch(SERVICES, "ns", f"s{i}", {"spec": {"selector": {"app": "x"}}})
    assert [s["metadata"]["name"] for s in kubectl.list(SERVICES, "ns", "i=7")] == ["s7"]
    assert kubectl.get(SERVICES, "ns", "missing") is None  # 404, through the same matching
    assert kubectl.delete(SERVICES, "ns", "s0") is not None
    assert kubectl.get(SERVICES, "ns", "s0") is None
    assert "v1" in kubectl._call("GET", "/api")["versions"]  # discovery, a lower-priority reaction
    assert {r["name"] for r in kubectl._call("GET", "/api/v1")["resources"]} >= {"pods", "services"}


def test_a_killed_container_restarts_with_back_off_and_turns_ready_on_its_new_port(
    cluster: tuple[FakeCluster, Kubectl],
) -> None:
    c, kubectl = cluster
    kubectl.create(PODS, pod("p", HEALTH_SERVER))
    kubectl.create(
        SERVICES, {"metadata": {"name": "svc", "namespace": "ns"}, "spec": {"selector": {"app": "p"}}}
    )
    assert c.kubelet is not None

    def ready_run(restarts: int) -> int | None:
        status = container(kubectl, "p")
        ok = status.get("ready") and status.get("restartCount") == restarts and "running" in status["state"]
        return c.routed_port("ns", "svc") if ok else None

    wait_for(lambda: ready_run(0), 30, "the container to serve")
    first = c.kubelet.procs["ns", "p"]
    old = (first.popen.pid, first.port)  # type: ignore[union-attr]
    os.kill(old[0], signal.SIGKILL)
    # The first crash restarts at once; the new run writes a new port, which the probe must read.
    wait_for(lambda: ready_run(1), 30, "the restarted container to turn Ready")
    status = container(kubectl, "p")
    assert status["lastState"]["terminated"]["exitCode"] == -signal.SIGKILL
    assert (first.popen.pid, first.port) != old  # type: ignore[union-attr]
    phase = (kubectl.get(PODS, "ns", "p") or {})["status"]["phase"]
    assert phase == "Running"
    # The second crash waits out the back-off: CrashLoopBackOff, not Ready, then a third run.
    os.kill(first.popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(lambda: ready_run(2), 30, "the container after its back-off")
    versions = [v["status"] for v in c.history(PODS, "ns", "p") if v]
    states = [v["containerStatuses"][0] for v in versions if "containerStatuses" in v]
    waiting = [s for s in states if s["restartCount"] == 1 and "waiting" in s["state"]]
    assert waiting and all(s["state"]["waiting"]["reason"] == "CrashLoopBackOff" for s in waiting)
    assert not any(s["ready"] for s in waiting)
    second = container(kubectl, "p")
    # The third run started a back-off (2 s) after the second ended; timestamps have 1 s resolution.
    pause = datetime.fromisoformat(second["state"]["running"]["startedAt"]) - datetime.fromisoformat(
        second["lastState"]["terminated"]["finishedAt"]
    )
    assert pause.total_seconds() >= 1, second


@pytest.mark.parametrize(("policy", "code", "phase"), [("Never", 3, "Failed"), ("OnFailure", 0, "Succeeded")])
def test_a_container_that_must_not_restart_ends_the_pod(
    cluster: tuple[FakeCluster, Kubectl], policy: str, code: int, phase: str
) -> None:
    _, kubectl = cluster
    kubectl.create(PODS, pod("once", f"raise SystemExit({code})", restart_policy=policy))
    wait_for(
        lambda: (kubectl.get(PODS, "ns", "once") or {})["status"]["phase"] == phase, 30, f"phase {phase}"
    )
    status = container(kubectl, "once")
    assert status["state"]["terminated"]["exitCode"] == code
    assert status["restartCount"] == 0 and not status["ready"]


def scheduled(kubectl: Kubectl, name: str) -> dict[str, Any]:
    status = (kubectl.get(PODS, "ns", name) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or () if c["type"] == "PodScheduled"), {})


def test_a_pod_that_does_not_fit_stays_pending_with_the_schedulers_reason_until_room_is_made(
    cluster: tuple[FakeCluster, Kubectl],
) -> None:
    """Requests count against the node's allocatable, as kube-scheduler counts them: a Pod asking
    more than is left is never bound nor started, and says why, until the Pod in its way goes."""
    c, kubectl = cluster
    kubectl.create(NODES, node("n1", cpu="4", memory="64Mi"))  # room for cpu, none for memory
    first = pod("first", HEALTH_SERVER, requests={"cpu": "600m", "memory": "100Mi"})
    first["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "n0"}
    kubectl.create(PODS, first)
    wait_for(lambda: container(kubectl, "first").get("ready"), 30, "the first Pod to serve")
    assert (kubectl.get(PODS, "ns", "first") or {})["spec"]["nodeName"] == "n0"
    kubectl.create(PODS, pod("second", HEALTH_SERVER, requests={"cpu": "500m", "memory": "100Mi"}))
    why = wait_for(
        lambda: (c := scheduled(kubectl, "second")).get("reason") == "Unschedulable" and c,
        30,
        "Unschedulable",
    )
    assert why["status"] == "False"
    assert why["message"] == "0/2 nodes are available: 1 Insufficient cpu, 1 Insufficient memory.", why
    second = kubectl.get(PODS, "ns", "second") or {}
    assert second["status"]["phase"] == "Pending" and not second["spec"].get("nodeName")
    assert c.pod_processes("ns") == [("ns", "first")]  # never started
    kubectl.delete(PODS, "ns", "first")
    wait_for(lambda: container(kubectl, "second").get("ready"), 30, "the second Pod to serve after the first")
    assert (kubectl.get(PODS, "ns", "second") or {})["spec"]["nodeName"] == "n0"
    assert scheduled(kubectl, "second")["status"] == "True"
