"""Which network addresses webdistill may reach: the crawler for every hop and DNS answer, and
a stored http(s) shard URL read back from an artifact. Loopback, private, link-local (cloud
metadata), multicast and other special ranges are refused, and so are IPv6 addresses that embed
one (mapped, 6to4, Teredo, NAT64), unless the user opened them (`allow_private`, a named network)."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver

if TYPE_CHECKING:
    from .crawl import CrawlConfig


class BlockedAddress(Exception):
    """A host is, or resolves to, an address the crawler must not reach."""


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool = False
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_config(cls, config: CrawlConfig) -> AddressPolicy:
        return cls(config.allow_private, config.networks())

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be reached ("127.0.0.1 is loopback"), or None if it may. An IPv6
        address that embeds an IPv4 one (mapped, 6to4, Teredo, NAT64) must pass for both."""
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
        for one in (ip, *_embedded_ipv4(ip)):
            if any(one in net for net in self.allowed):
                continue  # the user named this network
            kind = _address_kind(one)
            if kind is not None and not (self.allow_private and kind in _PRIVATE_KINDS):
                return f"{one} is {kind}"
        return None


# What --allow-private opens. Link-local (169.254.0.0/16: cloud instance metadata and credentials;
# fe80::/10), multicast, 0.0.0.0/8, reserved and site-local ranges stay refused: only a network the
# user names (allowed_networks, --allow-network CIDR) opens them.
_PRIVATE_KINDS = ("loopback", "private", "not a global address")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # "this host": Linux connects 0.x.x.x to itself
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The special range `ip` is in ("loopback", "link-local", ...), or None for a global address."""
    # Order matters: loopback and link-local addresses are also "private" to ipaddress.
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if ip in _THIS_NETWORK:
        return "in 0.0.0.0/8 (this host)"
    if getattr(ip, "is_site_local", False):
        return "site-local"
    if ip.is_private:
        return "private"
    return None if ip.is_global else "not a global address"


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translator or tunnel."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [ip.sixtofour] if ip.sixtofour else []
    if ip.teredo:
        found += list(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then refuses the host if any address it resolves to is refused.
    The connection uses exactly the addresses checked here, so DNS rebinding cannot slip past."""

    def __init__(self, policy: AddressPolicy):
        self._inner = aiohttp.ThreadedResolver()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            why = self._policy.refusal(info["host"])
            if why:
                raise BlockedAddress(f"{host} resolves to an address refused: {why}")
        return infos

    async def close(self) -> None:
        await self._inner.close()
