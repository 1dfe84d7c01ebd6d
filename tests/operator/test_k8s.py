"""The Kubernetes adapter over kubernetes_asyncio, against a real HTTP(S) API server stand-in.

``Api`` is a tiny aiohttp server that answers what the test asks for and accepts only the
bearer tokens the test says are current, so a credential rotation is a change of that set. The
credentials come the ways a cluster gives them: a kubeconfig whose exec plugin (a small script,
as EKS/GKE/OIDC helpers are) prints a new token each run, and a service account directory whose
token file the test rewrites, as the kubelet does, over TLS with the mounted ``ca.crt``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import subprocess
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web
from kopf._core.intents.causes import Activity
from kubernetes_asyncio.config import incluster_config

from amp4ec.operator.certs import CA_SECRET
from amp4ec.operator.k8s import Conflict, Credentials, Kube, KubeError, KubeUnavailable, NoCredentials, login
from tests.operator.cluster import CRD, ROOT, SECRETS, FakeCluster, Kubectl, environ
from tests.operator.conftest import deployment_resource, wait_for
from tests.operator.store import certificate

REFUSALS = {"missing": 404, "exists": 409, "invalid": 422, "broken": 500, "busy": 429}
"""Object name → the status the server answers for it (with a Status object's message)."""

PLUGIN = """\
import datetime, json, sys
from pathlib import Path

counter, offset_s = Path(sys.argv[1]), float(sys.argv[2])
n = int(counter.read_text() or 0) + 1 if counter.exists() else 1
counter.write_text(str(n))
end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_s)
status = {"token": f"exec-{n}", "expirationTimestamp": end.strftime("%Y-%m-%dT%H:%M:%SZ")}
kind = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential"}
print(json.dumps({**kind, "status": status}))
"""
"""An exec credential plugin: a new token at each run (exec-1, exec-2, …), valid for ``offset_s``."""


@dataclass
class Api:
    """What the server saw: (method, path with query, Authorization, Content-Type, body, status)."""

    accepted: set[str] = field(default_factory=set)
    seen: list[tuple[str, str, str, str, Any, int]] = field(default_factory=list)

    def tokens(self) -> list[tuple[str, int]]:
        return [(auth.removeprefix("Bearer "), status) for _, _, auth, _, _, status in self.seen]

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        body = await request.json() if request.can_read_body else None
        status, answer = self._answer(request, auth, body)
        self.seen.append(
            (request.method, request.path_qs, auth, request.headers.get("Content-Type", ""), body, status)
        )
        if answer is None:
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    def _answer(self, request: web.Request, auth: str, body: Any) -> tuple[int, Any]:
        if auth.removeprefix("Bearer ") not in self.accepted:
            return 401, {"kind": "Status", "message": "Unauthorized", "code": 401}
        name = request.path.rsplit("/", 1)[-1] if request.method != "POST" else body["metadata"]["name"]
        if name in REFUSALS:
            code = REFUSALS[name]
            return code, {"kind": "Status", "message": f"the server says {name}", "code": code}
        if request.method == "DELETE":
            return 200, None  # an empty body
        if request.method == "GET" and name == "pods":
            labelled = {"metadata": {"name": "a", "labels": {"app": "x", "tier": "y"}}}
            return 200, {"items": [labelled, {"metadata": {"name": "b", "labels": {"app": "x"}}}]}
        return 200, body or {"metadata": {"name": name}}


def _closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serving(api: Api, run: Callable[[str], Awaitable[Any]], tls: ssl.SSLContext | None = None) -> Any:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await run(str(port))
    finally:
        await runner.cleanup()


def _kubeconfig(tmp: Path, server: str, user: dict[str, Any]) -> Credentials:
    path = tmp / "kubeconfig.json"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "ctx",
            }
        )
    )
    return Credentials(environ={"KUBECONFIG": str(path)})


