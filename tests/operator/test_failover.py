"""Failover in the emulated cluster: real kopf, real agents, real Prometheus, a client loop.

Each test runs a closed loop of requests through the entry Service (``amp4ec.client``, which
retries and ejects) while something dies: a shard process (SIGKILL), a whole node (its shards
killed, then its Node deleted), a dead node whose Node still says Ready (its metrics go stale),
a shard that crash-loops, a replica's node (the survivors serve, Ready stays True), and a
capacity-driven re-plan. The
deployment must serve again, the status must name the node meanwhile, and no request may be
lost. Times are printed (``-s``) for docs/operator.md.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.operator.cluster import EVENTS, NODES, PODS
from tests.operator.conftest import Env, Namespace, _node, restore_capacity, wait_for
from tests.operator.test_e2e import LATENCY, entry_port, owned, wait_serving

pytestmark = pytest.mark.slow

DEADLINE_S = 30.0
"""Each request's deadline, retries and waiting for a pipeline included."""


@dataclass
class Loop:
    """A closed loop of requests through one entry, in a thread of its own."""

    port: int
    tls: list[str]
    """The deployment's client credentials (``--ca X --cert Y --key Z``, ``Env.client_tls``)."""
    answered: list[float] = field(default_factory=list)
    """Monotonic time of each answer."""
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    async def _run(self) -> None:
        from amp4ec import pki
        from amp4ec.client import Client, Endpoint
        from amp4ec.wire.transport import TransportSecurity

        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        security = TransportSecurity.from_files(self.tls[1], self.tls[3], self.tls[5])  # --ca, --cert, --key
        entry = Endpoint(f"127.0.0.1:{self.port}", identity=pki.entry_identity_for_client(security.identity))
        async with Client([entry], security) as client:
            while not self.stop.is_set():
                try:
                    await client.infer([x], deadline_s=DEADLINE_S)
                    self.answered.append(time.monotonic())
                    self.started.set()
                except Exception as exc:  # counted, the loop goes on (a lost request)
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.02)  # pacing, not synchronisation

    def answers_after(self, t: float) -> int:
        return sum(a > t for a in self.answered)

    def gap_around(self, t: float) -> float:
        """Seconds from the last answer before ``t`` to the first after it."""
        before = max((a for a in self.answered if a <= t), default=t)
        after = min((a for a in self.answered if a > t), default=float("inf"))
        return after - before


@contextmanager
def client_loop(env: Env, namespace: str, name: str) -> Iterator[Loop]:
    loop = Loop(entry_port(env, namespace, name), env.client_tls(namespace, name))
    thread = threading.Thread(target=lambda: asyncio.run(loop._run()), daemon=True)
    thread.start()
    try:
        assert loop.started.wait(30), "the client loop got no first answer"
        yield loop
    finally:
        loop.stop.set()
        thread.join(DEADLINE_S + 10)


def lost(loop: Loop) -> str:
    return f"lost {len(loop.failed)} of {len(loop.answered) + len(loop.failed)}"


def shard_of(env: Env, namespace: str, name: str) -> dict[str, Any]:
    (pod,) = owned(env, namespace, PODS, name)
    return pod


def degraded_naming(env: Env, namespace: str, name: str, node: str, *reasons: str) -> dict[str, Any] | None:
    c = env.condition(namespace, name, "Degraded")
    ok = c and c["status"] == "True" and node in c["message"] and (not reasons or c["reason"] in reasons)
    return c if ok else None


