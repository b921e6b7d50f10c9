"""Where an upstream may send the mirror: redirect targets checked before connecting.

Registries answer blob GETs with a redirect to blob storage (a CDN, S3). An
upstream, or whoever answers in its name, could instead point the mirror at an
address inside the mirror's own network (a metadata service on 169.254.169.254,
an admin port on localhost) and have it fetch from there. The rule:

- a redirect target's addresses are resolved and each is classed as loopback,
  link-local, private (RFC 1918, unique-local, shared address space) or public;
- a public target is always allowed; a non-public one only when the upstream
  itself is of that same class (a registry on the LAN redirecting to storage on
  the LAN, or a test registry on 127.0.0.1 redirecting to 127.0.0.2), and a
  private one also when the upstream is on loopback (a registry beside the
  mirror, its storage on the LAN): the operator runs such an upstream;
- an upstream whose own address cannot be resolved counts as public, the
  strictest case; a target that cannot be resolved is left to fail to connect.

The check resolves the name just before httpx connects; a DNS answer that changes
between the two lookups (rebinding) is not caught, which would take a resolver of
our own inside the transport. Checking the connected peer instead would refuse
every redirect made through a forward proxy on the LAN. Whatever answers, a blob
is served only if its bytes hash to the digest asked for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Literal

import httpx

from ..errors import UpstreamRefused

__all__ = ["AddressKind", "RedirectGuard", "address_kind"]

log = logging.getLogger("mirror.redirects")

AddressKind = Literal["loopback", "link-local", "private", "public", "other"]
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Beyond public addresses: what an upstream of each class may redirect to.
_MAY_REACH: dict[AddressKind, set[AddressKind]] = {
    "loopback": {"loopback", "private"},
    "private": {"private"},
    "link-local": {"link-local"},
}


def address_kind(address: _IPAddress) -> AddressKind:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback or address.is_unspecified:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast or address.is_reserved:
        return "other"
    if address.is_private or address in _SHARED:
        return "private"
    return "public" if address.is_global else "other"


async def _resolve(host: str) -> set[_IPAddress]:
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos}


class RedirectGuard:
    """An httpx request hook: refuses requests off the upstream's host to addresses
    more internal than the upstream's own."""

    def __init__(self, upstream_url: str) -> None:
        self._host = httpx.URL(upstream_url).host
        self._own: set[AddressKind] | None = None

    async def _own_kinds(self) -> set[AddressKind]:
        if self._own is None:
            own: set[AddressKind] = {"public"}
            for kind in {address_kind(a) for a in await _resolve(self._host)}:
                own |= _MAY_REACH.get(kind, set())
            self._own = own
        return self._own

    async def __call__(self, request: httpx.Request) -> None:
        host = request.url.host
        if host == self._host:
            return
        addresses = await _resolve(host)
        if not addresses:
            return
        allowed = await self._own_kinds()
        refused = sorted(str(a) for a in addresses if address_kind(a) not in allowed)
        if refused:
            log.error(
                "upstream %s redirected to %s (%s): an address more internal than its own; "
                "not followed",
                self._host,
                host,
                ", ".join(refused),
            )
            raise UpstreamRefused(
                f"upstream {self._host} redirected to {host}, an internal address "
                "the mirror does not follow"
            )