def _exec_user(tmp: Path, valid_s: float) -> dict[str, Any]:
    script = tmp / "plugin.py"
    script.write_text(PLUGIN)
    args = [str(script), str(tmp / "runs"), str(valid_s)]
    return {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "args": args}
    }


def test_http_failures_are_mapped_once(tmp_path: Path) -> None:
    api = Api(accepted={"static"})

    async def main(port: str) -> None:
        kube = Kube(_kubeconfig(tmp_path, f"http://127.0.0.1:{port}", {"token": "static"}))
        try:
            assert await kube.get("Pod", "ns", "missing") is None
            await kube.delete("Pod", "ns", "missing")  # already gone: not an error
            with pytest.raises(
                Conflict, match=r"^POST /api/v1/namespaces/ns/pods: 409 the server says exists$"
            ):
                await kube.create({"kind": "Pod", "metadata": {"name": "exists", "namespace": "ns"}})
            with pytest.raises(KubeError, match=r"422 the server says invalid") as invalid:
                await kube.patch("Pod", "ns", "invalid", {"spec": {}})
            assert not isinstance(invalid.value, KubeUnavailable | Conflict)
            for name in ("broken", "busy"):
                with pytest.raises(KubeUnavailable, match=f"the server says {name}"):
                    await kube.get("Pod", "ns", name)
            # What goes out: merge patches, a label selector, the status subresource.
            await kube.patch_status("InferenceDeployment", "ns", "demo", {"phase": "Serving", "reason": None})
            method, path, _, ctype, body, _ = api.seen[-1]
            assert (method, path, ctype) == (
                "PATCH",
                "/apis/amp4ec.io/v1alpha1/namespaces/ns/inferencedeployments/demo/status",
                "application/merge-patch+json",
            )
            assert body == {"status": {"phase": "Serving", "reason": None}}
            listed = await kube.list("Pod", "ns", {"app": "x", "tier": "y"})
            assert [o["metadata"]["name"] for o in listed] == ["a"]  # b lacks a label: filtered here too
            path, _, query = api.seen[-1][1].partition("?")
            assert (path, urllib.parse.parse_qs(query)) == (
                "/api/v1/namespaces/ns/pods",
                {"labelSelector": ["app=x,tier=y"]},
            )
            assert await kube.delete_all("Pod", [{"metadata": {"name": "a", "namespace": "ns"}}]) == 1
        finally:
            await kube.close()
        refused = Kube(_kubeconfig(tmp_path, f"http://127.0.0.1:{_closed_port()}", {"token": "static"}))
        try:
            with pytest.raises(KubeUnavailable, match=r"^GET /api/v1/nodes/n: ClientConnectorError"):
                await refused.get("Node", None, "n")
        finally:
            await refused.close()

    asyncio.run(_serving(api, main))


def test_a_401_runs_the_exec_plugin_again_and_retries_once(tmp_path: Path) -> None:
    api = Api(accepted={"exec-1"})

    async def main(port: str) -> None:
        credentials = _kubeconfig(tmp_path, f"http://127.0.0.1:{port}", _exec_user(tmp_path, 3600))
        kube = Kube(credentials)
        try:
            assert await kube.get("Pod", "ns", "a") == {"metadata": {"name": "a"}}
            assert await kube.get("Pod", "ns", "a") is not None  # the token is kept while valid
            api.accepted = {"exec-2"}  # the identity provider rotated it: exec-1 is refused
            assert await kube.get("Pod", "ns", "a") is not None
            assert api.tokens() == [("exec-1", 200), ("exec-1", 200), ("exec-1", 401), ("exec-2", 200)]
            # Concurrent requests refused together reload once, not once each.
            api.accepted = {"exec-3"}
            await asyncio.gather(*(kube.get("Pod", "ns", "a") for _ in range(3)))
            assert (tmp_path / "runs").read_text() == "3"
            # Revoked for good: one reload and one more try, then the refusal (no loop).
            api.accepted, api.seen = set(), []
            with pytest.raises(KubeError, match=r"^GET /api/v1/namespaces/ns/pods/a: 401 Unauthorized$"):
                await kube.get("Pod", "ns", "a")
            assert api.tokens() == [("exec-3", 401), ("exec-4", 401)]
            # kopf logs in the same way: the plugin's token and its end (kopf logs in again then).
            info = await login(credentials)
            assert (info.scheme, info.token, info.server) == ("Bearer", "exec-5", f"http://127.0.0.1:{port}")
            now = datetime.datetime.now(datetime.timezone.utc)
            assert info.expiration is not None
            assert datetime.timedelta(minutes=55) < info.expiration - now <= datetime.timedelta(hours=1)
        finally:
            await kube.close()

    asyncio.run(_serving(api, main))


