"""Fixtures for the operator's end-to-end tests: fake cluster, real Prometheus, real monitors, real kopf."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from amp4ec import pki
from amp4ec.operator.certs import CA_SECRET, client_secret_name
from tests.operator.cluster import CRD, NODES, PODS, ROOT, SECRETS, SERVICES, FakeCluster, Kubectl, environ
from tests.operator.store import certificate
from tests.waiting import wait_for as _wait_for

NODE_NAMES = ("edge-a", "edge-b", "edge-c")
ALLOCATABLE = {"cpu": "1", "memory": "2Gi", "pods": "110"}
"""Each test node's allocatable: what its monitor agent reports (one core, 2 GiB)."""
WAIT_S = 90.0
MODEL_CACHE_SERVICE = "amp4ec-monitor-cache"
MEASURE_WINDOW = "30s"
"""status.measured's PromQL range here: 30 scrapes at 1 s, and long enough that a burst of
test requests stays in it for the next timer tick (every 5 s)."""


def wait_for(
    check: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition", every: float = 0.3
) -> Any:
    """``tests.waiting.wait_for`` with the operator tests' default timeout."""
    return _wait_for(check, timeout, what, every)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("the prometheus binary is required under CI (.ci/run installs the Debian package)")
        pytest.skip("prometheus binary not found (apt-get install prometheus); CI installs it")
    return binary


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    _stop_all([proc], sig, timeout)


def _stop_all(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal every process first, then wait for each (SIGKILL past ``timeout``): they end side
    by side, not one after the other."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.send_signal(sig)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Monitor:
    node: str
    proc: subprocess.Popen[bytes]
    port: int
    """The control port (mutual TLS: peer monitors may Echo; Monitor.Profile is refused)."""
    metrics_port: int
    override: Path
    log: Path
    cache_port: int
    """Its node-wide model cache (ModelCache, mutual TLS), reached through the node-local Service."""
    cache_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_capacity(self, **values: float) -> None:
        tmp = self.override.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(self.override)


def start_monitor(node: str, workdir: Path, tls: Path) -> Monitor:
    """A monitor agent with the monitors' leaf in ``tls`` (ca.crt, tls.crt, tls.key)."""
    port_file = workdir / f"monitor-{node}.port"
    control_file = workdir / f"monitor-{node}.control-port"
    override = workdir / f"monitor-{node}.json"
    log = workdir / f"monitor-{node}.log"
    cache_file = workdir / f"monitor-{node}.cache-port"
    cache_dir = workdir / f"monitor-{node}-models"  # the node's hostPath
    metrics_port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "amp4ec.node_agent", "--node", node, "--port-file", str(port_file),
                "--control-port", "0", "--control-port-file", str(control_file),
                "--tls-ca", str(tls / "ca.crt"), "--tls-cert", str(tls / "tls.crt"),
                "--tls-key", str(tls / "tls.key"),
                "--metrics-port", str(metrics_port), "--cpu-limit", "1", "--memory-bytes", str(2 << 30),
                "--monitor-interval", "1", "--capacity-override", str(override),
                "--model-cache", str(cache_dir), "--model-cache-port", "0",
                "--model-cache-port-file", str(cache_file),
            ],
            env=environ(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    wait_for(lambda: port_file.exists() and int(port_file.read_text()), 60, f"monitor {node} to serve")
    control, cache = int(control_file.read_text()), int(cache_file.read_text())
    return Monitor(node, proc, control, metrics_port, override, log, cache, cache_dir)


@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    url: str
    targets_file: Path
    log: Path

    def set_targets(self, targets: list[str]) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {"job": "amp4ec-monitor"}}]))
        tmp.replace(self.targets_file)

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["data"]["result"]


SHARD_RELABELLING = """\
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
        regex: amp4ec-shard
        action: keep
      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
      - {source_labels: [__meta_kubernetes_pod_label_amp4ec_io_deployment], target_label: deployment}
      - {source_labels: [__meta_kubernetes_pod_label_amp4ec_io_stage], target_label: stage}
      - {source_labels: [__meta_kubernetes_pod_label_amp4ec_io_pipeline], target_label: pipeline}
      - {source_labels: [__meta_kubernetes_pod_label_amp4ec_io_plan], target_label: plan}
"""
"""What the chart's shard PodMonitor (charts/amp4ec/templates/servicemonitor.yaml) makes the
Prometheus Operator generate: select shard Pods, then the Pod's namespace and name and its
amp4ec.io/* labels as target labels; the operator's status.measured selects by these."""


