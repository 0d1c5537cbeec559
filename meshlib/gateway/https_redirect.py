"""The answer of an `https_redirect` listener: 301 to the same host and path over HTTPS."""

from __future__ import annotations

from typing import Any

from meshlib.gateway.hosts import host_of
from meshlib.gateway.proxy import answer


def https_location(authority: str, raw_path: bytes, query: bytes, https_port: int) -> str:
    """`https://<host>[:port]<path>[?query]`; the port is left out when it is 443."""
    host = host_of(authority) or "localhost"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = "" if https_port == 443 else f":{https_port}"
    path = raw_path.decode("latin-1") or "/"
    return f"https://{host}{port}{path}" + (f"?{query.decode('latin-1')}" if query else "")


async def redirect_to_https(scope: dict[str, Any], send: Any, https_port: int) -> None:
    authority = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    where = https_location(authority, raw, scope.get("query_string") or b"", https_port)
    await answer(send, 301, f"moved to {where}\n", location=where)
