"""HTTP/1.1 to mesh endpoints on blocking sockets: what sends the sync client's bytes.

The sync twin of `meshlib.http.h1`, sharing its parser and framing. httpcore's sync pool takes
one lock for every request and looks at (and polls) every connection it holds; with 50 threads
that scan is most of a request's CPU. Here a request takes the newest idle connection of its
endpoint from a list of its own (one `poll` of that connection alone tells whether the peer
closed it while it was idle), writes its head in one call and reads the response by hand.

Every wait (connect, TLS handshake, pool, each send and each recv) gets the smaller of httpx's
per-operation timeout and the time left before the mesh's `Until` bound
(`meshlib.http.bounded_io.time_left`), set on the socket just before the operation, so a
trickling peer cannot outlive a deadline. TLS wraps the socket with the context's
`sslsocket_class`: the mesh's client contexts run their SPIFFE check and ticket wait in the
handshake, before a byte of the request leaves. Errors are httpx's types, the cause chained.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx

from meshlib.http.bounded_io import time_left
from meshlib.http.h1 import (
    MAX_HEAD,
    MORE,
    BodyFraming,
    ShortBody,
    _framing,
    _header_list,
    _parse_head,
    _request_head,
    replayable,
)
from meshlib.http.h1 import _response_headers as response_headers

_PORTS = {"http": 80, "https": 443}
_RECV = 65536


class _Connection:
    """One socket and what was read from it but not yet used."""

    __slots__ = ("buffer", "eof", "error", "expires", "key", "received", "sock")

    def __init__(self, sock: socket.socket, key: tuple[Any, ...]) -> None:
        self.sock = sock
        self.key = key
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.expires = 0.0
        self.received = 0  # bytes read in all, to tell an exchange the peer never answered

    def alive(self, now: float) -> bool:
        """Idle and still open: nothing readable (a readable idle socket is at EOF, or holds
        bytes nobody asked for), and not past its keep-alive expiry."""
        if self.eof or self.buffer or now >= self.expires:
            return False
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            poll = select.poll()  # (select's fd_set stops at 1024 descriptors)
            poll.register(sock, select.POLLIN)
            if not poll.poll(0):
                return True
        except (OSError, ValueError):
            return False
        # TLS: a record that carries no application data (a late session ticket) is readable too
        try:
            sock.settimeout(0)
            sock.recv(1)
        except (ssl.SSLWantReadError, BlockingIOError):
            return True
        except OSError:
            return False
        return False  # data nobody asked for, or EOF: not reusable

    def close(self) -> None:
        self.eof = True
        with contextlib.suppress(OSError):
            self.sock.close()

    def more(self, timeout: float | None) -> None:
        """Read what the peer sends next into `buffer`; at EOF set `eof` (the caller tells a
        short read from a whole one)."""
        if self.eof:
            return
        sock = self.sock
        sock.settimeout(time_left(timeout, httpx.ReadTimeout))
        try:
            data = sock.recv(_RECV)
        except TimeoutError:
            raise httpx.ReadTimeout("timed out reading the response") from None
        except OSError as exc:
            self.eof = True
            self.error = exc
            return
        if data:
            self.buffer += data
            self.received += len(data)
        else:
            self.eof = True

    def write(self, data: bytes, timeout: float | None) -> None:
        if self.eof:
            raise httpx.WriteError(
                f"the connection closed before the request was sent: {self.error or 'EOF'}"
            )
        sock = self.sock
        sock.settimeout(time_left(timeout, httpx.WriteTimeout))
        try:
            sock.sendall(data)
        except TimeoutError:
            raise httpx.WriteTimeout("timed out writing the request") from None
        except OSError as exc:
            raise httpx.WriteError(f"the connection closed while the request was sent: {exc}") from exc

    def answered(self) -> bool:
        """After a failed write: whether the peer has sent something back (read without
        waiting), which may be its answer to the part of the request it read."""
        if not self.buffer and not self.eof:
            self.sock.settimeout(0)
            try:
                data = self.sock.recv(_RECV)
            except OSError:
                return False
            if not data:
                self.eof = True
            self.buffer += data
            self.received += len(data)
        return bool(self.buffer)

    def failed(self, what: str) -> httpx.TransportError:
        """The error for a connection that ended before `what` was whole."""
        if self.error is not None:
            error = httpx.ReadError(f"{what}: {self.error}")
            error.__cause__ = self.error  # a TLS alert stays recognisable (refused_by_tls)
            return error
        return httpx.RemoteProtocolError(what)


class _Pool:
    """Connections by (scheme, host, port, SNI): idle ones newest first, a bound on all."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.max_connections = limits.max_connections or 1 << 30
        max_idle = limits.max_keepalive_connections
        self.max_idle = self.max_connections if max_idle is None else max_idle
        self.expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 1e9
        self.idle: dict[tuple[Any, ...], list[_Connection]] = {}
        self.idle_count = 0
        self.open = 0  # idle, in use and being opened: counted against max_connections
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.closed = False

    def take(self, key: tuple[Any, ...], pool_timeout: float | None) -> _Connection | None:
        """An idle connection of `key` that is still open, or None having counted one more
        connection to open (waiting, up to `pool_timeout`, for room). The liveness check (a
        syscall) runs outside the lock."""
        end: float | None = None
        while True:
            stale: _Connection | None = None
            with self.lock:
                while True:
                    idle = self.idle.get(key)
                    if idle:
                        conn = idle.pop()
                        self.idle_count -= 1
                        break
                    if self.open < self.max_connections:
                        self.open += 1
                        return None
                    stale = self._evict_one()  # another endpoint's idle connection makes room
                    if stale is not None:
                        self.open += 1
                        break
                    left = time_left(pool_timeout, httpx.PoolTimeout)
                    if left is not None:
                        now = time.monotonic()
                        end = now + left if end is None else end
                        left = end - now
                        if left <= 0:
                            raise httpx.PoolTimeout("timed out waiting for a connection")
                    self.room.wait(left)
            if stale is not None:
                stale.close()
                return None
            if conn.alive(time.monotonic()):
                return conn
            self.lost(conn)

    def _evict_one(self) -> _Connection | None:
        for key, idle in self.idle.items():
            if idle:
                conn = idle.pop(0)  # that endpoint's oldest
                self.idle_count -= 1
                self.open -= 1
                if not idle:
                    del self.idle[key]
                return conn
        return None

    def give_back(self, conn: _Connection, reusable: bool) -> None:
        with self.lock:
            if reusable and not conn.eof and not self.closed and self.idle_count < self.max_idle:
                conn.expires = time.monotonic() + self.expiry
                idle = self.idle.get(conn.key)
                if idle is None:
                    idle = self.idle[conn.key] = []
                idle.append(conn)
                self.idle_count += 1
                self.room.notify()
                return
            self.open -= 1
            self.room.notify()
        conn.close()

    def lost(self, conn: _Connection | None) -> None:
        """A connection in use (or one being opened, `None`) is gone for good."""
        with self.lock:
            self.open -= 1
            self.room.notify()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            conns = [conn for idle in self.idle.values() for conn in idle]
            self.open -= self.idle_count
            self.idle.clear()
            self.idle_count = 0
        for conn in conns:
            conn.close()


