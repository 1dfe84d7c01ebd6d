"""The chart's ClusterRole is exactly what the operator uses: every call it makes, nothing more.

The operator's own calls are derived, not listed: a reconciliation runs (create → shards
start → serving → a node leaves → re-plan → make-before-break → old plan deleted) against
``RecordingKube``, the real ``amp4ec.operator.k8s.Kube`` with only its HTTP transport
replaced by an in-memory API server that records (method, path). A static scan of
``amp4ec/operator`` checks that the scenario reached every ``kube.<method>(...)`` call site.

kopf's own calls (kopf 1.45, ``kopf run --standalone --all-namespaces``) are read from its
source and listed in ``KOPF_NEEDS`` with where each comes from.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import yaml

from amp4ec import pki
from amp4ec.operator import certs
from amp4ec.operator.capacity import Capacity
from amp4ec.operator.config import GROUP, PLURAL, OperatorConfig
from amp4ec.operator.k8s import Kube
from amp4ec.operator.profiles import ModelCosts, Profiler
from amp4ec.operator.reconcile import Deps, Target, reconcile
from amp4ec.planner.types import LayerProfile, NodeCapacity
from amp4ec.wire.transport import TransportSecurity
from tests.deploy.chart import ROOT, one, render

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

KOPF_NEEDS: dict[Permission, str] = {
    (GROUP, PLURAL, "list"): "kopf/_cogs/clients/fetching.py: the initial listing of every watch",
    (GROUP, PLURAL, "watch"): "kopf/_cogs/clients/watching.py: the watch stream, all namespaces",
    (GROUP, PLURAL, "patch"): "kopf/_cogs/clients/patching.py: finalizer and amp4ec.io/ progress annotations",
    (GROUP, f"{PLURAL}/status", "patch"): "kopf/_cogs/clients/patching.py: patch.status[...] via /status",
    ("", "events", "create"): "kopf/_cogs/clients/events.py: post_event (handler outcomes)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf/_core/reactor/observation.py",
    (
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "watch",
    ): "resource_observer (scanning not disabled)",
    (GROUP, PLURAL, "get"): "inferencedeployment._run: the latest status, re-read under the lock",
    ("", "pods", "list"): "kopf: the initial listing of the shard Pod watch (watch.py)",
    ("", "pods", "watch"): "kopf: @kopf.on.event on shard Pods (watch.py)",
    ("", "nodes", "list"): "kopf: the initial listing of the Node watch (watch.py)",
    ("", "nodes", "watch"): "kopf: @kopf.on.event on Nodes (watch.py)",
}
"""Not needed: namespaces (namespace_observer lists them only when not clusterwide) and
kopf.dev peering objects (standalone). Discovery (/api, /apis, /version) is allowed to every
authenticated user by the default ``system:discovery`` role."""

_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[a-z0-9.-]+)/v1(?:alpha\d+|beta\d+)?)/(?:namespaces/(?P<ns>[^/]+)/)?"
    r"(?P<plural>[a-z]+)(?:/(?P<name>[^/?]+))?(?:\?.*)?$"
)
_VERBS = {"POST": "create", "PATCH": "patch", "DELETE": "delete"}
_METHOD_VERBS = {
    "get": "get",
    "list": "list",
    "create": "create",
    "patch": "patch",
    "delete": "delete",
    "delete_all": "delete",
    "patch_status": "patch",
}
"""Kube method → the RBAC verb of the request it sends (amp4ec/operator/k8s.py)."""


class RecordingKube(Kube):
    """``Kube`` over an in-memory API server that records every request as a permission."""

    def __init__(self) -> None:
        info = SimpleNamespace(
            server="http://api.test", token=None, username=None, password=None, insecure=False
        )
        super().__init__(info)
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.used: set[Permission] = set()
        self.methods: set[tuple[str, str]] = set()  # (Kube method, kind) reached
        self.secrets_read: set[tuple[str | None, str]] = set()  # (namespace, name) of every Secret GET

    async def _request(self, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
        m = _PATH.match(path)
        assert m, f"unexpected API path {path}"
        plural, name, namespace = m.group("plural"), m.group("name"), m.group("ns")
        verb = ("get" if name else "list") if method == "GET" else _VERBS[method]
        self.used.add((m.group("group") or "", plural, verb))
        if plural == "secrets" and method == "GET":
            self.secrets_read.add((namespace, name or "*"))
        key = (plural, namespace, name or "")
        if method == "GET" and name:
            return self.objects.get(key)
        if method == "GET":
            return {
                "items": [
                    o for (p, ns, _), o in self.objects.items() if p == plural and ns in (namespace, None)
                ]
            }
        if method == "POST":
            meta = body["metadata"]
            self.objects[(plural, meta.get("namespace"), meta["name"])] = dict(body, status={})
            return body
        if method == "PATCH":
            _merge(self.objects[key], body)
            return self.objects[key]
        self.objects.pop(key, None)
        return {}

    def add_node(self, name: str) -> None:
        self.objects[("nodes", None, name)] = {
            "metadata": {"name": name, "labels": {"amp4ec.io/edge": "true"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }

    def start_pods(self) -> None:
        """The kubelet: every Pod (shards, a profiler) runs and is Ready."""
        for (plural, _, _), obj in self.objects.items():
            if plural == "pods":
                ready = [{"type": "Ready", "status": "True"}]
                obj["status"] = {"phase": "Running", "podIP": "10.0.0.9", "conditions": ready}


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


class Profiles(Profiler):
    """The real profiler (its Pod, Secret and NetworkPolicy); only the gRPC call is answered here."""

    async def _call(self, target: str, name: str, namespace: str, spec: Any) -> ModelCosts:
        blocks = tuple(LayerProfile(f"b{i}", 10**6, 10**5, 10**4, 5.0) for i in range(4))
        return ModelCosts(blocks=blocks, input_bytes=10**4, reference_ms=10.0)


class Capacities:
    async def capacity(self, nodes: list[str], reference_ms: float, max_age_s: float) -> Capacity:
        return Capacity(nodes={n: NodeCapacity(n, 1.0, 4 << 30, speed=1.0) for n in nodes})


def _operator_calls(config: OperatorConfig | None = None) -> set[Permission]:
    return _scenario(config).used


CERT_MANAGER = OperatorConfig(cert_issuer="ClusterIssuer/amp4ec-ca", tls_dir="/var/run/amp4ec/tls")
"""The operator as the chart runs it with tls.issuer.kind: cert-manager."""


def issue_certificates(kube: RecordingKube) -> int:
    """cert-manager's part: every Certificate not Ready yet becomes Ready (its Secret written)."""
    n = 0
    for (plural, _, _), obj in kube.objects.items():
        if plural == "certificates" and not (obj.get("status") or {}).get("conditions"):
            obj["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
            n += 1
    return n


def _scenario(config: OperatorConfig | None = None) -> RecordingKube:
    kube = RecordingKube()
    for node in ("edge-a", "edge-b"):
        kube.add_node(node)
    config = config or OperatorConfig()
    cert_manager = config.issuer() is not None
    deps = Deps(kube=kube, prometheus=Capacities(), profiler=None, config=config)  # type: ignore[arg-type]
    spec = {
        "model": {"name": "mobilenet_v2"},
        "strategy": "equal",
        "nodeSelector": {"amp4ec.io/edge": "true"},
    }
    status: dict[str, Any] = {}
    generation = [1]

    def adopt(obj: dict[str, Any]) -> None:  # what kopf.adopt does: the operator checks it
        obj["metadata"]["ownerReferences"] = [{"kind": "InferenceDeployment", "name": "demo", "uid": "uid-1"}]

    async def step(trigger: str) -> str:
        t = Target("demo", "default", "uid-1", generation[0], spec, dict(status))
        outcome = await reconcile(deps, t, trigger=trigger, adopt=adopt)
        assert outcome is not None
        status.update(outcome.status)
        return outcome.reason

    async def starting(trigger: str) -> None:
        """The first step of a new plan: its shards start (under cert-manager, once issued)."""
        if cert_manager:
            assert await step(trigger) == "CertificatesPending"
            assert issue_certificates(kube) > 0
        assert await step(trigger) == "ShardsStarting"

    async def scenario() -> None:
        if not cert_manager:
            # Start-up (settings.py): the CA Secret, created when missing, and the monitors' leaf.
            deps.ca = await certs.ensure_ca(kube, config.namespace)
            await certs.ensure_monitors(kube, deps.ca, config.namespace)
        deps.profiler = Profiles(kube, config, TransportSecurity.plaintext(), deps.ca)
        assert await step("create") == "Profiling"  # a profiler Pod in the deployment's namespace
        if cert_manager:
            assert issue_certificates(kube) == 1  # the profiler's own Certificate
        kube.start_pods()
        await starting("create")
        kube.start_pods()
        assert await step("create") == "Serving"
        first = status["plan"]["id"]
        # A node of the plan leaves and another joins: the next check re-plans, make before break.
        del kube.objects[("nodes", None, "edge-a")]
        kube.add_node("edge-c")
        deps.last_check.clear()
        if cert_manager:  # another issuer: every Certificate is asked for again (delete, create)
            deps.config = dataclasses.replace(config, cert_issuer="Issuer/other")
        else:
            deps.ca = pki.CertificateAuthority.create("replaced")  # every leaf is re-issued: a patch
        await starting("timer")
        kube.start_pods()
        deps.last_check.clear()
        assert await step("timer") == "Serving"
        assert status["plan"]["id"] != first
        # Weights from https storage: the NetworkPolicy's egress changes (patched), a new plan.
        https = "https://198.51.100.7/w.pt"
        spec["model"] = {"name": "mobilenet_v2", "storageUri": https, "sha256": "a" * 64}
        generation[0] = 2
        assert await step("update") == "Profiling"  # another model file: profiled again
        kube.start_pods()
        assert await step("update") == "ShardsStarting"
        kube.start_pods()
        assert await step("update") == "Serving"
        # Old entry Pods went first (draining); the handler's retry deletes the rest.
        assert await step("update") == "Serving"
        # Weights from an S3 store with credentials: the Pods name the Secret (secretKeyRef);
        # the operator never reads it (test_the_operator_reads_only_its_own_two_secrets).
        s3 = {"endpoint": "https://198.51.100.8:9000", "secretName": "minio-creds"}
        spec["model"] = {
            "name": "mobilenet_v2",
            "storageUri": "s3://models/w.pt",
            "sha256": "b" * 64,
            "s3": s3,
        }
        generation[0] = 3
        assert await step("update") == "Profiling"
        kube.start_pods()
        assert await step("update") == "ShardsStarting"
        kube.start_pods()
        assert await step("update") == "Serving"
        assert await step("update") == "Serving"
        await kube.close()

    asyncio.run(scenario())
    plans = {
        o["metadata"]["labels"].get("amp4ec.io/plan") for (p, _, _), o in kube.objects.items() if p == "pods"
    }
    assert plans == {status["plan"]["id"]}, "the old plan's Pods are gone"
    return kube


def _kube_call_sites() -> set[str]:
    """Kube methods the operator calls anywhere (``<...>.kube.<method>(...)``), by static scan."""
    methods = set()
    for path in sorted((ROOT / "amp4ec" / "operator").glob("*.py")):
        if path.name == "k8s.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "kube"
                and node.func.attr != "close"
            ):
                methods.add(node.func.attr)
    return methods


