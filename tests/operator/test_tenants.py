"""Many deployments on three shared nodes (real kopf, real agents, real Prometheus, the scheduling
kubelet of cluster.py): no node overcommitted, each deployment Serving or waiting with a reason,
and a high-priority newcomer that makes lower ones re-plan (make before break) without losing a
request. The shared environment is conftest.py's ``env``; this test's namespace is emptied after it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from tests.operator.cluster import CRD, NODES, PODS, pod_requests, quantity
from tests.operator.conftest import NODE_NAMES, Env, Namespace, wait_for
from tests.operator.test_e2e import entry_port

pytestmark = pytest.mark.slow

SMALL = [
    *[{"model": {"name": "tests.model_zoo:residual_net", "seed": 0}}] * 6,
    *[{"model": {"name": "mobilenet_v2", "seed": 0}, "inputShape": [1, 3, 32, 32]}] * 2,
    *[{"model": {"name": "resnet18", "seed": 0}, "inputShape": [1, 3, 32, 32]}] * 2,
]
"""Ten deployments of mixed small models (tiny inputs: the test is about placement). One seed per
model: deployments of the same model share one profile (one profiler Pod per model, not ten
started at once on the shared VM); placement is per deployment all the same."""
COMMON = {"objective": "latency", "maxStages": 1, "nodeSelector": {"amp4ec.io/edge": "true"}}
WAITING = {"InsufficientCapacity", "Unschedulable", "PlanInfeasible"}


def state(env: Env, namespace: str, name: str) -> str | None:
    """ "serving", or "waiting: <reason>: <message>" when the status says why not, else None."""
    status = (env.deployment(namespace, name) or {}).get("status") or {}
    ready = env.condition(namespace, name, "Ready") or {}
    if status.get("phase") == "Serving" and ready.get("status") == "True" and not status.get("rollout"):
        return "serving"
    for kind in ("Planned", "ShardsReady"):
        c = env.condition(namespace, name, kind) or {}
        if c.get("status") == "False" and c.get("reason") in WAITING and c.get("message"):
            return f"waiting: {c['reason']}: {c['message']}"
    return None


def held_per_node(env: Env) -> dict[str, dict[str, float]]:
    """Requests of the Pods bound to each node (all namespaces), as the scheduler counts them."""
    out: dict[str, dict[str, float]] = {n: {"cpu": 0.0, "memory": 0.0} for n in NODE_NAMES}
    for pod in env.kubectl.list(PODS):
        node = pod["spec"].get("nodeName")
        if node in out and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            for k, v in pod_requests(pod).items():
                out[node][k] += v
    return out


def assert_not_overcommitted(env: Env) -> dict[str, dict[str, float]]:
    held = held_per_node(env)
    for node, used in held.items():
        allocatable = env.kubectl.get(NODES, None, node)["status"]["allocatable"]
        for k in ("cpu", "memory"):
            assert used[k] <= quantity(allocatable[k]) + 1e-6, f"{node} overcommitted: {used}"
    return held


@contextmanager
def traffic(env: Env, namespace: str, names: list[str]) -> Iterator[dict[str, list[str]]]:
    """One closed loop per deployment (paced, 5 requests/s) through its entry Service, all on one
    thread; yields name → failures (a lost request is one that failed, retries included)."""
    from amp4ec import pki
    from amp4ec.client import Client, Endpoint
    from amp4ec.wire.transport import TransportSecurity

    failures: dict[str, list[str]] = {n: [] for n in names}
    answered: dict[str, int] = dict.fromkeys(names, 0)
    stop = threading.Event()
    shapes = {
        n: (env.deployment(namespace, n) or {})["spec"].get("inputShape") or [1, 3, 16, 16] for n in names
    }
    targets = {n: (entry_port(env, namespace, n), env.client_tls(namespace, n)) for n in names}

    async def loop(name: str) -> None:
        port, tls = targets[name]
        security = TransportSecurity.from_files(tls[1], tls[3], tls[5])
        entry = Endpoint(f"127.0.0.1:{port}", identity=pki.entry_identity_for_client(security.identity))
        x = torch.randn(*shapes[name], generator=torch.Generator().manual_seed(1))
        async with Client([entry], security) as client:
            while not stop.is_set():
                try:
                    await client.infer([x], deadline_s=30.0)
                    answered[name] += 1
                except Exception as exc:  # counted: a lost request
                    failures[name].append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)  # pacing, not synchronisation

    async def main() -> None:
        await asyncio.gather(*(loop(n) for n in names))

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: all(answered.values()), 60, "a first answer from every deployment")
        yield failures
        before = dict(answered)
        wait_for(lambda: all(answered[n] > before[n] + 3 for n in names), 60, "answers after the re-plans")
    finally:
        stop.set()
        thread.join(40)


def history_has(
    env: Env, namespace: str, name: str, kind: str, reason: str, *words: str
) -> dict[str, Any] | None:
    """A condition of ``kind`` with ``reason`` (and ``words`` in its message) in any version of the
    deployment's status since it was created."""
    for version in env.cluster.history(CRD, namespace, name):
        for c in ((version or {}).get("status") or {}).get("conditions") or ():
            if c["type"] == kind and c["reason"] == reason and all(w in c["message"] for w in words):
                return c
    return None