def test_an_expired_exec_token_is_renewed_before_the_request(tmp_path: Path) -> None:
    api = Api(accepted={"exec-1", "exec-2", "exec-3"})

    async def main(port: str) -> None:
        # Each token the plugin prints has already expired: every request runs it again.
        kube = Kube(_kubeconfig(tmp_path, f"http://127.0.0.1:{port}", _exec_user(tmp_path, -60)))
        try:
            for _ in range(3):
                await kube.get("Pod", "ns", "a")
        finally:
            await kube.close()
        assert api.tokens() == [("exec-1", 200), ("exec-2", 200), ("exec-3", 200)]

    asyncio.run(_serving(api, main))


def test_a_failing_exec_plugin_is_unavailable_and_nothing_configured_is_no_credentials(
    tmp_path: Path,
) -> None:
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable}}
    user["exec"]["args"] = ["-c", "import sys; sys.exit('identity provider unreachable')"]
    kube = Kube(_kubeconfig(tmp_path, "http://127.0.0.1:1", user))

    async def main() -> None:
        try:
            with pytest.raises(KubeUnavailable, match=r"identity provider unreachable"):
                await kube.get("Pod", "ns", "a")
        finally:
            await kube.close()
        nothing = Credentials(environ={"KUBECONFIG": str(tmp_path / "absent")}, service_account=tmp_path)
        with pytest.raises(NoCredentials, match=r"^no Kubernetes credentials: .*no kubeconfig at .*absent$"):
            await nothing.load()

    asyncio.run(main())


def _in_cluster(tmp: Path, token: str) -> tuple[Path, ssl.SSLContext]:
    """A service account directory (token, ca.crt) and the API server's TLS context."""
    cert, key = certificate(tmp)
    account = tmp / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(cert.read_bytes())
    (account / "token").write_text(token)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return account, tls


def _rotate(account: Path, token: str) -> None:
    tmp = account / "token.tmp"  # the kubelet swaps the projected volume atomically
    tmp.write_text(token)
    tmp.replace(account / "token")


def test_in_cluster_a_rotated_token_file_is_read_again_after_a_401(tmp_path: Path) -> None:
    account, tls = _in_cluster(tmp_path, "sa-1")
    api = Api(accepted={"sa-1"})

    async def main(port: str) -> None:
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        credentials = Credentials(environ=env, service_account=account)
        kube = Kube(credentials)
        try:
            assert await kube.get("Pod", "ns", "a") is not None  # over TLS, trusting ca.crt
            _rotate(account, "sa-2")
            api.accepted = {"sa-2"}  # the old token is no longer valid
            assert await kube.get("Pod", "ns", "a") is not None
            info = await login(credentials)
        finally:
            await kube.close()
        assert api.tokens() == [("sa-1", 200), ("sa-1", 401), ("sa-2", 200)]
        assert (info.server, info.token, info.ca_path) == (
            f"https://127.0.0.1:{port}",
            "sa-2",
            str(account / "ca.crt"),
        )

    asyncio.run(_serving(api, main, tls))