def _granted(objs: list[dict[str, Any]], kind: str = "ClusterRole") -> set[Permission]:
    role = one(objs, kind)
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_scenario_reaches_every_kube_call_site() -> None:
    sites = _kube_call_sites()
    assert sites, "no kube calls found: the scan is broken"
    unknown = sites - set(_METHOD_VERBS)
    assert not unknown, f"new Kube methods {unknown}: add them to _METHOD_VERBS (and the ClusterRole)"
    verbs = {v for _, _, v in _operator_calls()}
    assert {_METHOD_VERBS[m] for m in sites} <= verbs, "the scenario misses a call site"


def test_cluster_role_is_exactly_what_the_operator_and_kopf_use() -> None:
    used = _operator_calls()
    assert used == {
        ("", "nodes", "list"),
        ("", "pods", "get"), ("", "pods", "list"), ("", "pods", "create"), ("", "pods", "delete"),
        ("", "services", "get"), ("", "services", "list"), ("", "services", "create"),
        ("", "services", "patch"), ("", "services", "delete"),
        ("networking.k8s.io", "networkpolicies", "get"), ("networking.k8s.io", "networkpolicies", "create"),
        ("networking.k8s.io", "networkpolicies", "patch"),
        ("", "secrets", "get"), ("", "secrets", "create"), ("", "secrets", "patch"),
        ("amp4ec.io", "inferencedeployments", "list"),  # the deployments competing for nodes
    }  # fmt: skip
    # Secrets are read only in the operator's namespace, by name (the Role), never clusterwide.
    used -= {("", "secrets", "get")}
    needed = used | set(KOPF_NEEDS)
    granted = _granted(render())
    assert granted - needed == set(), f"granted but never used: {sorted(granted - needed)}"
    assert needed - granted == set(), f"used but not granted: {sorted(needed - granted)}"


