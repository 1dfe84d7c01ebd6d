"""What ``kubectl get idep`` shows when a prerequisite is missing, as README's Kubernetes section says.

One reconciliation with the real clients the operator uses (``Profiler`` and its Pod, ``Prometheus``
over HTTP) against what a cluster without the prerequisite offers: a profiler Pod that never
starts (its image not pullable), no Prometheus answering, a Prometheus that scrapes no monitor
(every query empty; what a cluster without monitors looks like too). The status it
writes is what the CRD's printer columns show; the README's table must say the same.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from amp4ec.operator.capacity import Prometheus
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.profiles import Profiler
from amp4ec.operator.reconcile import Deps, Target, reconcile
from amp4ec.wire.transport import TransportSecurity
from tests.deploy.test_rbac import RecordingKube
from tests.operator.cluster import ROOT
from tests.operator.test_hardening import Profiles

SPEC = {"model": {"name": "mobilenet_v2"}, "nodeSelector": {"amp4ec.io/edge": "true"}}


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _empty_prometheus(run: Callable[[str], Awaitable[Any]]) -> Any:
    """A Prometheus HTTP API that scrapes nothing: every instant query answers an empty vector."""

    async def query(_: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": []}})

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await run(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def _adopt(obj: dict[str, Any]) -> None:  # what kopf.adopt does: the operator checks it
    obj["metadata"]["ownerReferences"] = [
        {"kind": "InferenceDeployment", "name": "mobilenet-v2", "uid": "uid-1"}
    ]


def _status(missing: str) -> dict[str, Any]:
    kube = RecordingKube()
    kube.add_node("edge-a")
    closed = f"http://127.0.0.1:{_closed_port()}"

    async def run(prometheus_url: str) -> dict[str, Any]:
        profiler: Any = Profiles()  # profiled: the step under test comes after
        config = OperatorConfig(tls=False)
        if missing == "profiler":  # the real one: its Pod is created and never starts
            profiler = Profiler(kube, config, TransportSecurity.plaintext(), None)
        prometheus = Prometheus(prometheus_url, timeout_s=5)
        deps = Deps(kube=kube, prometheus=prometheus, profiler=profiler, config=config)
        t = Target("mobilenet-v2", "default", "uid-1", 1, SPEC, {})
        try:
            outcome = await reconcile(deps, t, trigger="create", adopt=_adopt)
        finally:
            await asyncio.gather(kube.close(), prometheus.close())
            if isinstance(profiler, Profiler):
                await profiler.close()
        assert outcome is not None and outcome.retry_s and not outcome.permanent, "retried, not failed"
        return outcome.status

    if missing == "scrape":
        return asyncio.run(_empty_prometheus(run))
    return asyncio.run(run(closed))


@pytest.mark.parametrize(
    ("missing", "reason", "message"),
    [
        ("profiler", "Profiling", "profiling mobilenet_v2: profiler Pod mobilenet-v2-profiler-"),
        ("prometheus", "CapacityUnavailable", "Prometheus"),
        ("scrape", "NoCapacity", "no node has fresh capacity metrics (edge-a: no capacity metrics)"),
    ],
)
def test_a_missing_prerequisite_is_a_reason_in_get_idep(missing: str, reason: str, message: str) -> None:
    status = _status(missing)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    planned = next(c for c in status["conditions"] if c["type"] == "Planned")
    # The printer columns: PHASE, READY, and with -o wide REASON (status.failureReason).
    assert (status["phase"], ready["status"], status["failureReason"]) == ("Planning", "False", reason)
    assert planned["reason"] == reason and message in planned["message"], planned
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Kubernetes") :]
    assert f"`{reason}`" in section, f"README's Kubernetes section does not name {reason}"
