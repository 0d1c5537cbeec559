"""Which headers cross the gateway, both ways, and the `x-forwarded-*` it sets.

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and never cross a proxy: the
Connection header, the headers it names, and Keep-Alive, TE, Trailer, Transfer-Encoding,
Upgrade and any Proxy-*. The mesh's own `x-mesh-*` headers from outside are dropped too: an
outside caller does not speak for a mesh service (the mesh sets its own on the way in), and
Host is the target service's, set by the mesh client.

`x-forwarded-for` is not trusted from outside by default: the gateway starts it afresh with
the client's address. With `trusted_hops: N` (proxies of one's own in front of the gateway)
the last N entries are kept, as those proxies wrote them, and the client's address appended;
`x-forwarded-proto` and `-host` are then kept as those proxies set them.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection"}
)
XFF = b"x-forwarded-for"
XF_PROTO = b"x-forwarded-proto"
XF_HOST = b"x-forwarded-host"
_FORWARDED = frozenset({XFF, XF_PROTO, XF_HOST})
_MESH = b"x-mesh-"


_FRAMING = frozenset({b"content-length"})
"""What `Connection` may not name away: the body's length, without which the message sent on
would lose its body (`Host` is set by the mesh client either way)."""


def _named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return named - _FRAMING if named else named


def _crosses(name: bytes, named: set[bytes]) -> bool:
    return name not in HOP_BY_HOP and name not in named and not name.startswith(b"proxy-")


def inward(
    headers: Iterable[tuple[bytes, bytes]], *, client: str | None, scheme: str, trusted_hops: int = 0
) -> Headers:
    """The headers of a request as the gateway sends it on to a mesh service."""
    headers = [(name.lower(), value) for name, value in headers]
    named = _named_by_connection(headers)
    out: Headers = []
    forwarded: list[bytes] = []
    proto = host = authority = None
    for name, value in headers:
        if name == b"host":
            authority = value
        elif name in _FORWARDED:
            if name == XFF:
                forwarded += [part.strip() for part in value.split(b",") if part.strip()]
            elif name == XF_PROTO:
                proto = value
            else:
                host = value
        elif _crosses(name, named) and not name.startswith(_MESH):
            out.append((name, value))
    kept = forwarded[-trusted_hops:] if trusted_hops > 0 else []
    if client:
        kept.append(client.encode("latin-1"))
    if kept:
        out.append((XFF, b", ".join(kept)))
    trusted = trusted_hops > 0
    out.append((XF_PROTO, proto if trusted and proto else scheme.encode("latin-1")))
    if (trusted and host) or authority:
        out.append((XF_HOST, host if trusted and host else authority or b""))
    return out


def outward(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The headers of a service's response as the gateway sends it back to the caller."""
    headers = [(name.lower(), value) for name, value in headers]
    named = _named_by_connection(headers)
    return [(name, value) for name, value in headers if _crosses(name, named)]
