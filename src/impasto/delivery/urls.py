"""Which addresses an outbound URL may reach: pure functions (no DNS). URL syntax and the IDNA
form of host names are protocol.urls' (shared with request validation).

An address is allowed when it is globally routable, and so is every IPv4 address that an IPv6
translation or tunnel form (NAT64, 6to4, IPv4-compatible, Teredo) would deliver it to.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _bits(value: int, start: int, end: int) -> int:
    """Bits [start, end) of a 128-bit value, counted from the most significant."""
    return (value >> (128 - end)) & ((1 << (end - start)) - 1)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address that a translator or tunnel would deliver this address to."""
    value = int(address)
    if address in _IPV4_COMPATIBLE or address in _IPV4_TRANSLATED or address in _NAT64:
        return [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if address in _NAT64_LOCAL:
        # The operator picks the prefix length inside this block (RFC 6052 2.2, bits 64-71
        # are the reserved "u" octet): try every layout it could use.
        return [
            ipaddress.IPv4Address(v)
            for v in (
                _bits(value, 48, 64) << 16 | _bits(value, 72, 88),
                _bits(value, 56, 64) << 24 | _bits(value, 72, 96),
                _bits(value, 72, 104),
                _bits(value, 96, 128),
            )
        ]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    return []


def address_allowed(address: IPAddress) -> bool:
    """Whether a request may go to `address` when private networks are not allowed."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            # ::ffff:a.b.c.d is a.b.c.d itself, whatever Python calls the IPv6 form.
            return address_allowed(address.ipv4_mapped)
        if address in _SITE_LOCAL:
            return False  # deprecated, but still routed inside some networks
        if not all(address_allowed(v4) for v4 in _embedded_ipv4(address)):
            return False
    return address.is_global and not address.is_multicast