def start_prometheus(
    binary: str, workdir: Path, targets: list[str], pods_sd_dir: Path | None = None
) -> PrometheusServer:
    port = free_port()
    targets_file = workdir / "targets.json"
    config = workdir / "prometheus.yml"
    text = (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: amp4ec-monitor\n    file_sd_configs:\n"
        f"      - files: ['{targets_file}']\n        refresh_interval: 1s\n"
    )
    if pods_sd_dir is not None:  # the kubelet stand-in's file_sd in place of kubernetes_sd
        text += (
            "  - job_name: amp4ec-shards\n    honor_labels: true\n    file_sd_configs:\n"
            f"      - files: ['{pods_sd_dir}/*.json']\n        refresh_interval: 1s\n" + SHARD_RELABELLING
        )
    config.write_text(text)
    log = workdir / "prometheus.log"
    server = PrometheusServer(None, f"http://127.0.0.1:{port}", targets_file, log)  # type: ignore[arg-type]
    server.set_targets(targets)
    with log.open("wb") as out:
        server.proc = subprocess.Popen(
            [
                binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def ready() -> bool:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
            return resp.status == 200

    wait_for(ready, 60, "Prometheus to be ready")
    return server


@dataclass
class Operator:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    metrics_port_file: Path = field(default_factory=Path)

    def start(self) -> None:
        self.starts += 1
        self.metrics_port_file.unlink(missing_ok=True)
        out = self.log.open("ab")
        command = [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            "--all-namespaces",
            "-m",
            "amp4ec.operator",
        ]
        self.proc = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        out.close()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crashed or evicted Pod."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def metrics(self) -> str:
        port = wait_for(
            lambda: self.metrics_port_file.exists() and int(self.metrics_port_file.read_text()),
            30,
            "metrics port",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()


@dataclass
class Env:
    cluster: FakeCluster
    kubectl: Kubectl
    prometheus: PrometheusServer
    monitors: dict[str, Monitor]
    operator: Operator
    workdir: Path
    store_tls: tuple[Path, Path] | None = None
    """(certificate, key) of the HTTPS model store tests may run: every process of the cluster
    trusts it (``SSL_CERT_FILE``), as a cluster would trust a store's CA."""

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kubectl.get(CRD, namespace, name)

    def condition(self, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
        obj = self.deployment(namespace, name) or {}
        for c in (obj.get("status") or {}).get("conditions") or ():
            if c["type"] == kind:
                return c
        return None

    def client_tls(self, namespace: str, name: str) -> list[str]:
        """``--ca/--cert/--key`` of the client Secret the operator wrote for a deployment, as a user
        gets them (docs/security.md): the Secret's keys written to files, the key 0600."""
        secret = wait_for(
            lambda: self.kubectl.get(SECRETS, namespace, client_secret_name(name)), 30, "the client Secret"
        )
        folder = self.workdir / f"client-{namespace}-{name}"
        folder.mkdir(mode=0o700, exist_ok=True)
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        (folder / "ca.crt").write_bytes(data["ca.crt"])
        pki.write_private(folder / "tls.key", data["tls.key"])
        (folder / "tls.crt").write_bytes(data["tls.crt"])
        return [
            "--ca",
            str(folder / "ca.crt"),
            "--cert",
            str(folder / "tls.crt"),
            "--key",
            str(folder / "tls.key"),
        ]

    def logs(self) -> str:
        parts = [f"--- operator ---\n{self.operator.log.read_text(errors='replace')[-6000:]}"]
        for log in sorted(self.workdir.glob("*.log")):
            if log != self.operator.log:
                parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


def _node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "amp4ec.io/edge": "true",
                "kubernetes.io/arch": "amd64",
            },
        },
        # What each node's monitor reports (--cpu-limit 1, --memory-bytes 2 GiB): the scheduler
        # counts requests against this, the operator plans against it.
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": dict(ALLOCATABLE),
            "capacity": dict(ALLOCATABLE),
        },
    }


