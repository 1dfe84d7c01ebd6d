"""The one Kubernetes adapter: the operator's calls for Pods, Services, Nodes, NetworkPolicies,
Secrets, Events, cert-manager Certificates and InferenceDeployments, over ``kubernetes_asyncio``.

Credentials come from kubernetes_asyncio's loaders, found as kubectl finds them
(``Credentials``): a Pod's service account, its token re-read as the kubelet rotates it, else the
kubeconfig (``$KUBECONFIG``, contexts, client certificates, ``tokenFile``, exec plugins such as
the EKS/GKE/OIDC helpers). kopf logs in from the same source (``login``), so the watches and
the handlers' calls speak as one identity. On a 401 the credentials are loaded afresh (the exec
plugin runs again, the files are re-read) and the request is sent once more; an exec plugin's
token is also renewed when its ``expirationTimestamp`` passes.

Requests go through kubernetes_asyncio's generic ``ApiClient.call_api`` (any kind by its REST
path, custom resources included), as JSON, updates as JSON merge patches. HTTP failures are
mapped once: 404 → None/ignored, 409 → ``Conflict``, connection errors, timeouts, 429 and 5xx →
``KubeUnavailable`` (the handler retries), any other 4xx → ``KubeError``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from kubernetes_asyncio.client import ApiClient, ApiException, Configuration
from kubernetes_asyncio.config import ConfigException, incluster_config, kube_config

__all__ = [
    "Conflict",
    "Credentials",
    "Kube",
    "KubeError",
    "KubeUnavailable",
    "NoCredentials",
    "login",
    "matches",
    "object_path",
]

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
_JSON_BODY = {200: "object", 201: "object", 202: "object"}
"""call_api's response types: "object" is the parsed JSON as it is (no generated models)."""
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """The API server refused a request (4xx other than 404/409)."""


class KubeUnavailable(KubeError):
    """The API server could not be reached or failed (retry later)."""


class Conflict(KubeError):
    """409: the object already exists, or changed since it was read."""


class NoCredentials(KubeError):
    """Neither a service account nor a kubeconfig: nothing to log in with."""


def object_path(kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of an object or collection of a kind the operator handles."""
    prefix, plural = _KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{name}" if name else path


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether the object carries every label of ``labels``."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


@dataclass(frozen=True)
class Loaded:
    """Credentials as loaded once: a client configuration and, for an exec plugin's token, its end."""

    configuration: Configuration
    expires: datetime.datetime | None
    """The exec plugin's ``expirationTimestamp`` (UTC); None when the token has no stated end."""


@dataclass(frozen=True)
class Credentials:
    """Where the operator's credentials come from, in kubectl's order: the Pod's service account
    (``KUBERNETES_SERVICE_HOST``/``_PORT`` set and its token mounted), else the kubeconfig."""

    environ: Mapping[str, str] | None = None
    """The environment to read ``KUBERNETES_SERVICE_*`` and ``KUBECONFIG`` from; None: the process's."""
    service_account: Path = SERVICE_ACCOUNT
    """The mounted service account (``token``, ``ca.crt``); the kubelet rotates the token in place."""
    context: str | None = None
    """The kubeconfig context; None: its ``current-context``."""

    async def load(self) -> Loaded:
        """Load afresh (every call runs an exec plugin again and re-reads the files).

        Raises ``NoCredentials`` when there is nothing to load, ``KubeUnavailable`` when loading
        failed (an exec plugin that exited non-zero, an unreadable kubeconfig)."""
        environ = os.environ if self.environ is None else self.environ
        configuration = Configuration()
        try:
            if (
                environ.get(incluster_config.SERVICE_HOST_ENV_NAME)
                and (self.service_account / "token").is_file()
            ):
                # try_refresh_token: kubernetes_asyncio re-reads the token file every minute.
                incluster_config.InClusterConfigLoader(
                    token_filename=str(self.service_account / "token"),
                    cert_filename=str(self.service_account / "ca.crt"),
                    try_refresh_token=True,
                    environ=dict(environ),
                ).load_and_set(configuration)
                return Loaded(configuration, None)
            paths = environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            if not any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p):
                raise NoCredentials(
                    "no Kubernetes credentials: no service account (KUBERNETES_SERVICE_HOST and "
                    f"{self.service_account / 'token'}) and no kubeconfig at {paths}"
                )
            loader = await kube_config.load_kube_config(
                config_file=paths, context=self.context, client_configuration=configuration,
                persist_config=False,
            )  # fmt: skip
        except (ConfigException, OSError, ValueError) as exc:  # e.g. an exec plugin failed or is missing
            raise KubeUnavailable(f"Kubernetes credentials: {exc}") from exc
        expires = getattr(loader, "exec_plugin_expiry", None)
        return Loaded(configuration, expires.astimezone(datetime.timezone.utc) if expires else None)


