"""TLS contexts for mesh traffic: client and server `ssl.SSLContext` factories.

Python's ssl verifies a chain but never matches a URI SAN, so the client checks the peer's
SPIFFE id itself. Every client context made here carries `sslobject_class` (httpx's async
path: anyio drives an `SSLObject`) and `sslsocket_class` (the sync path wraps a socket)
subclasses whose `do_handshake` runs three steps around the real handshake:

1. switch to the newest context of its `ContextSlot` (renewed certificate, changed bundle):
   contexts are never mutated once published, they are replaced whole;
2. after the handshake, compare the peer's SPIFFE id with `spiffe://<td>/svc/<server_hostname>`
   (the transport puts the destination service in the `sni_hostname` request extension) and
   raise `PeerIdentityError` (an `ssl.SSLCertVerificationError`) on a mismatch: httpcore
   turns it into `httpx.ConnectError` before any byte of the request is sent;
3. under TLS 1.3, wait for the server's session ticket. A TLS 1.3 server checks the client's
   certificate after the client has finished its handshake, so without this wait a refused
   certificate shows up later as "Server disconnected" while reading the response, which looks
   like a transient reset; the ticket is sent only once the server has accepted us, so a
   refusal now fails the handshake with the server's alert (see `meshlib.security.uvicorn_tls`
   for the server side that makes sure the alert is sent).

Mesh servers send one ticket (`num_tickets = 1`); a TLS 1.3 peer that sends none would stall
new connections until the connect timeout, which is why the wait is limited to mesh traffic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from meshlib.security.certificates import spiffe_id, spiffe_id_of_der

log = logging.getLogger("meshlib.security")

MIN_VERSION = ssl.TLSVersion.TLSv1_2
ALPN = ["http/1.1"]


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The peer's certificate chains to our bundle but names another workload."""

    def __init__(self, message: str) -> None:
        super().__init__(ssl.SSL_ERROR_SSL, message)  # (errno, strerror): str() is the message
        self.verify_message = message
        self.verify_code = 0


class ContextSlot:
    """The current context of one kind; `current` is replaced whole, never edited in place.

    `load_cert_chain` and `load_verify_locations` release the GIL while OpenSSL changes the
    context, so editing a context other threads are opening connections from is a data race
    (a connection may pick up the new certificate before the new key). Building a fresh
    context and swapping one reference has no such moment.
    """

    __slots__ = ("current",)

    def __init__(self, current: ssl.SSLContext | None = None) -> None:
        self.current = current


# -- keys in memory ---------------------------------------------------------------------------


def load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`ctx.load_cert_chain` from memory: `load_cert_chain` only reads files, so the PEM goes
    to an anonymous memory file (`memfd_create`) opened through /proc/self/fd and closed at
    once; where there is no memfd, to a 0600 file in a 0700 directory removed at once."""
    data = chain_pem.rstrip(b"\n") + b"\n" + key_pem
    with _memory_file(data) as path:
        ctx.load_cert_chain(path, path)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    memfd_create = getattr(os, "memfd_create", None)
    fd = -1
    if memfd_create is not None:
        with contextlib.suppress(OSError):
            fd = memfd_create("meshlib-tls", getattr(os, "MFD_CLOEXEC", 0))
    if fd >= 0 and os.path.exists(f"/proc/self/fd/{fd}"):
        try:
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    if fd >= 0:
        os.close(fd)
    directory = tempfile.mkdtemp(prefix="meshlib-tls-")  # 0700
    path = Path(directory) / "chain.pem"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- factories --------------------------------------------------------------------------------


def _base(protocol: ssl._SSLMethod, bundle_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)  # not create_default_context: the system roots stay out
    ctx.minimum_version = MIN_VERSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    ctx.set_alpn_protocols(ALPN)
    return ctx


def server_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    """A server context presenting our certificate; client certificates are verified against
    the bundle and required (STRICT) or optional (PERMISSIVE)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, bundle_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    ctx.num_tickets = 1  # the client waits for it: it says our side accepted the handshake
    load_chain(ctx, chain_pem, key_pem)
    return ctx


