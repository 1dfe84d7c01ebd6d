"""Which hosts a ``storageUri`` may name: never the node's own, link-local or cloud-metadata addresses.

A storage initializer runs inside the cluster with the Pod's network identity; a URI at
``169.254.169.254`` (or a name that resolves there) would read the cloud's instance metadata,
often credentials. Checked three times: the operator's spec validation (a literal address or a
known metadata name, no I/O), the operator before planning (the name resolved, every address),
and the initializer itself right before it connects (resolved again, and it connects to the
address it checked, so a DNS answer that changes in between cannot redirect it). Standard library
only: the initializer imports it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence

__all__ = [
    "FORBIDDEN_NETWORKS",
    "METADATA_NAMES",
    "HostRefused",
    "HostUnresolved",
    "Network",
    "address_refusal",
    "host_refusal",
    "parse_networks",
    "resolve_checked",
    "resolve_checked_async",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

FORBIDDEN_NETWORKS: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(cidr), why)
    for cidr, why in (
        ("0.0.0.0/8", "an unspecified address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address (cloud metadata lives at 169.254.169.254)"),
        ("100.100.100.200/32", "a cloud metadata address"),
        ("224.0.0.0/4", "a multicast address"),
        ("255.255.255.255/32", "the broadcast address"),
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fd00:ec2::254/128", "a cloud metadata address"),
        ("ff00::/8", "a multicast address"),
    )
)
"""Never reachable from a storageUri unless the cluster admin allows the network (tests)."""

METADATA_NAMES = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
"""Names cloud providers give their metadata service: refused whatever they resolve to."""

_NUMERIC_V4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


class HostRefused(ValueError):
    """A storage host that must not be contacted; the message says why."""


class HostUnresolved(HostRefused):
    """The host does not resolve (here, now): the fetcher refuses it; the operator waits for it."""


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs the cluster admin allows despite FORBIDDEN_NETWORKS (e.g. 127.0.0.0/8 in tests)."""
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _literal(host: str) -> Address | None:
    """``host`` as an address when it is one, including the forms ``inet_aton`` accepts
    (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``): resolvers read them as addresses."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_V4.match(text.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def address_refusal(address: Address | str, allowed: Sequence[Network] = ()) -> str | None:
    """Why ``address`` may not be fetched from, or None when it may."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 reaches 169.254.169.254
    if any(ip.version == n.version and ip in n for n in allowed):
        return None
    for net, why in FORBIDDEN_NETWORKS:
        if ip.version == net.version and ip in net:
            return f"{ip} is {why}"
    return None


def host_refusal(host: str, allowed: Sequence[Network] = ()) -> str | None:
    """Why ``host`` (a URI's host, no I/O) may not be fetched from, or None if it is not known bad."""
    name = host.lower().rstrip(".")
    if not name:
        return "no host"
    if name in METADATA_NAMES:
        return f"{host} is a cloud metadata service"
    ip = _literal(name)
    return address_refusal(ip, allowed) if ip is not None else None


def _checked(host: str, infos: Iterable[tuple], allowed: Sequence[Network]) -> list[str]:
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    if not addresses:
        raise HostUnresolved(f"{host} resolves to no address")
    for a in addresses:
        why = address_refusal(a, allowed)
        if why is not None:
            raise HostRefused(f"{host} resolves to {why}")
    return addresses


def resolve_checked(host: str, port: int, allowed: Sequence[Network] = ()) -> list[str]:
    """Every address ``host`` resolves to, each checked; HostRefused if any is forbidden."""
    why = host_refusal(host, allowed)
    if why is not None:
        raise HostRefused(why)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise HostUnresolved(f"{host} does not resolve: {exc}") from None
    return _checked(host, infos, allowed)


async def resolve_checked_async(host: str, port: int, allowed: Sequence[Network] = ()) -> list[str]:
    """``resolve_checked`` without blocking the event loop (the operator)."""
    why = host_refusal(host, allowed)
    if why is not None:
        raise HostRefused(why)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host.strip("[]"), port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise HostUnresolved(f"{host} does not resolve: {exc}") from None
    return _checked(host, infos, allowed)
