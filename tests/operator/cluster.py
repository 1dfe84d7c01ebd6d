"""A Kubernetes stand-in for operator tests: KMock's emulator made API-server-like, plus a tiny kubelet.

``Emulator`` extends ``kmock.KubernetesEmulator`` with what kopf relies on and the stock one
lacks (and matches each request to its reaction in constant time, where KMock replays every
request served so far): ``metadata.uid``, ``resourceVersion`` (one counter, bumped on every change, not on
no-op patches), ``generation`` (bumped when anything but metadata/status changes), the status
subresource (``/status`` writes only status; the main resource ignores status), 409 on
create-if-exists and on stale ``resourceVersion``, ``labelSelector`` on lists, and the
garbage collector (children whose owner is gone are deleted, cascading).

``Kubelet`` starts each Pod's container command as a local process (args and env, with the
pod's own port and next hops rewritten to loopback, its Secret volumes written to a private
directory and their mount paths rewritten to it), marks it Ready when its gRPC readiness
probe answers SERVING (on its plaintext health-only port when it has one, as a kubelet cannot
present a certificate), and maps every Service port to a loopback TCP proxy (kube-proxy's job)
in front of the ready Pods its selector matches (a named ``targetPort`` resolves through the
container's ``ports`` to the flag that sets it, e.g. ``--v2-http-port``, read back from the
port file the rewritten flag names); a node-local Service of processes started outside it
(``node_local``: the monitors) resolves to the endpoint on the Pod's own node. Init
containers run first, in order, each to exit 0 (a failure's last log lines become its
termination message under ``FallbackToLogsOnError``); ``emptyDir`` volumes are a directory
per Pod shared by its containers, a PersistentVolumeClaim the directory ``pvc_root/ns/claim`` (a claim with no
object in the API leaves the Pod unschedulable, as the scheduler would); ``activeDeadlineSeconds``
kills a Pod and fails it (``DeadlineExceeded``); a Pod without a data port (``--port``) gets a
loopback address of its own as ``podIP``, so its fixed container ports are reachable there.
A container whose process exits is restarted
per ``restartPolicy`` with the kubelet's CrashLoopBackOff (the first restart at once, then
10 s doubling to 5 min), each run with a fresh port file, and the Pod status carries what a
kubelet reports: phase, the Ready and ContainersReady conditions, and ``containerStatuses``
(ready, restartCount, state, lastState). A deleted Pod is ended as a kubelet ends it: the
API server only marks it (``deletionTimestamp``), the kubelet sends SIGTERM, waits up to
``terminationGracePeriodSeconds`` (then SIGKILL), and only then is the object removed.
``power_off(node)`` kills a node's containers and leaves nothing there running, restarting or
reporting (a dead kubelet says nothing); Pods on a deleted Node are removed (the Pod GC's job).
It also stands in for Prometheus'
``kubernetes_sd``: a Pod annotated ``prometheus.io/scrape: "true"`` gets a free loopback
metrics port, and while its process runs, a file_sd target file in ``sd_dir`` carries the
``__meta_kubernetes_*`` labels kubernetes_sd would (namespace, pod name, labels,
annotations), so the test Prometheus applies the same relabelling a cluster's does.

Before a kubelet runs a Pod, the scheduler binds it (``spec.nodeName``, ``PodScheduled=True``):
oldest first, to a node that matches its ``nodeName``/``nodeSelector``, tolerates its taints
(a NotReady node carries ``node.kubernetes.io/not-ready``) and has room for its requests
(``status.allocatable`` less the requests of the non-terminal Pods bound there). A Pod no node
fits stays Pending with ``PodScheduled=False``, reason ``Unschedulable`` and kube-scheduler's
message (``0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node
affinity/selector.``), and is tried again at every sync; it never starts.

``FakeCluster`` runs both on an event loop in a thread; ``Kubectl`` is a sync REST client.
Authentication is off unless a test sets ``Emulator.accept`` (which bearer tokens are valid
now): then any other token gets a 401, as a real API server answers a rotated-out token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jsonpatch
import kmock
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kmock._internal import dsl, enums, rendering
from kmock._internal.dicts import patch_dict
from kmock._internal.k8s import KubernetesObjectConflictError, KubernetesObjectNotFoundError

__all__ = ["CONFIGMAPS", "PVCS", "Emulator", "FakeCluster", "Kubectl", "Kubelet"]

ROOT = Path(__file__).resolve().parents[2]
CRD = "amp4ec.io/v1alpha1/inferencedeployments"
PODS = "v1/pods"
SECRETS = "v1/secrets"
CONFIGMAPS = "v1/configmaps"
PVCS = "v1/persistentvolumeclaims"
SERVICES = "v1/services"
NODES = "v1/nodes"
EVENTS = "v1/events"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StaleResourceVersion(kmock.KubernetesError):
    pass


class PatchTestFailed(kmock.KubernetesError):
    """A JSON patch whose ``test`` op fails (kopf tests ``resourceVersion``): 422, as an API
    server answers, so kopf retries on its next cycle instead of re-sending a stale patch."""


class Unauthorized(kmock.KubernetesError):
    """401, as an API server answers a bearer token it does not (or no longer) accept."""


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator with uid, resourceVersion, generation, /status, 409s, selectors and GC;
    and, when a test sets ``accept``, bearer-token authentication (401 for any other token)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.accept: Callable[[str], bool] | None = None
        """Which bearer tokens are valid now; None (the default): no authentication at all."""
        self.logins: list[tuple[str, str, str, int]] = []
        """With ``accept``: (User-Agent, request path, token, 200 or 401) of every request."""
        self._rv = itertools.count(1)
        self.last_rv = 0
        self.resources[CRD] = kmock.ResourceInfo(
            kind="InferenceDeployment",
            singular="inferencedeployment",
            namespaced=True,
            shortnames={"idep"},
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )
        for res, kind, namespaced in (
            (PODS, "Pod", True),
            (SERVICES, "Service", True),
            (NODES, "Node", False),
            (EVENTS, "Event", True),
            (PVCS, "PersistentVolumeClaim", True),
            (CONFIGMAPS, "ConfigMap", True),
            ("v1/namespaces", "Namespace", False),
        ):
            self.resources[res] = kmock.ResourceInfo(
                kind=kind,
                singular=kind.lower(),
                namespaced=namespaced,
                subresources={"status"} if kind in ("Pod", "Service", "Node") else set(),
                verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            )

    def register(self, resource: str, kind: str, *, namespaced: bool = True, status: bool = True) -> None:
        """Serve another kind, as installing its CRD would (e.g. cert-manager's Certificate)."""
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            subresources={"status"} if status else set(),
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        )

    def _has_status(self, resource: Any) -> bool:
        return any(r == resource and "status" in self.resources[r].subresources for r in self.resources)

    def _bump(self, meta: dict[str, Any]) -> None:
        self.last_rv = next(self._rv)
        meta["resourceVersion"] = str(self.last_rv)

    def _live(self, key: tuple[Any, str | None, str]) -> bool:
        return key in self._objects and not self._objects[key].deleted

    async def _emit(self, resource: Any, kind: str, raw: dict[str, Any]) -> None:
        await self._buses[resource].put({"type": kind, "object": copy.deepcopy(raw)})

    async def _remove(self, key: tuple[Any, str | None, str]) -> None:
        """Delete now (no finalizers left), then collect everything it owned."""
        obj = self._objects[key]
        raw = copy.deepcopy(obj.last.raw)
        self._bump(raw["metadata"])
        obj.create(raw)
        obj.delete()
        await self._emit(key[0], "DELETED", raw)
        uid = raw["metadata"].get("uid")
        for child_key, child in list(self._objects.items()):
            if child.deleted:
                continue
            owners = child.last.raw.get("metadata", {}).get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                await self._delete(child_key)

    async def _delete(self, key: tuple[Any, str | None, str]) -> None:
        obj = self._objects[key]
        meta = obj.last.raw.get("metadata", {})
        if meta.get("deletionTimestamp"):
            return
        graceful = key[0] == kmock.resource(PODS)  # the kubelet ends the Pod, then removes it
        if meta.get("finalizers") or graceful:
            raw = copy.deepcopy(obj.last.raw)
            raw["metadata"]["deletionTimestamp"] = _now()
            if graceful:
                grace = (raw.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
                raw["metadata"]["deletionGracePeriodSeconds"] = grace
            self._bump(raw["metadata"])
            obj.create(raw)
            await self._emit(key[0], "MODIFIED", raw)
        else:
            await self._remove(key)

    async def _write(self, key: tuple[Any, str | None, str], body: Any, subresource: str | None) -> None:
        obj = self._objects[key]
        old = copy.deepcopy(obj.last.raw)
        if isinstance(body, dict):
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv and rv != old["metadata"].get("resourceVersion"):
                raise StaleResourceVersion(
                    status=409, reason="Conflict", message="the object has been modified; apply to the latest"
                )
            if subresource == "status":
                body = {"status": body.get("status")}
            elif self._has_status(key[0]):
                body = {k: v for k, v in body.items() if k != "status"}
        try:
            new = copy.deepcopy(dict(patch_dict(old, body)))
        except jsonpatch.JsonPatchException as exc:
            raise PatchTestFailed(status=422, reason="Invalid", message=str(exc)) from None
        for fixed in ("uid", "name", "namespace", "creationTimestamp", "resourceVersion", "generation"):
            if fixed in old["metadata"]:
                new.setdefault("metadata", {})[fixed] = old["metadata"][fixed]
        if new == old:
            return  # a no-op patch changes nothing, not even resourceVersion
        strip = ("metadata", "status")
        if {k: v for k, v in new.items() if k not in strip} != {
            k: v for k, v in old.items() if k not in strip
        }:
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self._bump(new["metadata"])
        obj.create(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(key)
        else:
            await self._emit(key[0], "MODIFIED", new)

    async def _create(self, resource: Any, namespace: str | None, data: dict[str, Any]) -> None:
        obj = copy.deepcopy(data)
        meta = obj.setdefault("metadata", {})
        if namespace:
            meta["namespace"] = namespace
        key = (resource, meta.get("namespace"), meta.get("name"))
        if self._live(key):
            raise KubernetesObjectConflictError(
                reason="AlreadyExists", message=f"{meta.get('name')} already exists"
            )
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if self._has_status(resource):
            obj["status"] = {"phase": "Pending"} if resource == kmock.resource(PODS) else {}
        self._bump(meta)
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        await self._emit(resource, "ADDED", obj)

    async def _handle(self, request: kmock.Request) -> Any:
        if self.accept is not None:
            headers = {k.lower(): v for k, v in request.headers.items()}
            token = headers.get("authorization", "").removeprefix("Bearer ")
            ok = self.accept(token)
            self.logins.append(
                (headers.get("user-agent", ""), request.url.path_qs, token, 200 if ok else 401)
            )
            if not ok:
                raise Unauthorized(status=401, reason="Unauthorized", message="Unauthorized")
        res, action = request.resource, request.action
        if res is not None and action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            async with self._lock:
                if action == enums.action.CREATE:
                    await self._create(res, request.namespace, request.data or {})
                else:
                    key = (res, request.namespace, request.name)
                    if request.name is None or not self._live(key):
                        raise KubernetesObjectNotFoundError()
                    if action == enums.action.UPDATE:
                        await self._write(key, request.data, request.subresource)
                    else:
                        await self._delete(key)
        # Render through the stock fallbacks (they read the state kept above).
        return await self._react(request)

    async def _react(self, request: kmock.Request) -> Any:
        """KMock's ``RawHandler._handle`` (first enabled reaction, by priority, that sees the request),
        with the membership test done on this one request.

        KMock asks ``request in reaction_source``, which replays every request served so far
        through the reaction's filters: 70 ms a GET after ~500 requests, quadratic over a run.
        """
        width = max((len(p.priorities) for p in self._payloads), default=0)
        ranked = sorted(  # highest priority first, shorter priorities padded with zeros (as KMock)
            self._payloads, key=lambda p: tuple(-x for x in p.priorities) + (0,) * (width - len(p.priorities))
        )
        for payload in ranked:
            if payload._disabled.is_set() or not self._sees(payload._source, request):
                continue
            try:
                return await payload(request)
            except rendering.ReactionMismatchError:  # mismatch or depletion, as in KMock
                payload._disabled.set()
            except NotImplementedError:  # matched but nothing to respond with
                pass
        raise NotImplementedError(f"no reaction for {request}")

    def _sees(self, view: Any, request: kmock.Request) -> bool:
        """``request in view`` in constant time for the filter/priority chains the emulator
        registers (a request passes such a chain iff it passes each filter); anything else
        (slices, groups, exclusions) gets KMock's own exact, scanning answer."""
        while view is not self:
            if type(view) is dsl.Filter:
                if not view.criteria(request):
                    return False
            elif type(view) is not dsl.Priority:
                return request in view
            view = view._source
        return True

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = dict(
            kv.split("=", 1) for kv in (request.params.get("labelSelector") or "").split(",") if "=" in kv
        )
        items = [o for o in result["items"] if _has_labels(o, selector)]
        return {"metadata": {"resourceVersion": str(self.last_rv)}, "items": items}

    # Used by the kubelet stand-in (same loop), with the same semantics as a /status PATCH.
    async def patch_status(self, resource: str, namespace: str | None, name: str, status: dict) -> None:
        key = (kmock.resource(resource), namespace, name)
        async with self._lock:
            if self._live(key):
                await self._write(key, {"status": status}, "status")

    async def finish_delete(self, resource: str, namespace: str | None, name: str) -> None:
        """The kubelet's last word on a deleted Pod: its containers ended, the object goes."""
        key = (kmock.resource(resource), namespace, name)
        async with self._lock:
            if self._live(key):
                await self._remove(key)

    async def bind(self, namespace: str, name: str, node: str) -> dict[str, Any] | None:
        """The scheduler's binding: ``spec.nodeName`` set, ``PodScheduled=True``; the bound Pod."""
        key = (kmock.resource(PODS), namespace, name)
        async with self._lock:
            if not self._live(key):
                return None
            scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
            await self._write(key, {"spec": {"nodeName": node}}, None)
            await self._write(key, {"status": {"conditions": [scheduled]}}, "status")
            return copy.deepcopy(self._objects[key].last.raw)

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict[str, Any] | None]:
        """Every version of an object, oldest first; None marks a deletion."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self._objects:
            return []
        return [None if v is None else copy.deepcopy(v.raw) for v in self._objects[key].history]

    def names(self, resource: str, namespace: str) -> set[str]:
        """Names of every object of this resource ever created in the namespace (deleted ones too)."""
        res = kmock.resource(resource)
        return {name for (r, ns, name) in self._objects if r == res and ns == namespace}

    def live_objects(self, resource: str) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        return [
            copy.deepcopy(o.last.raw) for (r, _, _), o in self._objects.items() if r == res and not o.deleted
        ]


_POD_NET = 77 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 150
"""Second octet of the loopback Pod addresses: one per test worker (pytest-xdist runs emulated
clusters side by side; a Pod's fixed container ports must not meet another worker's Pod)."""


@dataclass
class _Container:
    """One Pod's (first) container across its restarts, as the kubelet tracks it."""

    uid: str
    pod: dict[str, Any]
    probe_service: str
    metrics_port: int | None
    restart_policy: str
    popen: subprocess.Popen[bytes] | None = None
    port_file: Path | None = None
    health_file: Path | None = None
    """Where the run writes its health-only port (``--health-port``), if it serves one."""
    log: Path | None = None
    port: int | None = None
    """The running process's gRPC port, read from its own port file (None until it is written)."""
    named_files: dict[str, Path] = field(default_factory=dict)
    """Container port name → the port file of the flag that sets it (this run's)."""
    ready: bool = False
    ready_since: str = ""
    runs: int = 0
    """Processes started so far; the container's restartCount is one less."""
    exit_recorded: bool = False
    started_at: float = 0.0
    started_iso: str = ""
    last_exit: dict[str, Any] | None = None
    """``lastState.terminated`` of the previous run (exit code, reason, finishedAt)."""
    backoff_s: float = 0.0
    """Wait before the next restart; 0 until the first crash (the kubelet restarts that one at once)."""
    restart_at: float | None = None
    """When the exited container may start again (None: it runs, or it never restarts)."""
    reported: Any = None
    pod_scheduled_at: str = field(default_factory=_now)
    sd_file: Path | None = None
    """Its file_sd target file, written while the process runs (a scraped Pod only)."""
    ip: str = "127.0.0.1"
    """The Pod's IP: its own loopback address when it serves no data port (``--port``), so that a
    fixed container port (a profiler's control port) is reachable at podIP:port as in a cluster."""
    admitted_at: float = 0.0
    init_done: int = 0
    """Init containers that completed (they run in order, each to exit 0, before the container)."""
    init_popen: subprocess.Popen[bytes] | None = None
    init_log: Path | None = None
    init_statuses: list[dict[str, Any]] = field(default_factory=list)
    init_failed: bool = False
    """An init container failed under ``restartPolicy: Never``: the Pod has Failed."""
    init_restart_at: float | None = None
    config_error: str | None = None
    """Why the current init container cannot be created (a Secret, key or ConfigMap its
    environment names is missing): ``CreateContainerConfigError`` with this message."""
    deadline_exceeded: bool = False
    """``activeDeadlineSeconds`` passed: every container killed, the Pod Failed (DeadlineExceeded)."""

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Kubelet:
    """Runs shard Pods as local processes and Services as loopback proxies (see module docstring)."""

    emulator: Emulator
    workdir: Path
    env: dict[str, str]
    sd_dir: Path | None = None
    """Where file_sd target files of scraped Pods go (None: no service discovery)."""
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 300.0
    """CrashLoopBackOff: the kubelet's 10 s doubling to 5 min (tests may shorten both)."""
    procs: dict[tuple[str, str], _Container] = field(default_factory=dict)
    proxies: dict[tuple[str, str], tuple[asyncio.base_events.Server, int, dict[str, str]]] = field(
        default_factory=dict
    )
    ending: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    """Containers of deleted Pods between SIGTERM and their end (terminationGracePeriodSeconds)."""
    dead: set[str] = field(default_factory=set)
    """Nodes powered off (``power_off``)."""
    stalled: set[str] = field(default_factory=set)
    """Nodes whose containers died and cannot start again, their kubelet still reporting
    (``power_off(node, kubelet_alive=True)``)."""
    extra_proxies: dict[tuple[str, str, str], tuple[asyncio.base_events.Server, int]] = field(
        default_factory=dict
    )
    """(namespace, Service, target port name) → proxy of a Service's ports after its first."""
    _rr: itertools.count[int] = field(default_factory=itertools.count)
    _ips: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    node_local: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    """(namespace, Service) → node → address of a Service with ``internalTrafficPolicy: Local``
    whose Pods run outside this kubelet (the monitors: the tests start them as processes). Its
    address resolves to the endpoint on the Pod's own node, as kube-proxy routes it; on a node
    without one, to a port nobody listens on (kube-proxy drops the connection)."""
    pvc_root: Path | None = None
    """A PersistentVolumeClaim ``ns/claim`` (an object in the API) holds the files of
    ``pvc_root/ns/claim`` (default: ``workdir/pvcs``)."""

    def service_port(self, namespace: str, name: str) -> int | None:
        entry = self.proxies.get((namespace, name))
        return entry[1] if entry else None

    def _rewrite(
        self,
        args: list[str],
        namespace: str,
        port_file: Path,
        metrics_port: int | None,
        mounts: dict[str, Path] | None = None,
        ip: str = "127.0.0.1",
        node: str = "",
    ) -> list[str] | None:
        out: list[str] = []
        it = iter(args)
        for a in it:
            for mount_path, local in sorted((mounts or {}).items(), key=lambda m: -len(m[0])):
                if a == mount_path or a.startswith(mount_path + "/"):
                    a = str(local) + a[len(mount_path) :]
                    break  # the deepest mount holds the path (a rewritten path may be under /tmp)
            if a == "--port":
                next(it)
                out += ["--port", "0", "--port-file", str(port_file)]
            elif a == "--health-port":
                next(it)
                out += ["--health-port", "0", "--health-port-file", str(port_file.with_suffix(".health"))]
            elif a in _PORT_FLAGS:
                next(it)
                out += [a, "0", f"{a}-file", str(port_file.with_suffix(_PORT_FLAGS[a]))]
            elif a == "--host":
                next(it)
                out += ["--host", ip]
            elif a == "--metrics-port":
                next(it)  # many Pods on one host: no fixed metrics ports
                if metrics_port is not None:
                    out += ["--metrics-port", str(metrics_port)]
            elif ".svc:" in a:
                # Every Service address in the argument (a flag's value, or inside a tile
                # phase's JSON) resolves to its loopback proxy, as cluster DNS would.
                addresses = {m.group(0): (m["ns"], m["svc"]) for m in _SERVICE_ADDRESS.finditer(a)}
                for address, (ns, svc) in addresses.items():
                    if (ns, svc) in self.node_local:
                        a = a.replace(address, self.node_local[(ns, svc)].get(node, "127.0.0.1:9"))
                        continue
                    port = self.service_port(ns, svc)
                    if port is None:
                        return None  # the Service is not there yet: DNS would fail too
                    a = a.replace(address, f"127.0.0.1:{port}")
                out.append(a)
            else:
                out.append(a)
        return out

    def _admit(self, pod: dict[str, Any]) -> _Container:
        container = pod["spec"]["containers"][0]
        probe = ((container.get("readinessProbe") or {}).get("grpc") or {}).get("service", "")
        scraped = self.sd_dir is not None and _scraped(pod)
        ip = "127.0.0.1"
        if "--port" not in container.get("args", []):
            n = next(self._ips)
            ip = f"127.{_POD_NET}.{n // 250}.{n % 250 + 1}"
        return _Container(
            uid=pod["metadata"]["uid"],
            pod=pod,
            probe_service=probe,
            metrics_port=_free_port() if scraped else None,
            restart_policy=pod["spec"].get("restartPolicy", "Always"),
            ip=ip,
            admitted_at=time.monotonic(),
        )

    def _start(self, c: _Container) -> bool:
        """Start (or restart) the container's process, its init containers first; False while a
        Service, Secret or claim it needs is missing or an init container has not completed."""
        if c.deadline_exceeded or not self._initialised(c):
            return False
        meta = c.pod["metadata"]
        container = c.pod["spec"]["containers"][0]
        # A fresh port file per run: the dead run's file names a port nobody listens on.
        stem = f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}-{c.runs}"
        port_file = self.workdir / f"{stem}.port"
        port_file.unlink(missing_ok=True)
        port_file.with_suffix(".health").unlink(missing_ok=True)
        mounts = self._volumes(c, container, self.workdir / f"{stem}.volumes")
        if mounts is None:
            return False  # a Secret it mounts is not there yet: the kubelet waits too
        if c.metrics_port is not None:
            # A fresh port per run: one picked free may be taken (an outgoing connection's local
            # port) before the process binds it, and a restart must not fail the same way again.
            c.metrics_port = _free_port()
        args = self._rewrite(
            list(container.get("args", [])),
            meta["namespace"],
            port_file,
            c.metrics_port,
            mounts,
            c.ip,
            self._node(c.pod),
        )
        if args is None:
            return False
        command = [sys.executable if x == "python" else x for x in container.get("command", [])]
        resolved = self._env(meta["namespace"], container)
        if isinstance(resolved, str):
            return False
        env = {**self.env, **resolved}
        c.log = self.workdir / f"{stem}.log"
        with c.log.open("wb") as out:
            c.popen = subprocess.Popen(
                command + args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        c.runs += 1
        c.port_file, c.port, c.exit_recorded = port_file, None, False
        c.named_files = _named_port_files(container, port_file)
        health = "--health-port" in container.get("args", [])
        c.health_file = port_file.with_suffix(".health") if health else None
        c.started_at, c.started_iso, c.restart_at = time.monotonic(), _now(), None
        if c.metrics_port is not None and self.sd_dir is not None:
            c.sd_file = self.sd_dir / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}.json"
            _write_atomic(c.sd_file, json.dumps([_sd_target(c.pod, f"127.0.0.1:{c.metrics_port}")]))
        return True

    def _claim_dir(self, namespace: str, claim: str) -> Path:
        return (self.pvc_root or self.workdir / "pvcs") / namespace / claim

    def _missing_claim(self, pod: dict[str, Any]) -> str | None:
        """A PersistentVolumeClaim the Pod mounts that has no object in the API (the scheduler
        leaves such a Pod unscheduled), or None."""
        ns = pod["metadata"]["namespace"]
        claims = {
            o["metadata"]["name"]
            for o in self.emulator.live_objects(PVCS)
            if o["metadata"]["namespace"] == ns
        }
        wanted = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"].get("volumes", [])
            if "persistentVolumeClaim" in v
        ]
        return next((c for c in wanted if c not in claims), None)

    def _volumes(self, c: _Container, container: dict[str, Any], root: Path) -> dict[str, Path] | None:
        """mountPath → local directory of each of ``container``'s volumes: its Secret items
        written afresh (None while a Secret is missing), a Pod-long ``emptyDir``, a claim's directory."""
        mounts = self._secret_volumes(c.pod, container, root)
        if mounts is None:
            return None
        meta = c.pod["metadata"]
        volumes = {v["name"]: v for v in c.pod["spec"].get("volumes", [])}
        for m in container.get("volumeMounts", []):
            v = volumes.get(m["name"], {})
            if "emptyDir" in v:
                local = self.workdir / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}.{m['name']}"
                local.mkdir(mode=0o700, exist_ok=True)
                mounts[m["mountPath"]] = local
            elif "persistentVolumeClaim" in v:
                mounts[m["mountPath"]] = self._claim_dir(
                    meta["namespace"], v["persistentVolumeClaim"]["claimName"]
                )
        return mounts

    def _initialised(self, c: _Container) -> bool:
        """Run the Pod's init containers in order, one step per sync; True once all exited 0."""
        inits = c.pod["spec"].get("initContainers") or []
        now = time.monotonic()
        while c.init_done < len(inits):
            spec = inits[c.init_done]
            if c.init_popen is None:
                if c.init_failed or (c.init_restart_at is not None and now < c.init_restart_at):
                    return False
                meta = c.pod["metadata"]
                stem = f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}-init"
                stem += f"{c.init_done}-{len(c.init_statuses)}"
                mounts = self._volumes(c, spec, self.workdir / f"{stem}.volumes")
                if mounts is None:
                    return False
                args = self._rewrite(
                    list(spec.get("args", [])),
                    meta["namespace"],
                    Path(os.devnull),
                    None,
                    mounts,
                    node=self._node(c.pod),
                )
                if args is None:
                    return False
                command = [sys.executable if x == "python" else x for x in spec.get("command", [])]
                resolved = self._env(meta["namespace"], spec)
                c.config_error = resolved if isinstance(resolved, str) else None
                if isinstance(resolved, str):
                    return False  # the kubelet retries, reporting CreateContainerConfigError
                env = {**self.env, **resolved}
                c.init_log = self.workdir / f"{stem}.log"
                with c.init_log.open("wb") as out:
                    c.init_popen = subprocess.Popen(
                        command + args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
                    )
                return False
            code = c.init_popen.poll()
            if code is None:
                return False
            c.init_popen = None
            terminated: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
            if code != 0 and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" and c.init_log:
                lines = c.init_log.read_text(errors="replace").splitlines()[-80:]  # a kubelet's tail
                terminated["message"] = "\n".join(lines)[-2048:]
            c.init_statuses.append({"name": spec["name"], "terminated": terminated})
            if code == 0:
                c.init_done += 1
                continue
            if c.restart_policy == "Never":
                c.init_failed = True
            else:
                c.init_restart_at = now + max(c.backoff_s, 1.0)
                c.backoff_s = min(self.backoff_max_s, max(self.backoff_initial_s, 2 * c.backoff_s))
            return False
        return True

    def _env(self, namespace: str, container: dict[str, Any]) -> dict[str, str] | str:
        """A container's environment: ``value``, or ``valueFrom`` a Secret's or ConfigMap's key
        (skipped when ``optional`` and missing); the kubelet's message when one is missing."""
        out: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                out[e["name"]] = e["value"]
                continue
            source = e.get("valueFrom") or {}
            kind, ref = next((k, source[k]) for k in ("secretKeyRef", "configMapKeyRef") if k in source)
            resource, noun = (SECRETS, "secret") if kind == "secretKeyRef" else (CONFIGMAPS, "configmap")
            obj = next(
                (
                    o
                    for o in self.emulator.live_objects(resource)
                    if o["metadata"]["namespace"] == namespace and o["metadata"]["name"] == ref["name"]
                ),
                None,
            )
            data = (obj or {}).get("data") or {}
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                if obj is None:
                    return f'{noun} "{ref["name"]}" not found'
                return f"couldn't find key {ref['key']} in {noun.capitalize()} {namespace}/{ref['name']}"
            value = data[ref["key"]]
            out[e["name"]] = base64.b64decode(value).decode() if resource == SECRETS else value
        return out

    def _secret_volumes(
        self, pod: dict[str, Any], container: dict[str, Any], root: Path
    ) -> dict[str, Path] | None:
        """Write each Secret volume's items (0700 directory, the volume's mode) → mountPath: local dir."""
        ns = pod["metadata"]["namespace"]
        secrets = {
            o["metadata"]["name"]: o
            for o in self.emulator.live_objects(SECRETS)
            if o["metadata"]["namespace"] == ns
        }
        volumes = {v["name"]: v["secret"] for v in pod["spec"].get("volumes", []) if "secret" in v}
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts", []):
            source = volumes.get(m["name"])
            if source is None:
                continue
            secret = secrets.get(source["secretName"])
            if secret is None:
                return None
            data = secret.get("data") or {}
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            if any(i["key"] not in data for i in items):
                return None
            local = root / m["name"]
            local.mkdir(mode=0o700, parents=True, exist_ok=True)
            for item in items:
                path = local / item["path"]
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, source.get("defaultMode", 0o644))
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(data[item["key"]]))
            mounts[m["mountPath"]] = local
        return mounts

    def _exited(self, c: _Container, code: int, now: float) -> None:
        """Record a run's end and, per restartPolicy, when the next run may start."""
        _forget_target(c)
        c.port, c.exit_recorded = None, True
        c.last_exit = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_iso,
            "finishedAt": _now(),
        }
        if c.restart_policy == "Never" or (c.restart_policy == "OnFailure" and code == 0):
            return
        # ``now`` is the sync's: the first restart (no back-off) is due in this very sync, and its
        # status never says CrashLoopBackOff (a kubelet backs off only from the second crash).
        if now - c.started_at > 2 * self.backoff_max_s:
            c.backoff_s = 0.0  # ran long enough: the kubelet forgets the back-off
        c.restart_at = now + c.backoff_s
        c.backoff_s = min(self.backoff_max_s, max(self.backoff_initial_s, 2 * c.backoff_s))

    async def _probe(self, c: _Container) -> bool:
        if not c.running:
            return False
        has_port = "--port" in c.pod["spec"]["containers"][0].get("args", [])
        if c.port is None and has_port:
            assert c.port_file is not None
            try:
                c.port = int(c.port_file.read_text())
            except (OSError, ValueError):  # not written yet, or half written
                return False
        # Under mutual TLS the kubelet probes the plaintext health-only port, as a real one does.
        probe_port = c.port
        if c.health_file is not None:
            try:
                probe_port = int(c.health_file.read_text())
            except (OSError, ValueError):
                return False
        try:
            if probe_port is None:
                return False
            async with grpc.aio.insecure_channel(f"{c.ip}:{probe_port}") as channel:
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=c.probe_service), timeout=1.0
                )
            return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    @staticmethod
    def _terminate(c: _Container, grace_s: float) -> None:
        """SIGTERM, then SIGKILL once the grace period is over, as a kubelet (in a thread)."""
        _forget_target(c)
        if c.init_popen is not None and c.init_popen.poll() is None:
            c.init_popen.kill()
            c.init_popen.wait()
        if c.popen is not None and c.popen.poll() is None:
            c.popen.send_signal(signal.SIGTERM)
            try:
                c.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                c.popen.kill()
                c.popen.wait()

    async def _end(self, key: tuple[str, str], c: _Container, grace_s: float, remove: bool) -> None:
        try:
            await asyncio.to_thread(self._terminate, c, grace_s)
            if remove:
                await self.emulator.finish_delete(PODS, key[0], key[1])
        finally:
            self.ending.pop(key, None)

    def _node(self, pod: dict[str, Any]) -> str:
        spec = pod["spec"]
        return spec.get("nodeName") or (spec.get("nodeSelector") or {}).get("kubernetes.io/hostname", "")

    async def _schedule(self, pods: dict[tuple[str, str], dict[str, Any]]) -> None:
        """The scheduler's part: bind each unbound Pod, oldest first, to a node that matches its
        nodeSelector, tolerates its taints and has room for its requests (allocatable less the
        requests of the Pods bound there); else PodScheduled=False, Unschedulable, and why."""
        nodes = sorted(self.emulator.live_objects(NODES), key=lambda n: n["metadata"]["name"])
        used: dict[str, dict[str, float]] = {}
        for p in pods.values():
            bound = (p.get("spec") or {}).get("nodeName")
            if bound and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                for k, v in pod_requests(p).items():
                    used.setdefault(bound, {}).setdefault(k, 0.0)
                    used[bound][k] += v
        waiting = [
            p for p in pods.values()
            if not p["spec"].get("nodeName") and not p["metadata"].get("deletionTimestamp")
        ]  # fmt: skip
        waiting.sort(key=lambda p: int(p["metadata"]["resourceVersion"]))
        for pod in waiting:
            meta = pod["metadata"]
            fits, reasons = None, []
            claim = self._missing_claim(pod)
            for node in nodes if claim is None else ():
                why = _unfit(pod, node, used.get(node["metadata"]["name"], {}))
                if why:
                    reasons += why
                elif fits is None:
                    fits = node["metadata"]["name"]
            if fits is None:
                counts: dict[str, int] = {}
                for r in reasons:
                    counts[r] = counts.get(r, 0) + 1
                detail = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
                message = f"0/{len(nodes)} nodes are available" + (f": {detail}." if detail else ".")
                if claim is not None:
                    message = f'persistentvolumeclaim "{claim}" not found'
                scheduled = {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                }
                conditions = (pod.get("status") or {}).get("conditions") or ()
                old = next((c for c in conditions if c["type"] == "PodScheduled"), None)
                if old is None or old.get("message") != message:
                    scheduled["lastTransitionTime"] = (old or {}).get("lastTransitionTime") or _now()
                    status = {"phase": "Pending", "conditions": [scheduled]}
                    await self.emulator.patch_status(PODS, meta["namespace"], meta["name"], status)
                continue
            for k, v in pod_requests(pod).items():
                used.setdefault(fits, {}).setdefault(k, 0.0)
                used[fits][k] += v
            bound = await self.emulator.bind(meta["namespace"], meta["name"], fits)
            if bound is not None:
                pods[(meta["namespace"], meta["name"])] = bound

    def power_off(self, node: str, kubelet_alive: bool = False) -> list[tuple[str, str]]:
        """The node dies: its containers are killed (SIGKILL) and nothing on it runs, restarts or
        reports again; Pods stay as last reported (a dead kubelet says nothing). With
        ``kubelet_alive`` only the containers die and cannot start again (the runtime is gone),
        while the kubelet reports them down and the Node stays Ready. Returns the Pods hit."""
        (self.stalled if kubelet_alive else self.dead).add(node)
        hit = []
        for key, c in self.procs.items():
            if self._node(c.pod) == node:
                hit.append(key)
                if c.running:
                    assert c.popen is not None
                    c.popen.kill()
                    c.popen.wait()
                _forget_target(c)
        return hit

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal a Pod's running container process (a crash); returns its pid."""
        c = self.procs[(namespace, name)]
        assert c.popen is not None and c.running, f"{namespace}/{name} runs no process"
        c.popen.send_signal(sig)
        return c.popen.pid

    async def sync(self) -> None:
        services = {
            (s["metadata"]["namespace"], s["metadata"]["name"]): s
            for s in self.emulator.live_objects(SERVICES)
        }
        for key in list(self.proxies):
            if key not in services:
                server, _, _ = self.proxies.pop(key)
                server.close()
        for extra in list(self.extra_proxies):
            if extra[:2] not in services:
                self.extra_proxies.pop(extra)[0].close()
        for key, svc in services.items():
            for p in ((svc.get("spec") or {}).get("ports") or [])[1:]:
                extra = (*key, str(p.get("targetPort", p.get("name", ""))))
                if extra not in self.extra_proxies:
                    server = await asyncio.start_server(
                        lambda r, w, k=key, t=extra[2]: self._forward(k, r, w, t), "127.0.0.1", 0
                    )
                    self.extra_proxies[extra] = (server, server.sockets[0].getsockname()[1])
        for key, svc in services.items():
            selector = (svc.get("spec") or {}).get("selector") or {}
            if key not in self.proxies:
                server = await asyncio.start_server(
                    lambda r, w, k=key: self._forward(k, r, w), "127.0.0.1", 0
                )
                self.proxies[key] = (server, server.sockets[0].getsockname()[1], selector)
            else:
                server, port, _ = self.proxies[key]
                self.proxies[key] = (server, port, selector)
        pods = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.emulator.live_objects(PODS)
        }
        nodes = {n["metadata"]["name"] for n in self.emulator.live_objects(NODES)}
        for key in list(self.procs):
            pod = pods.get(key)
            same = pod is not None and pod["metadata"]["uid"] == self.procs[key].uid
            if same and self._node(pod) in self.dead and self._node(pod) in nodes:
                continue  # a dead node's kubelet ends nothing (the Pod stays Terminating)
            if not same or pod["metadata"].get("deletionTimestamp"):
                c = self.procs.pop(key)
                grace = float(pod["metadata"].get("deletionGracePeriodSeconds", 30)) if same else 0.0
                self.ending[key] = asyncio.create_task(self._end(key, c, grace, remove=same))
        await self._schedule(pods)
        for key, pod in pods.items():
            meta = pod["metadata"]
            if not (pod.get("spec") or {}).get("nodeName"):
                if meta.get("deletionTimestamp"):  # never bound: nothing to end, the object goes
                    await self.emulator.finish_delete(PODS, key[0], key[1])
                continue  # not bound (Pending, Unschedulable): no kubelet runs it
            if meta.get("deletionTimestamp"):
                dead_here = self._node(pod) in self.dead and self._node(pod) in nodes
                if key not in self.procs and key not in self.ending and not dead_here:
                    # Nothing runs it (never started, or its node object is gone: the Pod GC's job).
                    await self.emulator.finish_delete(PODS, key[0], key[1])
            elif key not in self.procs and key not in self.ending:
                self.procs[key] = self._admit(pod)
        now = time.monotonic()
        for key, c in list(self.procs.items()):
            if self._node(c.pod) in self.dead:
                continue  # nothing runs, restarts or reports there
            stalled = self._node(c.pod) in self.stalled
            deadline = c.pod["spec"].get("activeDeadlineSeconds")
            if deadline and not c.deadline_exceeded and now - c.admitted_at > float(deadline):
                c.deadline_exceeded = True  # the kubelet kills every container; the Pod Failed
                for proc in (c.init_popen, c.popen):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                        proc.wait()
            if c.popen is None:
                if not stalled:
                    self._start(c)
            elif c.popen.poll() is not None:
                if not c.exit_recorded:
                    self._exited(c, c.popen.returncode, now)
                if c.restart_at is not None and now >= c.restart_at and not stalled:
                    self._start(c)
            ready = await self._probe(c)
            if c.popen is not None and c.popen.poll() is not None and not c.exit_recorded:
                self._exited(c, c.popen.returncode, now)  # it ended during the probe
            ready = ready and c.running  # an answer from a process that has since died is no Ready
            if ready != c.ready or not c.ready_since:
                c.ready, c.ready_since = ready, _now()
            state, status = _pod_status(c, now)
            if state != c.reported:
                c.reported = state
                await self.emulator.patch_status(PODS, key[0], key[1], status)

    def _endpoints(self, key: tuple[str, str], target: str | None = None) -> list[int]:
        """Ports of the ready Pods the Service's selector (as last synced) matches: their gRPC
        port, or the one of the container port named ``target``."""
        _, _, selector = self.proxies[key]
        if not selector:
            return []
        pods = {
            (p["metadata"]["namespace"], p["metadata"]["name"]): p
            for p in self.emulator.live_objects(PODS)
            if p["metadata"]["namespace"] == key[0]
        }
        matched = [
            c
            for k, c in self.procs.items()
            if c.ready and c.running and c.port is not None and k in pods and _has_labels(pods[k], selector)
        ]
        if target is None:
            return sorted(c.port for c in matched if c.port is not None)
        return sorted(p for c in matched if (p := _read_port(c.named_files.get(target))) is not None)

    async def routed_port(self, namespace: str, name: str, target: str | None = None) -> int | None:
        """The Service's loopback port once its proxy routes as the Service now says (the
        selector synced and at least one ready Pod behind it); None until then. ``target``: the
        port of the Service whose targetPort has that name (not the first)."""
        key = (namespace, name)
        svc = next(
            (
                s
                for s in self.emulator.live_objects(SERVICES)
                if (s["metadata"]["namespace"], s["metadata"]["name"]) == key
            ),
            None,
        )
        if svc is None or key not in self.proxies:
            return None
        _, port, selector = self.proxies[key]
        if target is not None:
            if (*key, target) not in self.extra_proxies:
                return None
            port = self.extra_proxies[(*key, target)][1]
        if selector != ((svc.get("spec") or {}).get("selector") or {}) or not self._endpoints(key, target):
            return None
        return port

    async def _forward(
        self,
        key: tuple[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: str | None = None,
    ) -> None:
        ports = self._endpoints(key, target) if key in self.proxies else []
        if not ports:
            writer.close()
            return
        port = ports[next(self._rr) % len(ports)]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception as exc:  # keep the kubelet alive; the test sees the symptom
                print(f"kubelet: {type(exc).__name__}: {exc}", file=sys.stderr)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)
        for c in self.procs.values():
            await asyncio.to_thread(self._terminate, c, 5.0)
        if self.ending:
            await asyncio.gather(*self.ending.values(), return_exceptions=True)
        for server, _, _ in self.proxies.values():
            server.close()
        for server, _ in self.extra_proxies.values():
            server.close()