class H1Transport(httpx.BaseTransport):
    """An httpx sync transport speaking HTTP/1.1 over blocking sockets (see the module doc).

    `ssl_context`: for https (the mesh's mTLS client context); without one, https gets the
    context httpx would make of `tls` (its `verify`, `cert`, `trust_env`), made on first use.
    `limits`: as httpx's (max_connections over all endpoints, max_keepalive_connections idle
    ones kept, keepalive_expiry seconds)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        tls: dict[str, Any] | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._ssl = ssl_context
        self._tls = dict(tls or {})
        self._ssl_lock = threading.Lock()
        self._connections = _Pool(limits or httpx.Limits(max_connections=100, max_keepalive_connections=20))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._connections
        if pool.closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(f"request URL has an unsupported scheme {scheme!r}")
        ext = request.extensions
        timeouts = ext.get("timeout") or {}
        sni = ext.get("sni_hostname") if scheme == "https" else None
        key = (scheme, url.host, url.port or _PORTS[scheme], sni)
        conn = pool.take(key, timeouts.get("pool"))
        while conn is not None:  # kept alive: the peer may close it just as it is taken
            heard = conn.received
            try:
                return _exchange(conn, pool, request, timeouts)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                pool.lost(conn)
                if conn.received != heard or not replayable(request):
                    raise
            except BaseException:
                pool.lost(conn)
                raise
            conn = pool.take(key, timeouts.get("pool"))
        if conn is None:
            try:
                conn = self._connect(key, timeouts.get("connect"))
            except BaseException:
                pool.lost(None)
                raise
        try:
            return _exchange(conn, pool, request, timeouts)
        except BaseException:
            pool.lost(conn)
            raise

    def _context(self) -> ssl.SSLContext:
        context = self._ssl
        if context is None:
            with self._ssl_lock:
                context = self._ssl
                if context is None:
                    context = self._ssl = httpx.create_ssl_context(**self._tls)
        return context

    def _connect(self, key: tuple[Any, ...], timeout: float | None) -> _Connection:
        scheme, host, port, sni = key
        left = time_left(timeout, httpx.ConnectTimeout)
        end = None if left is None else time.monotonic() + left
        try:
            sock = socket.create_connection((host, port), timeout=left)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or repr(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if end is not None:
                    sock.settimeout(max(end - time.monotonic(), 0.001))
                sock = self._context().wrap_socket(sock, server_hostname=sni or host)
        except TimeoutError:
            sock.close()
            raise httpx.ConnectTimeout(f"timed out in the TLS handshake with {host}:{port}") from None
        except OSError as exc:  # ssl.SSLError included: a refused certificate stays the cause
            sock.close()
            raise httpx.ConnectError(str(exc) or repr(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, key)

    def close(self) -> None:
        self._connections.close()


def _exchange(
    conn: _Connection, pool: _Pool, request: httpx.Request, timeouts: dict[str, Any]
) -> httpx.Response:
    """Send `request` on `conn` and read the response's head (and its body when it is in)."""
    items = _header_list(request.headers)
    head = _request_head(request, items)
    sent: httpx.TransportError | None = None
    try:
        _send_request(conn, request, head, timeouts.get("write"))
    except (httpx.WriteError, httpx.WriteTimeout) as exc:
        # A peer may answer before it has read the whole body (413, 401 to an upload) and stop
        # reading: what it said is the response, as httpcore gives it. Not reused, of course.
        if not conn.answered():
            raise
        sent = exc
    read_timeout = timeouts.get("read")
    buffer = conn.buffer
    while True:
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > MAX_HEAD:
                raise httpx.RemoteProtocolError("the response's headers are too long")
            if conn.eof:
                if sent is not None:
                    raise sent
                raise conn.failed("Server disconnected without sending a response.")
            conn.more(read_timeout)
            end = buffer.find(b"\r\n\r\n")
        status, reason, headers, version = _parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        if status >= 200:
            break
        if status == 101:
            raise httpx.RemoteProtocolError("this transport does not take protocol upgrades")
    length, keep = _framing(request.method, items, status, headers, version)
    keep = keep and sent is None
    extensions = {"http_version": version, "reason_phrase": reason}
    made = response_headers(headers)
    if length is not None and 0 <= length <= len(buffer):  # the whole body is in
        content = bytes(buffer[:length])
        del buffer[:length]
        response = httpx.Response(status, headers=made, stream=_Whole(content), extensions=extensions)
        pool.give_back(conn, keep)  # last: nothing may fail once the pool has it back
        return response
    stream = _Body(conn, pool, length, keep, read_timeout)
    return httpx.Response(status, headers=made, stream=stream, extensions=extensions)


