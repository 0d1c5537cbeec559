"""The verified peer of an inbound request, as the server's TLS layer recorded it.

`meshlib.security.uvicorn_tls` puts the SPIFFE id of the client certificate it verified into
`scope["extensions"]["meshlib.peer"]`; nothing a client sends (headers, path) can set it. A
plaintext request (PERMISSIVE mode) or a TLS client without a certificate has no entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PEER_EXTENSION = "meshlib.peer"


def peer_identity(scope: Mapping[str, Any]) -> str | None:
    """The verified SPIFFE id of the caller (`spiffe://<td>/svc/<service>`), None for plaintext."""
    peer = _peer(scope)
    return peer.get("spiffe_id") if peer is not None else None


def peer_service(scope: Mapping[str, Any]) -> str | None:
    """The caller's service name from its verified certificate (None: plaintext, or an id that
    is not a service of our trust domain)."""
    peer = _peer(scope)
    return peer.get("service") if peer is not None else None


def _peer(scope: Mapping[str, Any]) -> Mapping[str, Any] | None:
    extensions = scope.get("extensions")
    if not extensions:
        return None
    peer = extensions.get(PEER_EXTENSION)
    return peer if isinstance(peer, Mapping) else None
