"""TLS facts for ASGI apps under uvicorn, and mTLS terminated inside uvicorn's HTTP protocol.

uvicorn 0.54 gives the app no TLS information. Two `H11Protocol` subclasses, passed as
`uvicorn.Config(http=...)`, fill the ASGI TLS extension (`scope["extensions"]["tls"]`: the
peer's `client_cert_chain` as PEM strings, `tls_version`, `cipher_suite`, `server_cert: None`)
and the verified peer (`scope["extensions"]["meshlib.peer"]`, read with
`meshlib.security.peer`), and make the certificate's service name win over a claimed
`x-mesh-source` header:

- `TLSH11Protocol` when uvicorn terminates TLS itself (`ssl_certfile=...`,
  `ssl_context_factory=...`);
- `MeshTLSProtocol` (made by `mtls_protocol(...)`, used by `Mesh.serve`) terminates TLS per
  connection itself, so that it can
  - tell a TLS ClientHello (first byte 0x16) from plaintext HTTP on one port: PERMISSIVE serves
    both (Istio's PeerAuthentication during a migration), STRICT answers plaintext with a 403
    saying mTLS is required, instead of a connection reset that a client would retry;
  - take the server context in force at each new connection (renewed certificates and changed
    bundles apply to new connections; open ones keep theirs);
  - send the alert of a refused handshake before closing (asyncio's TLS layer drops it), so
    the client sees "certificate unknown/expired/required" rather than a bare disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

from meshlib.headers import ERROR, SOURCE
from meshlib.security.certificates import service_of, spiffe_id_of_der
from meshlib.security.peer import PEER_EXTENSION

log = logging.getLogger("meshlib.security")

MODES = ("STRICT", "PERMISSIVE")
HANDSHAKE_TIMEOUT = 10  # seconds
_SOURCE = SOURCE.encode()
_TLS_VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303, "TLSv1.1": 0x0302, "TLSv1": 0x0301}
_NEW, _HANDSHAKE, _OPEN = 0, 1, 2

ContextSource = Callable[[bool], ssl.SSLContext]
"""`source(require_client_cert)`: the server context in force now."""


def mtls_protocol(source: ContextSource, mode: str = "STRICT", trust_domain: str | None = None) -> type:
    """An `H11Protocol` class serving mTLS with `source`'s contexts in `mode`."""
    if mode not in MODES:
        raise ValueError(f"mTLS mode must be one of {', '.join(MODES)}, not {mode!r}")
    return type(
        f"MeshTLS{mode.title()}Protocol",
        (MeshTLSProtocol,),
        {"tls_source": staticmethod(source), "tls_strict": mode == "STRICT", "trust_domain": trust_domain},
    )


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS layer, writing out the alert of a failed handshake before it closes."""

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None and self._transport is not None:
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]  # private, not in the stubs
        super()._on_handshake_complete(handshake_exc)


class TLSH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, telling the app about the TLS connection uvicorn terminated.

    `trust_domain` (a subclass attribute) lets the verified peer carry its service name."""

    trust_domain: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._serve(_with_peer(self.app, ssl_object, self.trust_domain))
        super().connection_made(transport)

    def _serve(self, app: Any) -> None:
        """This connection's requests go to `app`, and so does a WebSocket it is upgraded to:
        uvicorn makes that protocol with the server's app (`config.loaded_app`), not this one's,
        which would leave a WebSocket without its peer, or a plaintext one past STRICT."""
        self.app = app
        made = self.ws_protocol_class
        if made is not None:  # uvicorn only calls it, with keywords: a factory does
            self.ws_protocol_class = cast(Any, functools.partial(_upgraded, made, app))