def client_context(
    chain_pem: bytes | None,
    key_pem: bytes | None,
    bundle_pem: bytes,
    *,
    trust_domain: str,
    slot: ContextSlot | None = None,
) -> ssl.SSLContext:
    """A client context for mesh peers: presents our certificate, verifies the chain against
    the bundle and checks the server's SPIFFE id against the destination service.

    `slot`: connections opened from this context switch to `slot.current` (when set) before
    their handshake, so a long-lived client (an httpx transport holds its context) follows
    renewals and bundle changes without being rebuilt."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, bundle_pem)
    ctx.check_hostname = False  # the SPIFFE id is checked instead, after the handshake
    if chain_pem is not None and key_pem is not None:
        load_chain(ctx, chain_pem, key_pem)
    policy = _Policy(slot, lambda service: spiffe_id(trust_domain, service), confirm=True)
    ctx.sslobject_class = type("MeshSSLObject", (_MeshSSLObject,), {"_policy": policy})
    ctx.sslsocket_class = type("MeshSSLSocket", (_MeshSSLSocket,), {"_policy": policy})
    return ctx


def control_context(
    anchors_pem: bytes,
    chain_pem: bytes | None = None,
    key_pem: bytes | None = None,
    *,
    slot: ContextSlot | None = None,
) -> ssl.SSLContext:
    """A client context for the control service: ordinary hostname verification against the
    trust anchors, presenting our certificate when we have one."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, anchors_pem)
    ctx.check_hostname = True
    if chain_pem is not None and key_pem is not None:
        load_chain(ctx, chain_pem, key_pem)
    if slot is not None:
        policy = _Policy(slot, None, confirm=False)
        ctx.sslobject_class = type("ControlSSLObject", (_MeshSSLObject,), {"_policy": policy})
        ctx.sslsocket_class = type("ControlSSLSocket", (_MeshSSLSocket,), {"_policy": policy})
    return ctx


# -- the handshake hooks ----------------------------------------------------------------------


class _Policy:
    __slots__ = ("confirm", "expected", "slot")

    def __init__(
        self, slot: ContextSlot | None, expected: Callable[[str], str] | None, *, confirm: bool
    ) -> None:
        self.slot = slot
        self.expected = expected
        self.confirm = confirm

    def newest(self, conn: Any) -> None:
        current = self.slot.current if self.slot is not None else None
        if current is not None and conn.context is not current:
            conn.context = current  # SSL_set_SSL_CTX: its certificate and its trust store

    def check_peer(self, conn: Any) -> None:
        if self.expected is None:
            return
        service = conn.server_hostname
        if not service:
            raise PeerIdentityError("no destination service to check the server's SPIFFE id against")
        try:
            expected = self.expected(service)
        except ValueError as exc:
            raise PeerIdentityError(f"cannot check the server's identity: {exc}") from None
        der = conn.getpeercert(binary_form=True)
        actual = _spiffe_of(der) if der else None
        if actual != expected:
            raise PeerIdentityError(
                f"server identity mismatch: expected {expected}, the server presented "
                f"{actual or 'no single SPIFFE id'}"
            )


@functools.lru_cache(maxsize=256)
def _spiffe_of(der: bytes) -> str | None:
    """A peer's SPIFFE id; cached, as a few certificates are seen again on every connection."""
    return spiffe_id_of_der(der)


def _has_ticket(conn: Any) -> bool:
    session = conn.session
    return session is not None and session.has_ticket


class _MeshSSLObject(ssl.SSLObject):
    """The async path (anyio): `SSLWantReadError` from `do_handshake` makes anyio send what we
    wrote (our Finished), read more from the socket and call it again: that is the wait."""

    _policy: _Policy
    _meshlib_waiting = False  # the handshake is done, the server's ticket is not in yet
    _meshlib_done = False
    _meshlib_stash = b""

    def do_handshake(self) -> None:
        if self._meshlib_done:
            return
        if not self._meshlib_waiting:
            self._policy.newest(self)
            super().do_handshake()
            self._policy.check_peer(self)
            if not (self._policy.confirm and self.version() == "TLSv1.3"):
                self._meshlib_done = True
                return
            self._meshlib_waiting = True
            # our Finished is not even sent: nothing from the server can be in yet
            raise ssl.SSLWantReadError("waiting for the server to accept the handshake")
        try:
            data = super().read(1)  # processes what the server sent since: the ticket, or an alert
        except ssl.SSLWantReadError:
            if not _has_ticket(self):
                raise
            data = b""
        else:
            if not data:
                raise ssl.SSLEOFError("the server closed the connection during the handshake")
            self._meshlib_stash += data  # the server spoke first: keep it for the reader
        self._meshlib_done = True

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if self._meshlib_stash:
            return _unstash(self, len, buffer)
        return super().read(len, buffer)


