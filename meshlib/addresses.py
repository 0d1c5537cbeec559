"""`host:port` addresses, checked the same way wherever an endpoint's address is taken in: an
Endpoints document or a registration."""

from __future__ import annotations

import ipaddress
import re

MAX_HOST = 253

_DNS_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def check_address(address: str) -> str:
    """`host:port` where host is an IPv4 literal, a bracketed IPv6 literal or a DNS name (whose
    last label is not all digits, so `999.999.999.999` is no name) and port is 1-65535;
    ValueError saying what is wrong otherwise."""
    host, sep, port = address.rpartition(":")
    shown = address[:80]
    if not sep or not host:
        raise ValueError(f"address {shown!r} must be host:port (IPv6 as [::1]:8080)")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise ValueError(f"address {shown!r}: port must be a number from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"address {shown!r}: unclosed '[' around the IPv6 address")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"address {shown!r}: {host[1:-1][:60]!r} is not an IPv6 address") from None
        return address
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"address {shown!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if host.replace(".", "").isdigit() or host.rsplit(".", 1)[-1].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"address {shown!r}: {host[:60]!r} is not an IPv4 address") from None
        return address
    if not dns_name(host.removesuffix("."), MAX_HOST):
        raise ValueError(f"address {shown!r}: {host[:60]!r} is not a valid host name")
    return address


def dns_name(name: str, limit: int) -> bool:
    """A DNS name of at most `limit` characters: dot-separated labels of 1-63 letters, digits
    and '-', not starting or ending with '-'."""
    return 0 < len(name) <= limit and name.isascii() and all(_DNS_LABEL_RE.match(p) for p in name.split("."))
