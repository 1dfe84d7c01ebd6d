"""Pure: the NetworkPolicy of one deployment's shard Pods (one per deployment, owned by it).

Ingress to a shard: its gRPC port from the deployment's own shards (the previous stage) and
from Pods labelled ``amp4ec.io/client-of: <deployment>`` in the same namespace (its clients),
who may also reach the entry's v2 ports;
any port from the operator's Pods; the metrics port from Prometheus (namespace and Pod labels
from the chart). Egress from a shard: DNS, the gRPC port of its own deployment's shards (the
next stage), and, for an ``https://`` or ``s3://`` storageUri, the store's port anywhere but link-local
(169.254.0.0/16, fe80::/10: cloud metadata), and the monitors' model cache port when the chart
runs the node-wide cache. NetworkPolicies add up: a user lets more clients
in (another namespace, an ingress controller) with a policy of their own selecting the same Pods.
Kubelet probes come from the node itself, which the common CNIs always allow.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.names import child_base, label_value
from amp4ec.operator.spec import DeploymentSpec
from amp4ec.operator.storage import cache_port

__all__ = ["LABEL_CLIENT_OF", "model_cache_egress", "network_policy", "shard_selector"]

LABEL_CLIENT_OF = "amp4ec.io/client-of"
"""A Pod with ``amp4ec.io/client-of: <deployment>`` may call that deployment's entry (same namespace)."""
_LABEL_DEPLOYMENT = "amp4ec.io/deployment"
_LABEL_ROLE = "amp4ec.io/role"
_NAMESPACE_NAME = "kubernetes.io/metadata.name"
_LINK_LOCAL = {"0.0.0.0/0": ["169.254.0.0/16"], "::/0": ["fe80::/10"]}


def shard_selector(name: str) -> dict[str, Any]:
    """The label selector of a deployment's shard Pods (every plan)."""
    return {"matchLabels": {_LABEL_DEPLOYMENT: label_value(name), _LABEL_ROLE: "shard"}}


def _peer(namespace_labels: dict[str, str], pod_labels: dict[str, str]) -> dict[str, Any]:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": namespace_labels}}
    if pod_labels:
        peer["podSelector"] = {"matchLabels": pod_labels}
    return peer


def _tcp(port: int) -> dict[str, Any]:
    return {"protocol": "TCP", "port": port}


def _ingress(name: str, config: OperatorConfig) -> list[dict[str, Any]]:
    own = {"podSelector": shard_selector(name)}
    clients = {"podSelector": {"matchLabels": {LABEL_CLIENT_OF: label_value(name)}}}
    operator = _peer({_NAMESPACE_NAME: config.operator_namespace}, dict(config.operator_pod_labels))
    prometheus = _peer(dict(config.prometheus_namespace_labels), dict(config.prometheus_pod_labels))
    v2 = [_tcp(config.v2_rest_port), _tcp(config.v2_grpc_port)] if config.v2_rest_port else []
    return [
        {"from": [own, clients], "ports": [_tcp(config.shard_port)]},
        {"from": [operator]},  # the operator's control calls, whatever port they use
        {"from": [prometheus], "ports": [_tcp(config.metrics_port)]},
        *([{"from": [clients], "ports": v2}] if v2 else []),  # the entry's v2 front door
    ]


def _storage_port(spec: DeploymentSpec) -> int | None:
    url = spec.model.remote_url  # an https URI, or an s3 store's endpoint
    return (urlsplit(url).port or 443) if url is not None else None


def _egress(name: str, spec: DeploymentSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, _tcp(53)]},  # resolving the next hop's Service
        {"to": [{"podSelector": shard_selector(name)}], "ports": [_tcp(config.shard_port)]},
    ]
    port = _storage_port(spec)
    if port is not None:  # the storage initializer's download
        blocks = [{"ipBlock": {"cidr": cidr, "except": out}} for cidr, out in _LINK_LOCAL.items()]
        rules.append({"to": blocks, "ports": [_tcp(port)]})
    rules += model_cache_egress(spec, config)
    return rules


def model_cache_egress(spec: DeploymentSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    """The initializer's way to its node's model cache (the monitors' cache port), when it asks."""
    port = cache_port(spec, config)
    if port is None:
        return []
    monitors = _peer({_NAMESPACE_NAME: config.operator_namespace}, dict(config.monitor_pod_labels))
    return [{"to": [monitors], "ports": [_tcp(port)]}]


def network_policy(
    name: str, namespace: str, spec: DeploymentSpec, config: OperatorConfig, labels: dict[str, str]
) -> dict[str, Any]:
    """The deployment's NetworkPolicy, named like its entry Service."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": child_base(name), "namespace": namespace, "labels": labels},
        "spec": {
            "podSelector": shard_selector(name),
            "policyTypes": ["Ingress", "Egress"],
            "ingress": _ingress(name, config),
            "egress": _egress(name, spec, config),
        },
    }
