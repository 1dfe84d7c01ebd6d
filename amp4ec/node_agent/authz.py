"""Who may call what on an agent's servers, under mutual TLS (see docs/security.md).

The peer identities are what the TLS handshake verified against the CA
(``transport.peer_identities``); these functions only decide.
"""

from __future__ import annotations

from amp4ec import pki
from amp4ec.node_agent.repository import StageRepository
from amp4ec.wire import transport

__all__ = ["cache_namespace", "cache_policy", "control_policy", "data_policy", "profiler_policy"]

_HEALTH = "/grpc.health.v1.Health/"
_ECHO = "/amp4ec.wire.v1.NodeAgent/Echo"


def data_policy(repository: StageRepository) -> transport.Policy:
    """Health for any verified peer; Shard calls only from the identities the stage accepts."""

    def allowed(method: str, peers: frozenset[str]) -> bool:
        return method.startswith(_HEALTH) or bool(peers & repository.accept_from)

    return allowed


def control_policy(method: str, peers: frozenset[str]) -> bool:
    """The operator (or local supervisor) may steer; monitors may only probe links."""
    if method.startswith(_HEALTH) or pki.OPERATOR in peers:
        return True
    return method == _ECHO and pki.MONITOR in peers


def profiler_policy(method: str, peers: frozenset[str]) -> bool:
    """A profiler Pod answers the operator only: no monitor, no other Pod of the namespace."""
    return method.startswith(_HEALTH) or pki.OPERATOR in peers


def cache_namespace(peers: frozenset[str]) -> str | None:
    """The one namespace whose entries of the node's model cache the peer may read and write:
    that of its shard or profiler identity (``pki.workload_namespace``); None for any other
    peer, or one whose certificate names several namespaces."""
    namespaces = {ns for p in peers if (ns := pki.workload_namespace(p)) is not None}
    return next(iter(namespaces)) if len(namespaces) == 1 else None


def cache_policy(method: str, peers: frozenset[str]) -> bool:
    """The monitor's model cache port: health for any verified peer; ModelCache only for the
    shard and profiler Pods of one namespace (clients, monitors and the operator load no model)."""
    return method.startswith(_HEALTH) or cache_namespace(peers) is not None