def test_in_cluster_kubernetes_asyncio_rereads_the_token_file_when_its_period_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # kubernetes_asyncio re-reads the token file once a minute (client-go's period); with the
    # period at zero every request re-reads it, so a rotation is used at once with no 401.
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    account, tls = _in_cluster(tmp_path, "sa-1")
    api = Api(accepted={"sa-1", "sa-2"})

    async def main(port: str) -> None:
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        kube = Kube(Credentials(environ=env, service_account=account))
        try:
            await kube.get("Pod", "ns", "a")
            _rotate(account, "sa-2")
            await kube.get("Pod", "ns", "a")
        finally:
            await kube.close()

    asyncio.run(_serving(api, main, tls))
    assert api.tokens() == [("sa-1", 200), ("sa-2", 200)]


def test_kopf_logs_in_through_the_operator_s_handler(tmp_path: Path) -> None:
    """The operator registers exactly one login handler (kopf's own are then not used), and a
    missing kubeconfig is a permanent login failure with the one-line reason."""
    from amp4ec.operator import settings

    registry = kopf.get_default_registry()
    handlers = registry._activities.get_handlers(activity=Activity.AUTHENTICATION)
    assert [h.fn for h in handlers] == [settings.authenticate]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBECONFIG", str(tmp_path / "absent"))
        mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        with pytest.raises(kopf.PermanentError, match=r"^no Kubernetes credentials: "):
            asyncio.run(settings.authenticate())


def test_the_running_operator_and_kopf_log_in_again_after_the_token_rotates(tmp_path: Path) -> None:
    """The real ``kopf run`` against the emulated API server with authentication on, logged in
    through a kubeconfig exec plugin: after the identity provider rotates the token (every token
    the plugin printed so far refused), kopf's next call and the operator's own both get a 401,
    log in again through the plugin and go on."""
    runs = tmp_path / "runs"
    floor = [1]  # the oldest token number still valid

    def accept(token: str) -> bool:
        return token == "admin" or (token.startswith("exec-") and int(token[5:]) >= floor[0])

    with FakeCluster(tmp_path, environ()) as cluster:
        assert cluster.emulator is not None
        cluster.emulator.accept = accept
        kubectl = Kubectl(cluster.url, token="admin")
        credentials = _kubeconfig(tmp_path, cluster.url, _exec_user(tmp_path, 3600))
        env = environ(
            {
                "KUBECONFIG": str(credentials.environ["KUBECONFIG"]),  # type: ignore[index]
                "AMP4EC_PROMETHEUS_URL": f"http://127.0.0.1:{_closed_port()}",
                "AMP4EC_OPERATOR_METRICS_PORT": "0",
            }
        )
        log = tmp_path / "operator.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m",
                 "amp4ec.operator"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        logins = cluster.emulator.logins

        def seen(agent: str, status: int, path: str = "", least: int = 0) -> bool:
            return any(
                a.startswith(agent)
                and s == status
                and path in p
                and int(t.removeprefix("exec-") or 0) >= least
                for a, p, t, s in list(logins)
            )

        try:
            # Up: the operator's client made the CA Secret, kopf watches the deployments.
            wait_for(lambda: kubectl.get(SECRETS, "amp4ec-system", CA_SECRET), 60, "the operator's CA Secret")
            wait_for(lambda: seen("kopf/", 200, "inferencedeployments?watch=true"), 60, "kopf's watch")
            floor[0] = int(runs.read_text()) + 1  # rotated: every token printed so far is refused
            kubectl.create(CRD, deployment_resource("default", "demo", {"model": {"name": "mobilenet_v2"}}))
            least = floor[0]
            # kopf: its patch refused, the login handler runs the plugin again, the patch goes on.
            wait_for(
                lambda: seen("kopf/", 401) and seen("kopf/", 200, "/inferencedeployments/demo", least), 60
            )
            assert "amp4ec.io/finalizer" in kubectl.get(CRD, "default", "demo")["metadata"]["finalizers"]
            # The operator's own client (kubernetes_asyncio): refused, reloaded, retried.
            wait_for(
                lambda: seen("OpenAPI", 401) and seen("OpenAPI", 200, "/inferencedeployments/demo", least), 60
            )
            assert proc.poll() is None, log.read_text()[-3000:]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