def test_kopf_needs_hold_for_how_the_chart_runs_it() -> None:
    """KOPF_NEEDS assumes clusterwide + standalone, a status subresource, and scanning left on."""
    (c,) = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {"--standalone", "--all-namespaces"} <= set(c["command"])
    assert "scanning.disabled" not in (ROOT / "amp4ec" / "operator" / "settings.py").read_text()
    crd = yaml.safe_load((ROOT / "manifests" / "crd.yaml").read_text())
    assert all(v.get("subresources", {}).get("status") == {} for v in crd["spec"]["versions"])
    # Clusterwide means one ClusterRole bound to the operator's ServiceAccount, and no Role.
    objs = render()
    binding = one(objs, "ClusterRoleBinding")
    sa = one(objs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "amp4ec-system"}
    ]
    # The one Role: reading the CA and the monitors' Secret in the operator's own namespace.
    (role,) = [o for o in objs if o["kind"] == "Role"]
    (role_binding,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert (
        role_binding["subjects"] == binding["subjects"]
        and role_binding["roleRef"]["name"] == role["metadata"]["name"]
    )


def test_the_operator_reads_only_its_own_two_secrets() -> None:
    """Reading every Secret of the cluster is a privilege the operator does not need (certs.py,
    [Note: write-only Secrets]): it writes deployments' Secrets and reads back none of them."""
    kube = _scenario()
    assert kube.secrets_read == {("amp4ec-system", "amp4ec-ca"), ("amp4ec-system", "amp4ec-monitor-tls")}
    named = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for (plural, _, _), o in kube.objects.items()
        if plural == "pods"
        for c in o["spec"].get("initContainers") or ()
        for e in c.get("env") or ()
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    assert named == {"minio-creds"}  # the S3 Secret is named to the kubelet, never read
    objs = render()
    role = one(objs, "Role")
    assert role["metadata"]["namespace"] == "amp4ec-system"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["amp4ec-ca", "amp4ec-monitor-tls"],
            "verbs": ["get"],
        }
    ]
    assert ("", "secrets", "get") not in _granted(objs)