def _ca_secret(ca: pki.CertificateAuthority) -> dict[str, Any]:
    data = {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET, "namespace": "amp4ec-system"},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    binary = require_prometheus()
    workdir = tmp_path_factory.mktemp("operator")
    started: list[subprocess.Popen[bytes]] = []
    store_tls = certificate(workdir)
    caches: dict[str, str] = {}  # node → its monitor's cache port, behind the node-local Service
    node_local = {("amp4ec-system", MODEL_CACHE_SERVICE): caches}
    with FakeCluster(
        workdir, environ({"SSL_CERT_FILE": str(store_tls[0])}), node_local=node_local
    ) as cluster:
        kubectl = Kubectl(cluster.url)
        try:
            for name in NODE_NAMES:
                kubectl.create(NODES, _node(name))
            # The cluster admin brings the CA (the operator would create it when missing) and
            # the monitors' leaf the operator would issue into amp4ec-monitor-tls.
            ca = pki.CertificateAuthority.create("e2e CA")
            kubectl.create(SECRETS, _ca_secret(ca))
            tls = workdir / "monitor-tls"
            tls.mkdir(mode=0o700)
            (tls / "ca.crt").write_bytes(ca.cert_pem)
            ca.issue(pki.MONITOR).write(tls, "tls")
            monitors = {}
            for name in NODE_NAMES:
                monitors[name] = start_monitor(name, workdir, tls)
                started.append(monitors[name].proc)
                caches[name] = f"127.0.0.1:{monitors[name].cache_port}"
            prometheus = start_prometheus(
                binary, workdir, [f"127.0.0.1:{m.metrics_port}" for m in monitors.values()], cluster.sd_dir
            )
            started.append(prometheus.proc)
            operator_env = environ(
                {
                    "KUBECONFIG": str(cluster.kubeconfig(workdir / "kubeconfig.json")),
                    "AMP4EC_PROMETHEUS_URL": prometheus.url,
                    # The test's model store listens on loopback (the chart's storageAllowedNetworks).
                    "AMP4EC_STORAGE_ALLOWED_NETWORKS": "127.0.0.0/8",
                    # The chart's node-local Service of the monitors' cache port.
                    "AMP4EC_MODEL_CACHE_ADDRESS": f"{MODEL_CACHE_SERVICE}.amp4ec-system.svc:50054",
                    "AMP4EC_OPERATOR_METRICS_PORT": "0",
                    "AMP4EC_METRICS_PORT_FILE": str(workdir / "operator-metrics.port"),
                    "AMP4EC_READY_POLL_S": "1",
                    "AMP4EC_CAPACITY_MAX_AGE_S": "10",
                    "AMP4EC_INFEASIBLE_RETRY_S": "3",
                    # A blocked deployment's back-off stops doubling at 5 s: a test that heals
                    # its cause (creates a missing Secret) waits at most that, not 24 s or more.
                    "AMP4EC_RETRY_CAP_S": "5",
                    "AMP4EC_MEASURE_WINDOW": MEASURE_WINDOW,
                    "AMP4EC_MEASURE_INTERVAL_S": "1",
                    # The test models are factories: allowed as a cluster admin would (chart value).
                    "AMP4EC_ALLOWED_FACTORY_MODULES": "tests",
                }
            )
            operator = Operator(
                operator_env, workdir / "operator.log", metrics_port_file=workdir / "operator-metrics.port"
            )
            operator.start()
            e = Env(cluster, kubectl, prometheus, monitors, operator, workdir, store_tls)
            # Every node's capacity visible in Prometheus before any test plans.
            wait_for(
                lambda: len(prometheus.query("amp4ec_node_workload_ms")) == len(NODE_NAMES),
                60,
                "node metrics",
            )
            yield e
        finally:
            if "operator" in locals():
                operator.stop()
            _stop_all(started)


def _workload_ms(env: Env, node: str) -> float | None:
    result = env.prometheus.query(f'amp4ec_node_workload_ms{{node="{node}"}}')
    return float(result[0]["value"][1]) if result else None


def restore_capacity(env: Env, node: str) -> None:
    """Drop a monitor's capacity override and wait until Prometheus no longer serves the
    overridden reference-workload time, so that no later plan sees it."""
    monitor = env.monitors[node]
    overridden = json.loads(monitor.override.read_text() or "{}") if monitor.override.exists() else {}
    monitor.set_capacity()
    if "workload_ms" in overridden:
        wait_for(
            lambda: (ms := _workload_ms(env, node)) is not None and ms != overridden["workload_ms"],
            30,
            f"{node}'s measured capacity back in Prometheus",
        )


@pytest.fixture
def e2e(env: Env) -> Iterator[Env]:
    """The shared environment, checked sound before a test (operator running, Prometheus
    answering, no capacity override) and restored after it if the test left it otherwise."""

    def sound() -> None:
        if env.operator.proc is None or env.operator.proc.poll() is not None:
            env.operator.start()
        wait_for(lambda: env.prometheus.query("up") is not None, 30, "Prometheus to answer")
        for node, monitor in env.monitors.items():
            if monitor.override.exists() and monitor.override.read_text() not in ("", "{}"):
                restore_capacity(env, node)

    sound()
    yield env
    sound()


_namespaces = itertools.count()


@dataclass
class Namespace:
    """A namespace of one test: what it creates there is deleted, and waited for, after it."""

    env: Env
    name: str

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.env.kubectl.create(CRD, deployment_resource(self.name, name, spec))

    def clean(self) -> None:
        kubectl, cluster = self.env.kubectl, self.env.cluster
        for obj in kubectl.list(CRD, self.name):
            kubectl.delete(CRD, self.name, obj["metadata"]["name"])
        wait_for(
            lambda: (
                not any(kubectl.list(r, self.name) for r in (CRD, PODS, SERVICES))
                and not cluster.pod_processes(self.name)
            ),
            60,
            f"namespace {self.name} to empty",
        )


@pytest.fixture
def ns(e2e: Env, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """A fresh namespace named after the test; emptied after it (Pods, Services, processes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[:40].strip("-")
    namespace = Namespace(e2e, f"{slug}-{next(_namespaces)}")
    try:
        yield namespace
    finally:
        namespace.clean()


def deployment_resource(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "amp4ec.io/v1alpha1",
        "kind": "InferenceDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
