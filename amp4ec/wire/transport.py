"""The one place amp4ec creates gRPC channels and servers: credentials, options, authorisation.

``TransportSecurity`` is either mutual TLS (a CA to verify peers against, this process's
own certificate and key) or explicitly insecure; there is no default that is silently
plaintext. Under mutual TLS:

- ``channel(target, security, expect_identity=...)`` pins the identity the server must
  present: gRPC's own hostname check compares ``expect_identity`` (``ssl_target_name_override``)
  with the server certificate's DNS SANs, so a server with a valid certificate of another
  identity fails the handshake, whatever address it answers on;
- ``server(policy)`` authorises every call on the peer identities the handshake verified
  (``context.auth_context()``), before the handler runs; a refused call is
  PERMISSION_DENIED naming the peer and the method. A plaintext peer or one whose
  certificate another CA signed never gets past the handshake.

Identities are the DNS names of ``amp4ec.pki``.

[Note: renewed certificates] Material read ``from_files`` remembers its files; ``refreshed()``
reads them again once they changed on disk (kubelet swaps a renewed Secret in place). A
server made by ``add_port`` asks for it at every new handshake, so it presents a renewed
leaf without a restart; a long-lived client channel is replaced by its owner
(``node_agent.forwarders.ForwarderPool``). Connections already up keep the key they were made with.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from amp4ec.errors import InvalidSpec

__all__ = [
    "Policy",
    "TransportSecurity",
    "add_port",
    "channel",
    "peer_identities",
    "server",
]

Policy = Callable[[str, frozenset[str]], bool]
"""policy(full method name, verified peer identities) → allowed."""

Options = Sequence[tuple[str, Any]]
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class TransportSecurity:
    """Mutual TLS material (PEM bytes) or, with ``insecure=True``, none at all."""

    ca_pem: bytes = b""
    cert_pem: bytes = b""
    key_pem: bytes = b""
    insecure: bool = False
    identity: str = field(default="", init=False)
    """This process's identity: the DNS SAN of its certificate ("" when insecure)."""
    files: tuple[Path, Path, Path] | None = field(default=None, compare=False)
    """(ca, cert, key) it was read from, for ``refreshed``; None = given as bytes."""
    stamp: tuple[int, ...] = field(default=(), compare=False)
    """The files' modification times and inodes when read."""

    def __post_init__(self) -> None:
        if self.insecure:
            return
        for name in ("ca_pem", "cert_pem", "key_pem"):
            if not getattr(self, name):
                raise InvalidSpec(f"{name.removesuffix('_pem')}: required for mutual TLS (or go insecure)")
        loaded: dict[str, Any] = {}
        for name, load in (
            ("ca", lambda: x509.load_pem_x509_certificate(self.ca_pem)),
            ("cert", lambda: x509.load_pem_x509_certificate(self.cert_pem)),
            ("key", lambda: serialization.load_pem_private_key(self.key_pem, password=None)),
        ):
            try:
                loaded[name] = load()
            except (ValueError, TypeError) as exc:
                raise InvalidSpec(f"{name}: not an unencrypted PEM {name} ({exc})") from None
        cert = loaded["cert"]
        # A mismatched pair fails every handshake with an obscure error: say so at once.
        if loaded["key"].public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
            raise InvalidSpec("key: does not belong to cert")
        names = _dns_names(cert)
        if not names:
            raise InvalidSpec("cert: no DNS subjectAltName to identify this process by")
        object.__setattr__(self, "identity", names[0])

    @classmethod
    def plaintext(cls) -> TransportSecurity:
        """No encryption, no authentication: for comparison and trusted loopback only."""
        return cls(insecure=True)

    @classmethod
    def from_files(
        cls, ca: Path | str | None, cert: Path | str | None, key: Path | str | None, *, flags: str = "--tls-"
    ) -> TransportSecurity:
        """Read PEM files; a missing one is an InvalidSpec naming its flag (``flags`` + ``ca`` …)."""
        data = {}
        for name, path in (("ca", ca), ("cert", cert), ("key", key)):
            if not path:
                raise InvalidSpec(f"{flags}{name}: required for mutual TLS (or pass --insecure)")
            try:
                data[name] = Path(path).read_bytes()
            except OSError as exc:
                raise InvalidSpec(f"{flags}{name}: cannot read {path}: {exc.strerror}") from None
        files = (Path(ca), Path(cert), Path(key))  # type: ignore[arg-type]
        return cls(data["ca"], data["cert"], data["key"], files=files, stamp=_stamp(files))

    def refreshed(self) -> TransportSecurity:
        """The same files read again if they changed since (a renewed leaf), else ``self``.

        A half-renewed or unreadable set keeps the material in use (it is still valid)."""
        if self.files is None or _stamp(self.files) == self.stamp:
            return self
        try:
            return TransportSecurity.from_files(*self.files)
        except InvalidSpec:
            return self

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=require_client_auth,
        )


