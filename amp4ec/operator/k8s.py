"""The one Kubernetes adapter: a small async REST client for Pods, Services, Nodes, NetworkPolicies,
Secrets, Events, cert-manager Certificates and (to request a reconciliation) InferenceDeployments.

It logs in the way kopf does (service account in a Pod, else the kubeconfig), speaks JSON
merge patches, and maps HTTP failures once: 404 → None/ignored, 409 → ``Conflict``,
connection errors and 5xx → ``KubeUnavailable`` (the handler retries), any other 4xx →
``KubeError``.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

__all__ = ["Conflict", "Kube", "KubeError", "KubeUnavailable", "matches", "object_path"]

_KINDS = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "Node": ("/api/v1", "nodes"),
    "Secret": ("/api/v1", "secrets"),
    "Event": ("/api/v1", "events"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "Certificate": ("/apis/cert-manager.io/v1", "certificates"),
    "InferenceDeployment": ("/apis/amp4ec.io/v1alpha1", "inferencedeployments"),
}


class KubeError(Exception):
    """The API server refused a request (4xx other than 404/409)."""


class KubeUnavailable(KubeError):
    """The API server could not be reached or failed (retry later)."""


class Conflict(KubeError):
    """409: the object already exists, or changed since it was read."""


def object_path(kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of an object or collection of a kind the operator handles."""
    prefix, plural = _KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether the object carries every label of ``labels``."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Kube:
    """Async Kubernetes REST client built from kopf's ConnectionInfo (one per operator, in memo)."""

    def __init__(self, info: Any, timeout_s: float = 30.0) -> None:
        self._server = str(info.server).rstrip("/")
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"Bearer {info.token}"
        elif info.username and info.password:
            raw = f"{info.username}:{info.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        ssl_context: ssl.SSLContext | bool = True
        if self._server.startswith("https"):
            if info.insecure:
                ssl_context = False
            else:
                ctx = ssl.create_default_context(
                    cafile=str(info.ca_path) if info.ca_path else None,
                    cadata=_text(info.ca_data),
                )
                if info.certificate_path and info.private_key_path:
                    ctx.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
                ssl_context = ctx
        self._headers = headers
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with self._client().request(
                method, self._server + path, json=body, headers=headers, ssl=self._ssl
            ) as resp:
                if resp.status == 404:
                    return None
                payload = await resp.json(content_type=None) if resp.content_length != 0 else {}
                if resp.status < 300:
                    return payload
                message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
                text = f"{method} {path}: {resp.status} {message}"
                if resp.status == 409:
                    raise Conflict(text)
                if resp.status >= 500 or resp.status == 429:
                    raise KubeUnavailable(text)
                raise KubeError(text)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._request("GET", object_path(kind, namespace, name))

    async def list(
        self, kind: str, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[dict]:
        labels = labels or {}
        path = object_path(kind, namespace)
        if labels:
            path += "?labelSelector=" + ",".join(f"{k}={v}" for k, v in labels.items())
        data = await self._request("GET", path) or {}
        # Filter here too: a selector the server ignored must not widen what we act on.
        return [o for o in data.get("items", []) if matches(o, labels)]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return await self._request("POST", object_path(obj["kind"], meta.get("namespace")), dict(obj))

    async def patch(self, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any]) -> Any:
        return await self._request(
            "PATCH", object_path(kind, namespace, name), dict(patch), "application/merge-patch+json"
        )

    async def patch_status(
        self, kind: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> Any:
        """Merge-patch the status subresource (``None`` values remove keys)."""
        return await self._request(
            "PATCH",
            object_path(kind, namespace, name) + "/status",
            {"status": dict(status)},
            "application/merge-patch+json",
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self._request("DELETE", object_path(kind, namespace, name))

    async def delete_all(self, kind: str, objs: Iterable[Mapping[str, Any]]) -> int:
        """Delete each object (items of a list carry no ``kind``, so it is given)."""
        n = 0
        for obj in objs:
            meta = obj["metadata"]
            await self.delete(kind, meta.get("namespace"), meta["name"])
            n += 1
        return n


def _text(data: str | bytes | None) -> str | None:
    if data is None:
        return None
    if isinstance(data, bytes):
        data = data.decode()
    return data if "BEGIN CERTIFICATE" in data else base64.b64decode(data).decode()