def events(env: Env, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Events about the InferenceDeployment, oldest first."""
    about = [e for e in env.kubectl.list(EVENTS, namespace) if e["involvedObject"]["name"] == name]
    return sorted(about, key=lambda e: e["firstTimestamp"])


def serving_without(env: Env, namespace: str, name: str, node: str) -> dict[str, Any] | None:
    status = (env.deployment(namespace, name) or {}).get("status") or {}
    ready = env.condition(namespace, name, "Ready") or {}
    stages = (status.get("plan") or {}).get("stages") or ()
    ok = (
        status.get("phase") == "Serving"
        and ready.get("status") == "True"
        and stages
        and all(s["node"] != node for s in stages)
        and not status.get("rollout")
    )
    return status if ok else None


def test_a_killed_shard_process_is_restarted_and_no_request_is_lost(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    wait_serving(env, n, "lat")
    pod = shard_of(env, n, "lat")
    node = pod["spec"]["nodeSelector"]["kubernetes.io/hostname"]
    with client_loop(env, n, "lat") as loop:
        killed_at = time.monotonic()
        env.cluster.kill(n, pod["metadata"]["name"])
        seen = wait_for(
            lambda: degraded_naming(env, n, "lat", node), 30, f"Degraded naming {node}", every=0.1
        )
        wait_for(lambda: env.condition(n, "lat", "Degraded")["status"] == "False", 60, "Degraded=False")
        wait_serving(env, n, "lat")
        wait_for(
            lambda: loop.answers_after(time.monotonic()) or loop.answers_after(killed_at) > 100, 60, "answers"
        )
    print(
        f"\nkill -9 of the shard: {seen['reason']}: {seen['message']}; answers resumed after "
        f"{loop.gap_around(killed_at):.2f} s; {lost(loop)}"
    )
    assert not loop.failed, loop.failed[:3]
    (again,) = owned(env, n, PODS, "lat")
    assert again["metadata"]["uid"] == pod["metadata"]["uid"], "restarted in place, not re-created"
    assert again["status"]["containerStatuses"][0]["restartCount"] >= 1


def test_a_lost_node_is_replanned_around_at_once_and_no_request_is_lost(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    wait_serving(env, n, "lat")
    node = shard_of(env, n, "lat")["spec"]["nodeSelector"]["kubernetes.io/hostname"]
    saved = env.kubectl.get(NODES, None, node)
    try:
        with client_loop(env, n, "lat") as loop:
            gone_at = time.monotonic()
            env.cluster.power_off(node)  # its shard dies; nothing restarts there
            env.kubectl.delete(NODES, None, node)
            seen = wait_for(
                lambda: degraded_naming(env, n, "lat", node, "NodeDeleted"),
                30,
                f"Degraded naming {node}",
                every=0.1,
            )
            wait_for(lambda: serving_without(env, n, "lat", node), 60, f"serving without {node}", every=0.1)
            serving_s = time.monotonic() - gone_at
            wait_for(lambda: loop.answers_after(gone_at) > 100, 60, "answers on the survivors")
        print(
            f"\nnode {node} lost: {seen['message']}; Serving again after {serving_s:.2f} s, "
            "answers resumed after "
            f"{loop.gap_around(gone_at):.2f} s; {lost(loop)}"
        )
        assert not loop.failed, loop.failed[:3]
        assert serving_s < 10, serving_s
    finally:
        if env.kubectl.get(NODES, None, node) is None:
            env.kubectl.create(NODES, _node(saved["metadata"]["name"]))
        env.cluster.power_on(node)


def test_a_crash_looping_shard_moves_to_another_node_and_no_request_is_lost(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    wait_serving(env, n, "lat")
    pod = shard_of(env, n, "lat")
    name = pod["metadata"]["name"]
    node = pod["spec"]["nodeSelector"]["kubernetes.io/hostname"]

    def restarted_and_running() -> bool:
        status = (env.kubectl.get(PODS, n, name) or {}).get("status") or {}
        (cs,) = status.get("containerStatuses") or [{}]
        return cs.get("restartCount", 0) >= 1 and "running" in (cs.get("state") or {})

    with client_loop(env, n, "lat") as loop:
        first = time.monotonic()
        env.cluster.kill(n, name)
        wait_for(restarted_and_running, 30, "the first restart", every=0.1)
        env.cluster.kill(n, name)  # again: the kubelet backs off (CrashLoopBackOff)
        seen = wait_for(
            lambda: degraded_naming(env, n, "lat", node, "ShardCrashLooping"),
            30,
            "Degraded=ShardCrashLooping",
        )
        wait_for(lambda: serving_without(env, n, "lat", node), 60, f"serving without {node}", every=0.1)
        serving_s = time.monotonic() - first
        wait_for(lambda: loop.answers_after(first) > 100, 60, "answers on another node")
    print(
        f"\ncrash loop on {node}: {seen['message']}; "
        f"Serving elsewhere {serving_s:.2f} s after the first crash; "
        f"{lost(loop)}"
    )
    assert not loop.failed, loop.failed[:3]


def test_a_capacity_replan_drains_the_old_shards_and_loses_no_request(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    before = wait_serving(env, n, "lat")["status"]["plan"]
    slowed = before["stages"][0]["node"]
    try:
        with client_loop(env, n, "lat") as loop:
            env.monitors[slowed].set_capacity(workload_ms=1000.0)
            wait_for(lambda: serving_without(env, n, "lat", slowed), 90, "the re-plan", every=0.2)
            switched = time.monotonic()
            wait_for(
                lambda: (
                    not any(
                        p["metadata"]["labels"]["amp4ec.io/plan"] == before["id"]
                        for p in owned(env, n, PODS, "lat")
                    )
                ),
                60,
                "the old shards to go",
            )
            wait_for(
                lambda: loop.answers_after(time.monotonic() - 1) > 0 and loop.answers_after(switched) > 20,
                60,
                "answers",
            )
    finally:
        restore_capacity(env, slowed)
    print(f"\ncapacity re-plan: {lost(loop)}")
    assert not loop.failed, loop.failed[:3]


def test_a_dead_node_that_still_says_ready_is_lost_once_its_metrics_go_stale(ns: Namespace) -> None:
    env, n = ns.env, ns.name
    ns.create("lat", LATENCY)
    wait_serving(env, n, "lat")
    node = shard_of(env, n, "lat")["spec"]["nodeSelector"]["kubernetes.io/hostname"]
    monitor = env.monitors[node].proc
    assert env.kubectl.get(NODES, None, node) is not None
    try:
        with client_loop(env, n, "lat") as loop:
            gone_at = time.monotonic()
            env.cluster.power_off(node, kubelet_alive=True)  # its shard dies; the Node stays Ready
            monitor.send_signal(signal.SIGSTOP)  # and its metrics stop (stale after 10 s here)
            early = wait_for(lambda: degraded_naming(env, n, "lat", node), 30, f"Degraded naming {node}")
            wait_for(lambda: serving_without(env, n, "lat", node), 60, f"serving without {node}", every=0.1)
            serving_s = time.monotonic() - gone_at
            wait_for(lambda: loop.answers_after(gone_at) > 100, 60, "answers on the survivors")
        # The re-plan's cause stays on record (an Event) after Degraded cleared.
        (seen,) = [e for e in events(env, n, "lat") if e["reason"] == "NodeLost" and node in e["message"]]
        assert seen["type"] == "Warning", seen
        print(
            f"\nnode {node} dead, Node Ready: first {early['reason']}: {early['message']}; "
            f"then {seen['message']}; "
            f"Serving again after {serving_s:.2f} s (metrics stale after 10 s); {lost(loop)}"
        )
        conditions = ((env.kubectl.get(NODES, None, node) or {}).get("status") or {}).get("conditions") or []
        assert all(c["status"] == "True" for c in conditions if c["type"] == "Ready"), "the Node stayed Ready"
        assert not loop.failed, loop.failed[:3]
    finally:
        monitor.send_signal(signal.SIGCONT)
        env.cluster.power_on(node)


def test_with_replicas_the_survivors_serve_and_ready_stays_true_while_a_node_is_replaced(
    ns: Namespace,
) -> None:
    env, n = ns.env, ns.name
    ns.create("rep", {"model": LATENCY["model"], "strategy": "replicate", "replan": LATENCY["replan"]})
    stages = wait_serving(env, n, "rep")["status"]["plan"]["stages"]
    assert len({s["pipeline"] for s in stages}) >= 2, stages
    node = stages[0]["node"]
    saved = env.kubectl.get(NODES, None, node)
    readiness: list[str] = []
    try:
        with client_loop(env, n, "rep") as loop:
            gone_at = time.monotonic()
            env.cluster.power_off(node)
            env.kubectl.delete(NODES, None, node)

            def replaced() -> dict[str, Any] | None:
                readiness.append((env.condition(n, "rep", "Ready") or {}).get("status", "?"))
                return serving_without(env, n, "rep", node)

            wait_for(replaced, 60, f"serving without {node}", every=0.1)
            wait_for(lambda: loop.answers_after(gone_at) > 100, 60, "answers on the survivors")
        print(f"\nreplicas, node {node} lost: Ready {sorted(set(readiness))} meanwhile; {lost(loop)}")
        assert set(readiness) == {"True"}, "Ready turned False although survivors served"
        assert not loop.failed, loop.failed[:3]
    finally:
        if env.kubectl.get(NODES, None, node) is None:
            env.kubectl.create(NODES, _node(saved["metadata"]["name"]))
        env.cluster.power_on(node)