@pytest.mark.timeout(1200)  # eleven deployments' agents start on a shared 2-core VM
def test_ten_deployments_share_three_nodes_and_a_higher_priority_one_makes_room(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    names = [f"t{i}" for i in range(len(SMALL))]
    for name, spec in zip(names, SMALL, strict=True):
        ns.create(name, {**spec, **COMMON})
    try:
        states = wait_for(
            lambda: (s := {x: state(env, n, x) for x in names}) and all(s.values()) and s,
            420,
            "every deployment Serving or waiting with a reason",
            every=1.0,
        )
    except AssertionError:
        print(env.logs())
        raise
    print("\n" + "\n".join(f"{x}: {s}" for x, s in states.items()))
    held = assert_not_overcommitted(env)
    serving = [x for x, s in states.items() if s == "serving"]
    assert len(serving) >= 8, states  # 10 fair shares of 0.1 core fit 3 cores; memory may bind
    for x in serving:
        (stage,) = (env.deployment(n, x) or {})["status"]["plan"]["stages"]
        assert 0.1 <= stage["cpu"] <= 1.0, stage

    # The node where lower-priority deployments hold the most: a priority-30 deployment wants
    # it alone (fair share 31/41 of its core) and more than is free there, so some must move.
    busiest = max(NODE_NAMES, key=lambda node: held[node]["cpu"])
    there = [
        x for x in serving if (env.deployment(n, x) or {})["status"]["plan"]["stages"][0]["node"] == busiest
    ]
    assert held[busiest]["cpu"] > 1.0 - 31 / 41, held
    high = {
        "model": {"name": "tests.model_zoo:residual_net", "seed": 0},  # profiled already
        "objective": "latency",
        "maxStages": 1,
        "priority": 30,
        "nodeSelector": {"kubernetes.io/hostname": busiest},
    }
    with traffic(env, n, there) as failures:
        ns.create("high", high)
        try:
            wait_for(lambda: state(env, n, "high") == "serving", 180, "the high-priority deployment to serve")
            wait_for(
                lambda: all(state(env, n, x) == "serving" for x in there),
                180,
                "the lower ones to serve again",
            )
        except AssertionError:
            print(env.logs())
            raise
    assert not any(failures.values()), {k: v[:2] for k, v in failures.items() if v}
    (stage,) = (env.deployment(n, "high") or {})["status"]["plan"]["stages"]
    assert stage["node"] == busiest and stage["cpu"] == pytest.approx(31 / 41, abs=1e-3), stage
    # While the lower ones moved, its shard waited, and its status said where and why.
    pending = history_has(env, n, "high", "ShardsReady", "Unschedulable", f"on {busiest}", "Insufficient cpu")
    assert pending is not None and "stage 0 (pipeline 0)" in pending["message"], pending
    moved = [x for x in there if history_has(env, n, x, "Degraded", "Preempted", "high")]
    assert moved, "no lower-priority deployment was asked to make room"
    for x in moved:
        stages = (env.deployment(n, x) or {})["status"]["plan"]["stages"]
        assert all(s["node"] != busiest for s in stages), (x, stages)
    assert_not_overcommitted(env)
