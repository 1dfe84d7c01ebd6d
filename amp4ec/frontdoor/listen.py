"""The front door's listeners: v2 REST and gRPC on one host, over TLS or (explicitly) plaintext.

Under TLS both present the same certificate and, when client authentication is on, require
a client certificate from the same CA whose identities ``authorise`` accepts: the REST side
answers 403 and the gRPC side PERMISSION_DENIED otherwise; a certificate from another CA (or
none) fails the handshake. Renewed certificate files are picked up without a restart: gRPC
at its next handshake (``transport.add_port``), REST by a check every ``RENEWAL_CHECK_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field

import grpc
from aiohttp import web

from amp4ec.frontdoor import grpc as v2_grpc
from amp4ec.frontdoor import rest
from amp4ec.frontdoor.door import FrontDoor
from amp4ec.wire.transport import TransportSecurity

__all__ = ["RENEWAL_CHECK_S", "Listeners", "start"]

log = logging.getLogger(__name__)
RENEWAL_CHECK_S = 60.0


def _ssl_context(security: TransportSecurity, client_auth: bool) -> ssl.SSLContext:
    assert security.files is not None  # ssl loads certificates from files only
    ca, cert, key = security.files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca)
    return context


@dataclass
class Listeners:
    """The started listeners; ``stop`` closes both."""

    http_port: int
    grpc_port: int
    tls: bool
    _runner: web.AppRunner
    _grpc: grpc.aio.Server
    _renewal: asyncio.Task[None] | None = field(default=None)

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
        await self._grpc.stop(grace=grace_s)
        await self._runner.cleanup()


async def _renew(context: ssl.SSLContext, security: TransportSecurity, client_auth: bool) -> None:
    """Load renewed files into the REST context: new handshakes present the new certificate."""
    while True:
        await asyncio.sleep(RENEWAL_CHECK_S)  # a polling period, not a synchronisation
        fresh = security.refreshed()
        if fresh is security:
            continue
        assert fresh.files is not None
        ca, cert, key = fresh.files
        try:
            context.load_cert_chain(cert, key)
            if client_auth:
                context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:  # half-renewed: keep serving with what works
            log.warning("v2 front door: renewed certificate not loaded yet: %s", exc)
            continue
        security = fresh
        log.info("v2 front door: renewed certificate loaded")


async def start(
    door: FrontDoor,
    host: str,
    http_port: int,
    grpc_port: int,
    security: TransportSecurity,
    authorise: rest.Authorise | None = None,
) -> Listeners:
    """Serve ``door`` over v2 REST on ``http_port`` and gRPC on ``grpc_port`` (0 = any free).

    ``security`` is this server's certificate and CA as files (``TransportSecurity.from_files``),
    or plaintext. ``authorise`` None: no client certificate asked for (TLS still encrypts
    and proves the server); else required, and its identities must pass ``authorise``."""
    tls = not security.insecure
    context = _ssl_context(security, authorise is not None) if tls else None
    runner = web.AppRunner(rest.app(door, authorise if tls else None), access_log=None)
    await runner.setup()
    try:
        bare = host.strip("[]")
        # asyncio binds "::" IPv6-only: every address, both families, is host None.
        site = web.TCPSite(runner, None if bare == "::" else bare, http_port, ssl_context=context)
        await site.start()
        bound_http = runner.addresses[0][1]
        address = f"[{bare}]:{grpc_port}" if ":" in bare else f"{bare}:{grpc_port}"
        server, bound_grpc = await v2_grpc.start(door, address, security, authorise if tls else None)
    except BaseException:
        await runner.cleanup()
        raise
    renewal = None
    if context is not None and security.files is not None:
        renewal = asyncio.create_task(_renew(context, security, authorise is not None))
    return Listeners(bound_http, bound_grpc, tls, runner, server, renewal)
