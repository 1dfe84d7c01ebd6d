"""Shared helpers of the deployment tests: render the chart offline, load YAML strictly."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "amp4ec"


@functools.cache
def gen_manifests() -> ModuleType:
    """hack/gen-manifests.py as a module (its file name is not an import name)."""
    spec = importlib.util.spec_from_file_location("gen_manifests", ROOT / "hack" / "gen-manifests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (the API server's YAML decoder does too)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_strict(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


@functools.cache
def _render(values_json: str, namespace: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    docs = gen_manifests().render(json.loads(values_json), namespace=namespace)
    return tuple((path, load_strict(doc)) for path, doc in docs)


def render(values: dict[str, Any] | None = None, namespace: str = "amp4ec-system") -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (cached per values; do not mutate the results)."""
    return [obj for _, obj in _render(json.dumps(values or {}, sort_keys=True), namespace)]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def crd() -> dict[str, Any]:
    (path,) = sorted((CHART / "crds").glob("*.yaml"))
    return load_strict(path.read_text())


# Values that turn every optional part on and change most defaults (the non-default render).
FULL_VALUES: dict[str, Any] = {
    "fullnameOverride": "edge-ai",
    "commonLabels": {"team": "vision"},
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "image": {"repository": "registry.local/amp4ec-operator", "tag": "dev", "pullPolicy": "Always"},
        "prometheusUrl": "http://kps-prometheus.monitoring.svc:9090",
        "metricsPort": 18080,
        "healthPort": 18081,
        "config": {"CAPACITY_MAX_AGE_S": 60, "READY_POLL_S": "1.5"},
        "shardEnv": {"OMP_NUM_THREADS": "1", "LOG_LEVEL": "debug"},
        "logLevel": "verbose",
        "allowedFactoryModules": ["vision_models", "acme.nets"],
        "storageAllowedNetworks": ["127.0.0.0/8"],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/owner": "ml"},
        "podLabels": {"tier": "control"},
    },
    "agent": {"image": {"repository": "registry.local/amp4ec-node-agent", "tag": "dev"}},
    "shards": {
        "tolerations": [{"key": "amp4ec.io/edge", "operator": "Exists", "effect": "NoSchedule"}],
        "nodeSelector": {"amp4ec.io/profile": "edge"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "edge-inference",
    },
    "networkPolicy": {
        "prometheus": {
            "namespaceSelector": {"kubernetes.io/metadata.name": "observability"},
            "podSelector": {"app.kubernetes.io/name": "prometheus"},
        }
    },
    "monitor": {
        "interval": 5,
        "grpcPort": 50052,
        "metricsPort": 19090,
        "nodeSelector": {"amp4ec.io/profile": "edge"},
        "tolerations": [{"key": "amp4ec.io/edge", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64", "amd64"]}
                            ]
                        }
                    ]
                }
            }
        },
        "peers": ["edge-a=10.0.0.1:50052", "edge-b=10.0.0.2:50052"],
        "capacityOverrides": {"edge-a": {"cpu_limit": 0.6, "memory_available_bytes": 5.0e8}},
        "extraArgs": ["--window", "8"],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    },
    "serviceAccount": {"name": "edge-ai-sa", "annotations": {"example.com/role": "operator"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}, "interval": "15s"}},
    "grafana": {"dashboard": {"namespace": "monitoring", "annotations": {"grafana_folder": "amp4ec"}}},
}

# The operator alone (your own capacity exporters), small profiler Pods, no dashboard, no scrape annotations.
MINIMAL_VALUES: dict[str, Any] = {
    "monitor": {"enabled": False},
    "profiler": {"memory": "512Mi", "cpu": "500m", "activeDeadlineSeconds": 120},
    "metrics": {"podAnnotations": False},
    "grafana": {"dashboard": {"enabled": False}},
    "networkPolicy": {"enabled": False, "shards": False},
}

# cert-manager signs the leaves (tls.issuer.kind: cert-manager) with a ClusterIssuer.
CERT_MANAGER_VALUES: dict[str, Any] = {
    "tls": {"issuer": {"kind": "cert-manager", "ref": {"name": "amp4ec-ca"}}},
}
