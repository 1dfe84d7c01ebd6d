"""The operator's single start-up hook: kopf settings under our own prefix, and clients into memo;
and kopf's login, from the same credentials as the operator's own client (``k8s.Credentials``).

No module-level clients and no environment reads anywhere else: ``OperatorConfig.from_env``
runs here, once, and everything a handler needs comes from ``memo.deps``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import kopf

from amp4ec import pki
from amp4ec.errors import InvalidSpec
from amp4ec.operator import certs
from amp4ec.operator.capacity import Prometheus
from amp4ec.operator.config import OperatorConfig
from amp4ec.operator.k8s import Credentials, Kube, KubeUnavailable, NoCredentials, login
from amp4ec.operator.profiles import Profiler
from amp4ec.operator.reconcile import Deps
from amp4ec.wire.transport import TransportSecurity

__all__ = ["authenticate", "configure", "shutdown"]


@kopf.on.login()
async def authenticate(**_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials, loaded as the operator's client loads its own (in-cluster, else the
    kubeconfig with its exec plugins); kopf calls this again after a 401 or at the token's end."""
    try:
        return await login(Credentials())
    except NoCredentials as exc:
        raise kopf.PermanentError(str(exc)) from None
    except KubeUnavailable as exc:  # e.g. an exec plugin that failed: try again
        raise kopf.TemporaryError(str(exc), delay=10) from None


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
) -> None:
    config = OperatorConfig.from_env()
    settings.persistence.finalizer = "amp4ec.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="amp4ec.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="amp4ec.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.peering.standalone = True  # one replica (see manifests/operator.yaml)

    kube = Kube(Credentials())
    ca, security = None, TransportSecurity.plaintext()
    if config.issuer() is not None:
        # cert-manager issues every leaf: this process's own (operator.amp4ec) is the Secret of
        # the chart's Certificate, mounted at tls_dir and re-read when renewed (profiles.py).
        folder = Path(config.tls_dir)
        try:
            security = TransportSecurity.from_files(
                folder / "ca.crt", folder / "tls.crt", folder / "tls.key", flags="AMP4EC_TLS_DIR: "
            )
        except InvalidSpec as exc:
            raise kopf.PermanentError(str(exc)) from None
        if security.identity != pki.OPERATOR:
            found = f"{folder / 'tls.crt'} is for {security.identity!r}"
            raise kopf.PermanentError(f"AMP4EC_TLS_DIR: {found}, expected {pki.OPERATOR!r}")
    elif config.tls:
        # The CA (created when missing), the monitors' leaf, and this process's own leaf,
        # which never leaves memory: the operator is the only "operator.amp4ec".
        ca = await certs.ensure_ca(kube, config.namespace)
        await certs.ensure_monitors(kube, ca, config.namespace)
        # As long as the CA: whoever reads this process's memory has the CA key anyway.
        own = ca.issue(pki.OPERATOR, ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc)
        security = TransportSecurity(ca.cert_pem, own.cert_pem, own.key_pem)
    memo.deps = Deps(
        kube=kube,
        prometheus=Prometheus(config.prometheus_url, timeout_s=config.prometheus_timeout_s),
        profiler=Profiler(kube, config, security, ca),
        config=config,
        ca=ca,
    )
    memo.locks = {}  # deployment uid → asyncio.Lock: the handlers and the timer take turns
    memo.shard_health = {}  # (namespace, Pod) → what watch.py last saw of a shard's health
    memo.node_ready = {}  # Node → Ready as watch.py last saw it

    from prometheus_client import start_http_server

    server, _thread = start_http_server(config.operator_metrics_port)
    memo.metrics_server = server
    port = server.server_port
    if config.metrics_port_file:
        tmp = Path(config.metrics_port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.metrics_port_file)
    logger.info("operator metrics on :%d; Prometheus %s", port, config.prometheus_url)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    deps: Deps | None = getattr(memo, "deps", None)
    if deps is not None:
        await asyncio.gather(deps.kube.close(), deps.prometheus.close(), deps.profiler.close())
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        server.shutdown()