class MeshTLSProtocol(TLSH11Protocol):
    """Terminates (m)TLS itself; see the module docstring. Configure it with `mtls_protocol`."""

    tls_source: ContextSource
    tls_strict: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_state = _NEW
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._tls_state == _NEW and self._raw is None:  # the TCP connection: wait for a byte
            self._raw = transport
            self.connections.add(self)
            return
        if self._tls_state == _HANDSHAKE:  # the TLS layer, handshake done
            self._tls_state = _OPEN
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._tls_state == _NEW:
            self._tls_state = _OPEN
            if data[:1] == b"\x16":
                self._start_tls(data)
                return
            if self.tls_strict:
                self._serve(_mtls_required)
            super().connection_made(self._raw)  # type: ignore[arg-type]
        super().data_received(data)

    def _start_tls(self, first: bytes) -> None:
        raw = self._raw
        assert raw is not None
        self._tls_state = _HANDSHAKE
        try:
            ctx = self.tls_source(self.tls_strict)
        except Exception as exc:  # no certificate (yet): nothing to serve TLS with
            log.error("cannot serve TLS: %s", exc)
            self.connections.discard(self)
            raw.abort()
            return
        waiter = self.loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        tls = _AlertingSSLProtocol(
            self.loop, self, ctx, waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
        raw.set_protocol(tls)
        tls.connection_made(raw)
        view = tls.get_buffer(len(first))
        while first:  # hand it the bytes already read, as if they had just arrived
            n = min(len(first), len(view))
            view[:n] = first[:n]
            tls.buffer_updated(n)
            first = first[n:]
            if first:
                view = tls.get_buffer(len(first))

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        if waiter.cancelled() or waiter.exception() is not None:
            self.connections.discard(self)
            if not waiter.cancelled():
                peer = self._raw.get_extra_info("peername") if self._raw is not None else None
                log.debug("TLS handshake from %s refused: %s", peer, waiter.exception())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # never got past the first byte / the handshake
            self.connections.discard(self)
            return
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self.transport is None:
            self.connections.discard(self)
            if self._raw is not None:
                self._raw.close()
            return
        super().shutdown()


# -- what the app sees ------------------------------------------------------------------------


def tls_extension(ssl_object: Any) -> dict[str, Any]:
    """The ASGI TLS extension for a connection (client_cert_chain as PEM strings, leaf first)."""
    chain = _peer_chain(ssl_object)
    name, _, _ = ssl_object.cipher() or (None, None, None)
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": _subject(chain[0]) if chain else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_ids().get(name) if name else None,
    }


def _peer_chain(ssl_object: Any) -> list[str]:
    sent = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if sent is not None:  # private before Python 3.13, public since
        with contextlib.suppress(Exception):
            certs = sent() or []
            return [c.public_bytes() for c in certs]
    der = ssl_object.getpeercert(binary_form=True)
    return [ssl.DER_cert_to_PEM_cert(der)] if der else []


def _subject(pem: str) -> str | None:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii")).subject.rfc4514_string()
    except ValueError:
        return None


@functools.cache
def _cipher_ids() -> dict[str, int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return {c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()}


def _with_peer(app: Any, ssl_object: Any, trust_domain: str | None) -> Any:
    """The app, behind a shim that puts this connection's TLS facts into every request's scope."""
    tls = tls_extension(ssl_object)
    der = ssl_object.getpeercert(binary_form=True)
    spiffe = spiffe_id_of_der(der) if der else None
    if spiffe is None:
        peer = None
    else:
        service = service_of(spiffe, trust_domain) if trust_domain else None
        peer = {"spiffe_id": spiffe, "service": service}
    source = (peer["service"] or "").encode("latin-1", "replace") if peer else None

    async def shim(scope: dict[str, Any], receive: Any, send: Any) -> None:
        extensions = scope.get("extensions")
        if extensions is None:
            extensions = scope["extensions"] = {}
        extensions["tls"] = tls
        if peer is not None:
            extensions[PEER_EXTENSION] = peer
            # the certificate wins over a claimed source (an empty one: not a service of ours)
            headers = [(k, v) for k, v in scope["headers"] if k != _SOURCE]
            if source:
                headers.append((_SOURCE, source))
            scope["headers"] = headers
        await app(scope, receive, send)

    return shim


_REFUSAL = b"this service accepts only mutual TLS connections from the mesh (mTLS STRICT)\n"


def _upgraded(made: Any, app: Any, **kwargs: Any) -> Any:
    """The WebSocket protocol uvicorn makes on an upgrade, serving the connection's `app`."""
    protocol = made(**kwargs)
    protocol.app = app
    return protocol


async def _mtls_required(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app for a plaintext request to a STRICT port: a clear refusal, then close (a
    WebSocket handshake: the same answer where the server can send one, else a close)."""
    kind = scope["type"]
    if kind not in ("http", "websocket"):
        return
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_REFUSAL)).encode()),
        (b"connection", b"close"),
        (ERROR.encode(), b"mtls-required"),
    ]
    prefix = ""
    if kind == "websocket":
        await receive()  # websocket.connect
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        prefix = "websocket."
    await send({"type": f"{prefix}http.response.start", "status": 403, "headers": headers})
    await send({"type": f"{prefix}http.response.body", "body": _REFUSAL})