CERT_MANAGER_VALUES = {"tls": {"issuer": {"kind": "cert-manager", "ref": {"name": "amp4ec-ca"}}}}


def test_under_cert_manager_the_role_is_certificates_instead_of_secrets() -> None:
    """tls.issuer.kind: cert-manager: the operator writes no Secret and reads none (it waits on
    each Certificate's Ready condition and mounts its own leaf): Certificates replace Secrets."""
    kube = _scenario(CERT_MANAGER)
    assert kube.secrets_read == set()
    used = kube.used
    assert {p for p in used if p[1] in ("secrets", "certificates")} == {
        ("cert-manager.io", "certificates", "get"),
        ("cert-manager.io", "certificates", "list"),
        ("cert-manager.io", "certificates", "create"),
        ("cert-manager.io", "certificates", "delete"),
    }
    needed = used | set(KOPF_NEEDS)
    objs = render(CERT_MANAGER_VALUES)
    granted = _granted(objs)
    assert granted - needed == set(), f"granted but never used: {sorted(granted - needed)}"
    assert needed - granted == set(), f"used but not granted: {sorted(needed - granted)}"
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
    # And the built-in CA's grant has no Certificate permission.
    assert not [p for p in _granted(render()) if p[0] == "cert-manager.io"]


def test_a_cluster_without_cert_manager_is_named_in_the_condition() -> None:
    """A 404 on creating a Certificate (the kind is not installed) ends in a condition saying so."""

    class NoCertManager(RecordingKube):
        async def _request(self, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
            if "/cert-manager.io/" in path:
                return None  # what Kube makes of the API server's 404 for an unknown resource
            return await super()._request(method, path, body, content_type)

    kube = NoCertManager()
    kube.add_node("edge-a")
    profiler = Profiles(kube, CERT_MANAGER, TransportSecurity.plaintext(), None)
    deps = Deps(kube=kube, prometheus=Capacities(), profiler=profiler, config=CERT_MANAGER)  # type: ignore[arg-type]
    t = Target("demo", "default", "uid-1", 1, {"model": {"name": "mobilenet_v2"}, "strategy": "equal"}, {})

    def adopt(obj: dict[str, Any]) -> None:
        obj["metadata"]["ownerReferences"] = [{"kind": "InferenceDeployment", "name": "demo", "uid": "uid-1"}]

    async def run() -> Any:
        try:
            return await reconcile(deps, t, trigger="create", adopt=adopt)
        finally:
            await kube.close()

    outcome = asyncio.run(run())
    assert outcome.reason == "CertManagerMissing" and outcome.retry_s and not outcome.permanent
    # Seen first by the profiler Pod's Certificate: before any Pod, planning waits.
    assert (outcome.status["phase"], outcome.status["failureReason"]) == ("Planning", "CertManagerMissing")
    (planned,) = [c for c in outcome.status["conditions"] if c["type"] == "Planned"]
    assert planned["status"] == "False" and "cert-manager" in planned["message"]
    assert "tls.issuer.kind" in planned["message"]
    assert not [k for k in kube.objects if k[0] == "pods"], "no Pod without its certificate"