def _send_request(conn: _Connection, request: httpx.Request, head: bytes, timeout: float | None) -> None:
    try:
        body: bytes | None = request.content
    except httpx.RequestNotRead:
        body = None
    if body is not None:
        if len(body) < 65536:
            conn.write(head + body, timeout)
        else:
            conn.write(head, timeout)
            conn.write(body, timeout)
    else:
        conn.write(head, timeout)
        _send_stream(conn, request, timeout)


def _send_stream(conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
    chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
    stream: Any = request.stream
    for chunk in stream:
        if not chunk:
            continue
        if chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
        else:
            conn.write(chunk, timeout)
    if chunked:
        conn.write(b"0\r\n\r\n", timeout)


class _Whole(httpx.SyncByteStream):
    """A body that arrived with the headers."""

    __slots__ = ("_content",)

    def __init__(self, content: bytes) -> None:
        self._content = content

    def __iter__(self) -> Iterator[bytes]:
        return iter((self._content,) if self._content else ())

    def close(self) -> None:
        pass


class _Body(httpx.SyncByteStream):
    """A body read from the connection as the caller iterates; the connection goes back to
    the pool when the body is whole, and is closed when the caller stops before that."""

    def __init__(
        self, conn: _Connection, pool: _Pool, length: int | None, keep: bool, timeout: float | None
    ) -> None:
        self._conn: _Connection | None = conn
        self._connections = pool
        self._framing = BodyFraming(length)
        self._keep = keep and length is not None
        self._timeout = timeout

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopIteration
        try:
            data = self._framing.take(conn.buffer, conn.eof)
            while data is MORE:
                conn.more(self._timeout)
                data = self._framing.take(conn.buffer, conn.eof)
            if data is None and conn.error is not None and self._framing.until_close:
                raise httpx.ReadError(str(conn.error)) from conn.error
        except ShortBody as exc:
            self._conn = None
            self._connections.lost(conn)
            raise conn.failed(str(exc)) from None
        except BaseException:
            self._conn = None
            self._connections.lost(conn)
            raise
        if data is None:
            self._conn = None
            self._connections.give_back(conn, self._keep)
            raise StopIteration
        return data  # type: ignore[return-value]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # the caller stopped before the end: the connection cannot be reused
            self._connections.lost(conn)
