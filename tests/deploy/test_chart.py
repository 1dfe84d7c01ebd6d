"""charts/amp4ec, offline: Helm's own lint and render (Go SDK), Kubernetes schemas, and the wiring.

Rendering uses PyPI ``helm-python-sdk`` (Helm v4's Go SDK through a C ABI; no helm binary),
validation PyPI ``kubernetes-validate`` (the API's OpenAPI schemas, strict: unknown fields fail).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from amp4ec.operator.config import OperatorConfig
from tests.deploy.cert_manager import validate_certificate
from tests.deploy.chart import CERT_MANAGER_VALUES, CHART, FULL_VALUES, MINIMAL_VALUES, by_kind, one, render

KUBE_VERSIONS = ["1.25", "1.30", kubernetes_validate.latest_version()]
VALUE_SETS = {
    "default": {},
    "full": FULL_VALUES,
    "minimal": MINIMAL_VALUES,
    "cert-manager": CERT_MANAGER_VALUES,
}
# Prometheus Operator kinds: no upstream schema in kubernetes-validate; checked structurally below.
MONITOR_KINDS = {"ServiceMonitor", "PodMonitor"}


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_is_clean_in_strict_mode(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=True, namespace="amp4ec-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert report["errors"] == [] and problems == [], problems


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_valid_for_kubernetes(name: str) -> None:
    objs = render(VALUE_SETS[name])
    seen = set()
    for obj in objs:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"rendered twice: {key}"
        seen.add(key)
        if obj["kind"] in MONITOR_KINDS:
            continue
        if obj["kind"] == "Certificate":  # cert-manager's kind: no upstream schema either
            validate_certificate(obj)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_is_not_vacuous() -> None:
    deployment = copy.deepcopy(one(render(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30", strict=True)


def test_prometheus_operator_monitors_select_what_the_chart_runs() -> None:
    objs = render(FULL_VALUES)
    monitors = [o for o in objs if o["kind"] in MONITOR_KINDS]
    assert sorted(o["kind"] for o in monitors) == ["PodMonitor", "ServiceMonitor", "ServiceMonitor"]
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        assert m["metadata"]["labels"]["release"] == "kps"
        endpoints = m["spec"].get("endpoints") or m["spec"]["podMetricsEndpoints"]
        assert all(e["port"] == "metrics" and e["interval"] == "15s" for e in endpoints)
        assert all(e["honorLabels"] is True for e in endpoints)  # series carry node/namespace labels
    services = {s["metadata"]["name"]: s for s in by_kind(objs, "Service")}
    for sm in by_kind(objs, "ServiceMonitor"):
        selected = [
            s
            for s in services.values()
            if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert len(selected) == 1 and any(p["name"] == "metrics" for p in selected[0]["spec"]["ports"])
    # The shard PodMonitor selects the Pods the operator creates (amp4ec.operator.desired).
    from amp4ec.operator.desired import _COMMON

    (pm,) = by_kind(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == _COMMON
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert not by_kind(render(), "ServiceMonitor")  # off by default: needs the Prometheus Operator's CRDs


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"operatr": {}}, "additional properties 'operatr'"),
        ({"operator": {"logLevel": "loud"}}, "logLevel"),
        ({"operator": {"metricsPort": 0}}, "metricsPort"),
        ({"operator": {"prometheusUrl": "prometheus:9090"}}, "prometheusUrl"),
        ({"operator": {"config": {"capacity_max_age_s": 1}}}, "capacity_max_age_s"),
        ({"operator": {"shardEnv": {"A": "x,y"}}}, "shardEnv"),
        ({"monitor": {"peers": ["edge-a:50051"]}}, "peers"),
        ({"monitor": {"capacityOverrides": {"a": {"cpus": 1}}}}, "cpus"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "interval"),
        ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),
    ],
)
def test_values_schema_rejects_mistakes(values: dict[str, Any], error: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=error):
        render(values)


def test_cross_field_mistakes_fail_the_render() -> None:
    with pytest.raises(helm_python.HelmError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_run_non_root_on_a_read_only_root_filesystem(name: str) -> None:
    for workload in by_kind(render(VALUE_SETS[name]), "Deployment") + by_kind(
        render(VALUE_SETS[name]), "DaemonSet"
    ):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in containers(workload):
            if c["name"] == "model-cache-owner":
                _only_hands_the_cache_to_the_monitor(c, pod, volumes)
                continue
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], "a writable /tmp (emptyDir)"
            writable = {
                e["value"] for e in c.get("env", []) if e["name"] in {"HOME", "XDG_CACHE_HOME", "TORCH_HOME"}
            }
            assert all(v.startswith("/tmp") for v in writable)


def _only_hands_the_cache_to_the_monitor(
    c: dict[str, Any], pod: dict[str, Any], volumes: dict[str, dict[str, Any]]
) -> None:
    """The one root container: the model cache's, in the monitor, before it runs. The kubelet makes
    a hostPath root-owned; it gives the directory to the monitor's UID and may do nothing else."""
    sc = c["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert c["command"][:3] == ["sh", "-c", 'chown "$0" "$1" && chmod 0700 "$1"']
    owner = f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    (mount,) = c["volumeMounts"]
    assert c["command"][3:] == [owner, mount["mountPath"]]
    assert volumes[mount["name"]]["hostPath"] == {"path": mount["mountPath"], "type": "DirectoryOrCreate"}


def test_the_model_cache_is_the_monitors_only_hostpath_and_needs_tls() -> None:
    for values in VALUE_SETS.values():
        objs = render(values)
        for w in by_kind(objs, "Deployment") + by_kind(objs, "DaemonSet"):
            host = [v for v in w["spec"]["template"]["spec"].get("volumes", []) if "hostPath" in v]
            assert not host or w["kind"] == "DaemonSet", w["metadata"]["name"]
    ds = one(render(), "DaemonSet")
    (monitor,) = ds["spec"]["template"]["spec"]["containers"]
    args = monitor["args"]
    assert args[args.index("--model-cache") + 1] == "/var/lib/amp4ec/models"
    assert args[args.index("--model-cache-size") + 1] == "20Gi"
    cache = one(render(), "Service", "-cache")
    assert cache["spec"]["internalTrafficPolicy"] == "Local"  # each Pod reaches its own node's monitor
    env = _operator_env(render())
    assert env["AMP4EC_MODEL_CACHE_ADDRESS"] == "amp4ec-monitor-cache.amp4ec-system.svc:50054"
    config = OperatorConfig.from_env(env)
    template = ds["spec"]["template"]["metadata"]["labels"]
    assert dict(config.monitor_pod_labels).items() <= template.items()
    for off in ({"monitor": {"modelCache": {"enabled": False}}}, {"tls": {"enabled": False}}):
        objs = render(off)
        assert "AMP4EC_MODEL_CACHE_ADDRESS" not in _operator_env(objs)
        (monitor,) = one(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
        assert "--model-cache" not in monitor["args"]
        assert not [s for s in by_kind(objs, "Service") if s["metadata"]["name"].endswith("-cache")]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_selectors_match_pod_labels_and_services_name_real_ports(name: str) -> None:
    objs = render(VALUE_SETS[name])
    workloads = by_kind(objs, "Deployment") + by_kind(objs, "DaemonSet")
    for w in workloads:
        assert (
            w["spec"]["selector"]["matchLabels"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        )
    for svc in by_kind(objs, "Service"):
        backing = [
            w
            for w in workloads
            if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(backing) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in containers(backing[0]) for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports


def _operator_env(objs: list[dict[str, Any]]) -> dict[str, str]:
    (c,) = one(objs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    # AMP4EC_NAMESPACE comes from the downward API: the release namespace of these renders.
    return {e["name"]: e.get("value", "amp4ec-system") for e in c["env"]}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_env_is_operator_config(name: str) -> None:
    """Every AMP4EC_* variable names an OperatorConfig field (from_env ignores unknown ones silently)."""
    objs = render(VALUE_SETS[name])
    env = _operator_env(objs)
    fields = {f"AMP4EC_{f.upper()}" for f in OperatorConfig.__dataclass_fields__}
    assert set(env) <= fields, set(env) - fields
    config = OperatorConfig.from_env(env)
    if name == "default":
        # Profiler Pods in the deployments' namespaces, with the chart's limits.
        assert (config.profiler_memory, config.profiler_cpu, config.profiler_deadline_s) == ("2Gi", "1", 600)
        assert config.agent_image == "ghcr.io/amp4ec/node-agent:0.1.0"
        assert config.tls and config.namespace == "amp4ec-system"
    if name == "full":
        assert config.capacity_max_age_s == 60 and config.ready_poll_s == 1.5
        assert dict(config.shard_env) == {"LOG_LEVEL": "debug", "OMP_NUM_THREADS": "1"}
        assert config.operator_metrics_port == 18080
        assert config.agent_image == "registry.local/amp4ec-node-agent:dev"
        assert config.initializer_image == "registry.local/amp4ec-operator:dev"
    if name == "minimal":
        profiler = (config.profiler_memory, config.profiler_cpu, config.profiler_deadline_s)
        assert profiler == ("512Mi", "500m", 120)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_operator_command_is_a_valid_kopf_run(name: str) -> None:
    import kopf.cli

    (c,) = one(render(VALUE_SETS[name]), "Deployment", "-operator")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["kopf", "run"]
    ctx = kopf.cli.run.make_context("run", list(c["command"][2:]))  # parses, runs nothing
    assert ctx.params["standalone"] and ctx.params["clusterwide"]
    assert ctx.params["modules"] == ("amp4ec.operator",)
    health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert ctx.params["liveness_endpoint"] == f"http://0.0.0.0:{health}/healthz"


@pytest.mark.parametrize("name", ["default", "full"])
def test_monitor_args_parse_with_the_node_agent_cli(name: str, tmp_path: Any) -> None:
    from amp4ec.node_agent.cli import parse_args

    ds = one(render(VALUE_SETS[name]), "DaemonSet")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "amp4ec.node_agent"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    # The monitors' leaf, mounted from the Secret the operator issues: here, files made for the test.
    from amp4ec import pki

    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    ca.issue(pki.MONITOR).write(tmp_path, "tls")
    tls = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == "amp4ec-monitor-tls" and volume["secret"]["defaultMode"] == 0o440
    args = [a.replace("$(NODE_NAME)", "edge-a").replace(tls["mountPath"], str(tmp_path)) for a in c["args"]]
    settings, stage, _, monitor = parse_args(args)
    assert settings.security.identity == pki.MONITOR
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert stage is None and monitor is not None
    assert (
        settings.node == "edge-a"
        and settings.port == ports["grpc"]
        and settings.metrics_port == ports["metrics"]
    )
    assert settings.control_port == ports["control"]
    # The model cache: the hostPath the monitor mounts, on the port its Service names.
    models = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert monitor.model_cache is not None and str(monitor.model_cache.root) == models["mountPath"]
    assert (monitor.model_cache.port, monitor.model_cache.max_bytes) == (ports["cache"], 20 << 30)
    # The kubelet cannot present a certificate: it probes the plaintext health-only port.
    assert c["readinessProbe"]["grpc"]["port"] == settings.health_port == c["livenessProbe"]["grpc"]["port"]
    # The capacity override is the node's key of the (optional) ConfigMap mounted there.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "capacity-override")
    assert str(monitor.override) == f"{mount['mountPath']}/edge-a.json"
    if name == "full":
        assert monitor.interval == 5 and dict(monitor.peers) == {
            "edge-a": "10.0.0.1:50052",
            "edge-b": "10.0.0.2:50052",
        }
        assert settings.window == 8
        cm = one(render(FULL_VALUES), "ConfigMap", "-capacity-override")
        assert json.loads(cm["data"]["edge-a.json"]) == {"cpu_limit": 0.6, "memory_available_bytes": 5e8}


def test_monitor_runs_on_edge_nodes_without_a_limit_it_would_report() -> None:
    ds = one(render(), "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"amp4ec.io/edge": "true"}
    assert pod["automountServiceAccountToken"] is False  # the monitor never calls the API
    # cgroup_cpu_limit() reads the monitor's own cgroup: a CPU limit there would be published as
    # the node's capacity (amp4ec_node_cpu_limit_cores). Memory is limited (issue 10): the monitor
    # reports the node's MemAvailable, not its own headroom. It loads no model (profiler Pods do):
    # 264 MB peak RSS measured with torch loaded and its reference workload run.
    resources = pod["containers"][0]["resources"]
    assert set(resources["limits"]) == {"memory"} and resources["limits"]["memory"] == "1Gi"
    full = one(render(FULL_VALUES), "DaemonSet")["spec"]["template"]["spec"]
    assert full["tolerations"][0]["key"] == "amp4ec.io/edge" and "affinity" in full


def test_prometheus_scrape_annotations_follow_the_ports() -> None:
    for w in by_kind(render(), "Deployment") + by_kind(render(), "DaemonSet"):
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    for w in by_kind(render(MINIMAL_VALUES), "Deployment"):
        assert "annotations" not in w["spec"]["template"]["metadata"]


def test_grafana_dashboard_configmap_is_for_the_sidecar() -> None:
    cm = one(render(), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["amp4ec.json"]) == json.loads(
        (CHART / "dashboards" / "amp4ec.json").read_text()
    )
    moved = one(render(FULL_VALUES), "ConfigMap", "-dashboard")
    assert moved["metadata"]["namespace"] == "monitoring"
    assert moved["metadata"]["annotations"] == {"grafana_folder": "amp4ec"}
    assert not [o for o in render(MINIMAL_VALUES) if o["kind"] == "ConfigMap"]


def test_full_values_reach_the_objects() -> None:
    objs = render(FULL_VALUES)
    assert all(o["metadata"]["labels"]["team"] == "vision" for o in objs)
    assert all(o["metadata"]["name"].startswith("edge-ai") for o in objs)
    op = one(objs, "Deployment")["spec"]["template"]
    assert op["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert op["spec"]["serviceAccountName"] == "edge-ai-sa" == one(objs, "ServiceAccount")["metadata"]["name"]
    assert one(objs, "ClusterRoleBinding")["subjects"][0]["name"] == "edge-ai-sa"
    assert op["spec"]["containers"][0]["image"] == "registry.local/amp4ec-operator:dev"
    assert "--verbose" in op["spec"]["containers"][0]["command"]
    assert op["metadata"]["labels"]["tier"] == "control"


def test_values_schema_covers_values_yaml_exactly() -> None:
    """Every default has a schema entry and every schema property a default (no dead or hidden keys)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(s: dict[str, Any], v: Any, path: str) -> None:
        if "properties" not in s:
            return
        assert set(s["properties"]) == set(v), (
            f"{path or '.'}: schema {sorted(s['properties'])} vs values {sorted(v)}"
        )
        for key, sub in s["properties"].items():
            walk(sub, v[key], f"{path}.{key}" if path else key)

    walk(schema, values, "")


def test_chart_readme_documents_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()

    def leaves(s: dict[str, Any], path: str) -> list[str]:
        if "properties" not in s:
            return [path]
        return [
            leaf for k, sub in s["properties"].items() for leaf in leaves(sub, f"{path}.{k}" if path else k)
        ]

    missing = [leaf for leaf in leaves(schema, "") if f"`{leaf}`" not in readme]
    assert missing == []