_PORT_FLAGS = {"--v2-http-port": ".v2-http", "--v2-grpc-port": ".v2-grpc"}
"""Port flags the kubelet rewrites to a free port and a port file (``<flag>-file``), beside
``--port`` and ``--health-port``."""


_SERVICE_ADDRESS = re.compile(r"(?P<svc>[a-z0-9][-a-z0-9]*)\.(?P<ns>[a-z0-9][-a-z0-9]*)\.svc:\d+")
"""``<service>.<namespace>.svc:<port>``, wherever it appears in an argument."""


def _named_port_files(container: dict[str, Any], port_file: Path) -> dict[str, Path]:
    """Container port name → the port file of the flag whose value is that containerPort."""
    args = list(container.get("args", []))
    files = {"--port": port_file, **{f: port_file.with_suffix(x) for f, x in _PORT_FLAGS.items()}}
    by_value = {args[i + 1]: files[a] for i, a in enumerate(args[:-1]) if a in files}
    return {
        p["name"]: by_value[str(p["containerPort"])]
        for p in container.get("ports", [])
        if "name" in p and str(p["containerPort"]) in by_value
    }


def _read_port(path: Path | None) -> int | None:
    try:
        return int(path.read_text()) if path is not None else None
    except (OSError, ValueError):  # not written yet, or half written
        return None


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity(text: Any) -> float:
    """A Kubernetes quantity as a number: ``500m`` → 0.5, ``2Gi`` → 2147483648."""
    text = str(text)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def pod_requests(pod: dict[str, Any]) -> dict[str, float]:
    """What the scheduler counts for a Pod: the sum of its containers' requests, or its largest
    init container's where that is more."""
    spec = pod.get("spec") or {}

    def of(container: dict[str, Any]) -> dict[str, float]:
        asked = (container.get("resources") or {}).get("requests") or {}
        return {k: quantity(v) for k, v in asked.items() if k in ("cpu", "memory")}

    total: dict[str, float] = {}
    for c in spec.get("containers") or ():
        for k, v in of(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers") or ():
        for k, v in of(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


def _tolerates(pod: dict[str, Any], taint: dict[str, Any]) -> bool:
    for t in (pod.get("spec") or {}).get("tolerations") or ():
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _unfit(pod: dict[str, Any], node: dict[str, Any], used: dict[str, float]) -> list[str]:
    """Why the scheduler would not bind ``pod`` to ``node`` (its filter plugins' reasons), or []."""
    spec = pod.get("spec") or {}
    labels = node["metadata"].get("labels") or {}
    if spec.get("nodeName") and spec["nodeName"] != node["metadata"]["name"]:
        return ["node(s) didn't match the requested node name"]
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return ["node(s) didn't match Pod's node affinity/selector"]
    conditions = (node.get("status") or {}).get("conditions") or ()
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    taints = list((node.get("spec") or {}).get("taints") or ())
    if ready is not None and ready.get("status") != "True":  # the node lifecycle controller's taint
        taints.append({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(pod, taint):
            return [f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"]
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    short = []
    for resource, asked in sorted(pod_requests(pod).items()):
        left = quantity(allocatable[resource]) - used.get(resource, 0.0) if resource in allocatable else None
        if left is not None and asked > left + 1e-9:
            short.append(f"Insufficient {resource}")
    return short


def _scraped(pod: dict[str, Any]) -> bool:
    annotations = pod["metadata"].get("annotations") or {}
    return annotations.get("prometheus.io/scrape") == "true"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meta_name(key: str) -> str:
    """Prometheus' label-name sanitising (``amp4ec.io/stage`` → ``amp4ec_io_stage``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _sd_target(pod: dict[str, Any], address: str) -> dict[str, Any]:
    """One file_sd target group with the ``__meta_kubernetes_pod_*`` labels of kubernetes_sd's pod role."""
    meta = pod["metadata"]
    labels = {
        "__meta_kubernetes_namespace": meta["namespace"],
        "__meta_kubernetes_pod_name": meta["name"],
        "__meta_kubernetes_pod_uid": meta["uid"],
        "__meta_kubernetes_pod_node_name": (pod["spec"].get("nodeSelector") or {}).get(
            "kubernetes.io/hostname", ""
        ),
    }
    for k, v in (meta.get("labels") or {}).items():
        labels[f"__meta_kubernetes_pod_label_{_meta_name(k)}"] = v
    for k, v in (meta.get("annotations") or {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{_meta_name(k)}"] = v
    return {"targets": [address], "labels": labels}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # Prometheus never reads half a file


def _forget_target(c: _Container) -> None:
    if c.sd_file is not None:
        c.sd_file.unlink(missing_ok=True)


def _has_labels(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _init_statuses(c: _Container, inits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``initContainerStatuses``: done ones terminated, the current one running (or terminated
    when it failed), later ones waiting."""
    last = {s["name"]: s["terminated"] for s in c.init_statuses}
    out = []
    for n, spec in enumerate(inits):
        name = spec["name"]
        if n < c.init_done or (n == c.init_done and c.init_popen is None and name in last):
            state: dict[str, Any] = {"terminated": last[name]}
        elif n == c.init_done and c.init_popen is not None:
            state = {"running": {}}
        elif n == c.init_done and c.config_error is not None:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": c.config_error}}
        else:
            state = {"waiting": {"reason": "PodInitializing"}}
        out.append({"name": name, "state": state, "ready": n < c.init_done})
    return out


def _pod_status(c: _Container, now: float) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The Pod status a kubelet reports for this container: phase, Ready/ContainersReady and
    containerStatuses (state, lastState, restartCount, ready); with the fields that matter for
    a change first (timestamps alone do not make a new status)."""
    restarts = max(0, c.runs - 1)
    state: dict[str, Any]
    inits = c.pod["spec"].get("initContainers") or []
    extra: dict[str, Any] = {}
    if c.deadline_exceeded:
        phase, state = "Failed", {"terminated": {"exitCode": 137, "reason": "Error"}}
        extra = {
            "reason": "DeadlineExceeded",
            "message": "Pod was active on the node longer than the specified deadline",
        }
    elif c.popen is None and c.init_failed:
        phase, state = "Failed", {"waiting": {"reason": "PodInitializing"}}
    elif c.popen is None and c.init_done < len(inits):
        phase, state = "Pending", {"waiting": {"reason": "PodInitializing"}}
    elif c.popen is None:
        phase, state = "Pending", {"waiting": {"reason": "ContainerCreating"}}
    elif c.running:
        phase, state = "Running", {"running": {"startedAt": c.started_iso}}
    elif c.restart_at is not None and c.restart_at > now:
        wait_s = round(c.restart_at - now)
        message = f"back-off {wait_s}s restarting failed container"
        phase, state = "Running", {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
    elif c.restart_at is not None:
        phase, state = "Running", {"terminated": c.last_exit}  # restarting at the next sync
    else:  # restartPolicy says never again
        code = (c.last_exit or {}).get("exitCode", 1)
        phase, state = ("Succeeded" if code == 0 else "Failed"), {"terminated": c.last_exit}
    ready = "True" if c.ready else "False"
    container: dict[str, Any] = {
        "name": c.pod["spec"]["containers"][0]["name"],
        "ready": c.ready,
        "started": c.running,
        "restartCount": restarts,
        "state": state,
        "lastState": {"terminated": c.last_exit} if c.last_exit and not {"terminated"} & set(state) else {},
    }
    status: dict[str, Any] = {
        "phase": phase,
        "podIP": c.ip,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": c.pod_scheduled_at},
            {"type": "Ready", "status": ready, "lastTransitionTime": c.ready_since},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": c.ready_since},
        ],
        "containerStatuses": [container],
        **extra,
    }
    if inits:
        status["initContainerStatuses"] = _init_statuses(c, inits)
    (kind,) = state
    init_key = tuple((s["name"], s["terminated"]["exitCode"]) for s in c.init_statuses)
    key = (phase, c.ready, restarts, kind, state[kind].get("reason"), init_key, c.init_done, c.config_error)
    return key, status


class FakeCluster:
    """The emulator, its HTTP server and the kubelet on an event loop in a background thread."""

    def __init__(self, workdir: Path, env: dict[str, str], **kubelet: Any) -> None:
        self.workdir = workdir
        self.env = env
        self.kubelet_options = kubelet
        """Extra ``Kubelet`` fields (e.g. a shorter CrashLoopBackOff)."""
        self.sd_dir = workdir / "pods-sd"
        """file_sd target files of scraped Pods (the test Prometheus reads ``*.json`` here)."""
        self.sd_dir.mkdir(exist_ok=True)
        self.url = ""
        self.emulator: Emulator | None = None
        self.kubelet: Kubelet | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="fake-cluster")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.kubelet = Kubelet(
                emulator, self.workdir, self.env, sd_dir=self.sd_dir, **self.kubelet_options
            )
            self._ready.set()
            await self.kubelet.run(self._stop)

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("fake cluster did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run a coroutine function on the cluster's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(30)

    def service_port(self, namespace: str, name: str) -> int | None:
        assert self.kubelet is not None
        return self.kubelet.service_port(namespace, name)

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """Where the files of PersistentVolumeClaim ``namespace/claim`` live (created)."""
        assert self.kubelet is not None
        path = self.kubelet._claim_dir(namespace, claim)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def routed_port(self, namespace: str, name: str, target: str | None = None) -> int | None:
        """See ``Kubelet.routed_port`` (read on the cluster's loop, between syncs)."""
        assert self.kubelet is not None
        return self.call(self.kubelet.routed_port, namespace, name, target)

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict[str, Any] | None]:
        """See ``Emulator.history`` (read on the cluster's loop, between writes)."""
        assert self.emulator is not None

        async def read() -> list[dict[str, Any] | None]:
            return self.emulator.history(resource, namespace, name)  # type: ignore[union-attr]

        return self.call(read)

    def names(self, resource: str, namespace: str) -> set[str]:
        """See ``Emulator.names`` (read on the cluster's loop)."""
        assert self.emulator is not None

        async def read() -> set[str]:
            return self.emulator.names(resource, namespace)  # type: ignore[union-attr]

        return self.call(read)

    def power_off(self, node: str, kubelet_alive: bool = False) -> list[tuple[str, str]]:
        """See ``Kubelet.power_off`` (on the cluster's loop)."""
        assert self.kubelet is not None

        async def run() -> list[tuple[str, str]]:
            return self.kubelet.power_off(node, kubelet_alive)  # type: ignore[union-attr]

        return self.call(run)

    def power_on(self, node: str) -> None:
        """The node's kubelet is back (what it ran is gone; Pods still on it start again)."""
        assert self.kubelet is not None

        async def run() -> None:
            self.kubelet.dead.discard(node)  # type: ignore[union-attr]
            self.kubelet.stalled.discard(node)  # type: ignore[union-attr]

        self.call(run)

    def kill(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """See ``Kubelet.kill`` (on the cluster's loop)."""
        assert self.kubelet is not None

        async def run() -> int:
            return self.kubelet.kill(namespace, name, sig)  # type: ignore[union-attr]

        return self.call(run)

    def pod_processes(self, namespace: str) -> list[tuple[str, str]]:
        """Pods of the namespace the kubelet still runs (or restarts)."""
        assert self.kubelet is not None

        async def keys() -> list[tuple[str, str]]:
            kubelet = self.kubelet
            assert kubelet is not None
            return [k for k in (*kubelet.procs, *kubelet.ending) if k[0] == namespace]

        return self.call(keys)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "kmock", "user": {"token": "test"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                    "current-context": "kmock",
                }
            )
        )
        return path


class Kubectl:
    """A few kubectl verbs over the REST API (sync; for test code)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": ctype, **self.headers}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    @staticmethod
    def path(resource: str, namespace: str | None, name: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        base = f"/api/{group_version}" if group_version == "v1" else f"/apis/{group_version}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return f"{path}/{name}" if name else path

    def create(self, resource: str, obj: dict[str, Any]) -> Any:
        created = self._call("POST", self.path(resource, obj["metadata"].get("namespace")), obj)
        if resource == NODES and obj.get("status"):  # a kubelet registers its Node, then reports status
            path = self.path(resource, None, obj["metadata"]["name"]) + "/status"
            created = self._call("PATCH", path, {"status": obj["status"]}, "application/merge-patch+json")
        return created

    def get(self, resource: str, namespace: str | None, name: str) -> Any:
        return self._call("GET", self.path(resource, namespace, name))

    def list(self, resource: str, namespace: str | None = None, selector: str = "") -> list[dict[str, Any]]:
        suffix = f"?labelSelector={selector}" if selector else ""
        return (self._call("GET", self.path(resource, namespace) + suffix) or {}).get("items", [])

    def patch(self, resource: str, namespace: str | None, name: str, body: Any) -> Any:
        return self._call("PATCH", self.path(resource, namespace, name), body, "application/merge-patch+json")

    def delete(self, resource: str, namespace: str | None, name: str) -> Any:
        return self._call("DELETE", self.path(resource, namespace, name))


def environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of processes the tests start: the repo root importable (tests.model_zoo)."""
    # The agents' own check: Profile and LoadStage import factories only from these modules (as
    # the chart passes operator.allowedFactoryModules, here "tests").
    env = {**os.environ, "AMP4EC_ALLOW_FACTORIES": "tests", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env