class _MeshSSLSocket(ssl.SSLSocket):
    """The sync path: the same steps on a blocking socket (the wait polls with select)."""

    _policy: _Policy
    _meshlib_stash = b""

    def do_handshake(self, block: bool = False) -> None:
        self._policy.newest(self)
        super().do_handshake(block)
        self._policy.check_peer(self)
        if self._policy.confirm and self.version() == "TLSv1.3":
            self._await_ticket()

    def _await_ticket(self) -> None:
        timeout = self.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        self.settimeout(0.0)
        try:
            while True:  # our Finished has just left: wait for the server's answer first
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("timed out waiting for the server to accept us")
                if not select.select([self], [], [], left)[0]:
                    continue
                try:
                    data = super().read(1)  # the ticket, or an alert
                except ssl.SSLWantReadError:
                    if _has_ticket(self):
                        return
                    continue
                if not data:
                    raise ssl.SSLEOFError("the server closed the connection during the handshake")
                self._meshlib_stash += data
                return
        finally:
            self.settimeout(timeout)

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if self._meshlib_stash:
            return _unstash(self, len, buffer)
        return super().read(len, buffer)


def _unstash(conn: Any, size: int, buffer: Any) -> Any:
    data, conn._meshlib_stash = conn._meshlib_stash[:size], conn._meshlib_stash[size:]
    if buffer is None:
        return data
    buffer[: len(data)] = data
    return len(data)


# -- httpx ------------------------------------------------------------------------------------

MTLS_EXTENSION = "meshlib.mtls"
"""Set (to the destination service) on a request the mesh sends to a mesh endpoint over mTLS
(`Identity.secure`)."""

_EXTERNAL_TLS_KWARGS = ("verify", "cert", "trust_env")


def mesh_transport_kwargs(kwargs: dict[str, Any], ctx: ssl.SSLContext) -> dict[str, Any]:
    """The arguments of the transport to mesh endpoints: the caller's (limits, http2, ...),
    except those that configure TLS to the outside world, which keeps its own transport."""
    own = {k: v for k, v in kwargs.items() if k not in _EXTERNAL_TLS_KWARGS}
    own["verify"] = ctx
    return own


class SplitTransport(httpx.BaseTransport):
    """Mesh requests over mTLS go to a transport of their destination service's own, everything
    else (the outside world) to `other`.

    One pool per destination service: a connection's peer was checked against the service it
    was opened for (`sni_hostname`), and httpcore pools by address alone, so two services at
    one address (a shared port, an address reused after a move) must never share connections.
    """

    def __init__(self, make_mesh: Callable[[], httpx.BaseTransport], other: httpx.BaseTransport) -> None:
        self._make = make_mesh
        self.meshes: dict[str, httpx.BaseTransport] = {}
        self.other = other
        self._lock = threading.Lock()

    def _for(self, service: str) -> httpx.BaseTransport:
        transport = self.meshes.get(service)
        if transport is None:
            with self._lock:
                transport = self.meshes.get(service)
                if transport is None:
                    transport = self.meshes[service] = self._make()
        return transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        service = request.extensions.get(MTLS_EXTENSION)
        if service:
            return self._for(str(service)).handle_request(request)
        return self.other.handle_request(request)

    def close(self) -> None:
        try:
            for transport in list(self.meshes.values()):
                transport.close()
        finally:
            self.other.close()


class AsyncSplitTransport(httpx.AsyncBaseTransport):
    """The async twin of `SplitTransport`."""

    def __init__(
        self, make_mesh: Callable[[], httpx.AsyncBaseTransport], other: httpx.AsyncBaseTransport
    ) -> None:
        self._make = make_mesh
        self.meshes: dict[str, httpx.AsyncBaseTransport] = {}
        self.other = other

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = request.extensions.get(MTLS_EXTENSION)
        if service:
            transport = self.meshes.get(service)
            if transport is None:  # one event loop: no lock needed between the check and the set
                transport = self.meshes[service] = self._make()
            return await transport.handle_async_request(request)
        return await self.other.handle_async_request(request)

    async def aclose(self) -> None:
        try:
            for transport in list(self.meshes.values()):
                await transport.aclose()
        finally:
            await self.other.aclose()