async def login(credentials: Credentials) -> kopf.ConnectionInfo:
    """kopf's view of the same credentials (for an ``@kopf.on.login`` handler; kopf calls it
    again after a 401 and when ``expiration`` passes)."""
    loaded = await credentials.load()
    c = loaded.configuration
    header = await c.get_api_key_with_prefix("BearerToken")  # "Bearer …" or a kubeconfig's "Basic …"
    scheme, _, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=c.host,
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
        proxy_url=c.proxy,
        expiration=loaded.expires,
    )


class Kube:
    """The operator's Kubernetes client (one per operator, in memo)."""

    def __init__(self, credentials: Credentials | None = None, timeout_s: float = 30.0) -> None:
        self._credentials = credentials or Credentials()
        self._timeout_s = timeout_s
        self._api: ApiClient | None = None
        self._expires: datetime.datetime | None = None
        self._lock = asyncio.Lock()
        self._retired: dict[asyncio.Task[None], ApiClient] = {}  # closing once idle

    async def _client(self, failed: ApiClient | None = None) -> ApiClient:
        """The current client; a new one when there is none, when ``failed`` (refused with a 401)
        is still current, or when an exec plugin's token has expired."""
        async with self._lock:
            now = datetime.datetime.now(datetime.timezone.utc)
            stale = (failed is not None and failed is self._api) or (
                self._expires is not None and now >= self._expires
            )
            if self._api is None or stale:
                loaded = await self._credentials.load()
                if self._api is not None:
                    self._retire(self._api)
                self._api, self._expires = ApiClient(loaded.configuration), loaded.expires
            return self._api

    def _retire(self, api: ApiClient) -> None:
        # Requests may still be in flight on it: close it once the longest of them has timed out.
        async def close_later() -> None:
            await asyncio.sleep(self._timeout_s)
            await api.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired[task] = api
        task.add_done_callback(lambda t: self._retired.pop(t, None))

    async def close(self) -> None:
        clients = [*self._retired.values(), *([self._api] if self._api else [])]
        for task in list(self._retired):
            task.cancel()
        self._api = None
        await asyncio.gather(*(c.close() for c in clients))

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """Send one request (a 401 reloads the credentials and sends it once more), mapped."""
        resource, _, query = path.partition("?")
        api: ApiClient | None = None
        for attempt in (1, 2):
            try:
                api = await self._client(failed=api)
                data = await api.call_api(
                    resource, method,
                    query_params=urllib.parse.parse_qsl(query),
                    header_params={"Accept": "application/json", "Content-Type": content_type},
                    body=body, response_types_map=_JSON_BODY, auth_settings=["BearerToken"],
                    _return_http_data_only=True, _request_timeout=self._timeout_s,
                )  # fmt: skip
                return {} if data == "" else data  # an empty body is not JSON
            except ApiException as exc:
                if exc.status == 401 and attempt == 1:
                    continue
                if exc.status == 404:
                    return None
                raise _error(method, path, exc) from None
            except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
                raise KubeUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._request("GET", object_path(kind, namespace, name))

    async def list(
        self, kind: str, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[dict]:
        labels = labels or {}
        path = object_path(kind, namespace)
        if labels:
            path += "?" + urllib.parse.urlencode(
                {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())}
            )
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


def _error(method: str, path: str, exc: ApiException) -> KubeError:
    """The one mapping of an API server's refusal (a Status object's message when it sent one)."""
    try:
        payload = json.loads(exc.body or "")
    except (TypeError, ValueError):
        payload = exc.body or exc.reason or ""
    message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
    text = f"{method} {path}: {exc.status} {message}"
    if exc.status == 409:
        return Conflict(text)
    if exc.status >= 500 or exc.status == 429:
        return KubeUnavailable(text)
    return KubeError(text)