def _stamp(files: tuple[Path, ...]) -> tuple[int, ...]:
    try:
        # Inode too: a file replaced within the clock's granularity is still seen as changed.
        return tuple(x for f in files for x in (os.stat(f).st_mtime_ns, os.stat(f).st_ino))
    except OSError:
        return ()


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def channel(
    target: str, security: TransportSecurity, *, expect_identity: str = "", options: Options = ()
) -> grpc.aio.Channel:
    """A channel to ``target``; under mutual TLS the server must present ``expect_identity``."""
    if security.insecure:
        return grpc.aio.insecure_channel(target, options=list(options))
    if not expect_identity:
        raise InvalidSpec(f"{target}: the identity its server must present is required with mutual TLS")
    return grpc.aio.secure_channel(
        target,
        security.channel_credentials(),
        options=[*options, ("grpc.ssl_target_name_override", expect_identity)],
    )


def add_port(
    server: grpc.aio.Server, address: str, security: TransportSecurity, *, require_client_auth: bool = True
) -> int:
    """Bind ``address`` (port 0 = any free one) with the security's credentials; returns the port.

    ``require_client_auth=False`` only for a public front door whose callers may hold no
    certificate (``amp4ec serve --client-auth none``); every amp4ec hop requires one."""
    if security.insecure:
        port = server.add_insecure_port(address)
    elif security.files is None:
        port = server.add_secure_port(address, security.server_credentials(require_client_auth))
    else:
        port = server.add_secure_port(address, _reloading_credentials(security, require_client_auth))
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def _reloading_credentials(security: TransportSecurity, require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials that pick up renewed files at the next handshake (see the Note above)."""
    current = [security]

    def configuration(s: TransportSecurity) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(s.key_pem, s.cert_pem)], root_certificates=s.ca_pem
        )

    def fetch() -> Any:
        fresh = current[0].refreshed()
        if fresh is current[0]:
            return None  # unchanged: gRPC keeps the configuration it has
        current[0] = fresh
        return configuration(fresh)

    return grpc.dynamic_ssl_server_credentials(
        configuration(security), fetch, require_client_authentication=require_client_auth
    )


def server(
    security: TransportSecurity,
    policy: Policy | None,
    options: Options = (),
    *,
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.aio.Server:
    """A server whose calls ``policy`` authorises (under mutual TLS; None = any verified peer)."""
    interceptors = [] if security.insecure or policy is None else [_Authorise(policy)]
    return grpc.aio.server(
        options=list(options), interceptors=interceptors, maximum_concurrent_rpcs=maximum_concurrent_rpcs
    )


def peer_identities(context: grpc.aio.ServicerContext) -> frozenset[str]:
    """The identities (DNS SANs under ``.amp4ec``) of the peer's certificate, as the TLS
    handshake verified them; a server's other names (``pki`` ``hosts``) are not identities."""
    props = context.auth_context() or {}
    return frozenset(
        name
        for v in props.get("x509_subject_alternative_name", ())
        if (name := v.decode(errors="replace")).endswith(".amp4ec") and "://" not in name
    )


class _Authorise(grpc.aio.ServerInterceptor):
    """Wraps each handler so that it checks the caller before running.

    An aio interceptor sees only the method and metadata, not the peer; the peer's verified
    identity lives on the call's context, so the check runs inside the wrapped handler.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        policy = self._policy

        async def deny_unless_allowed(context: grpc.aio.ServicerContext) -> None:
            peers = peer_identities(context)
            if not policy(method, peers):
                who = ", ".join(sorted(peers)) or "a peer without identity"
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method}")

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny_unless_allowed(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, deny_unless_allowed),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                await deny_unless_allowed(context)
                return await inner_su(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            _streaming(handler.stream_stream, deny_unless_allowed),
            handler.request_deserializer,
            handler.response_serializer,
        )


def _streaming(inner: Callable[..., Any], check: Callable[[Any], Any]) -> Callable[..., Any]:
    """``inner`` behind ``check``, in the same style: grpc.aio refuses to mix an async generator
    handler with ``context.write``, so a writing handler stays a coroutine."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            async for item in inner(request, context):
                yield item

        return generator

    async def writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        return await inner(request, context)

    return writer
