"""HTTP/1.1 to mesh endpoints on asyncio protocols: what sends the async client's bytes.

httpcore's `AsyncConnectionPool` looks at every pooled connection for every request (and polls
the idle ones' sockets) and runs each socket operation through anyio; at 10-50 concurrent
requests that is most of a request's CPU, and the mesh owns the transport to its endpoints.
Here a request takes the newest idle connection of its endpoint (no scan: a connection the peer
closed has already said so through `connection_lost`), writes its head in one call, and parses
the response from the bytes as they arrive, by hand (status line, headers, Content-Length or
chunked framing: the subset of HTTP/1.1 a response needs). A small body that came with the
headers is returned whole and the connection is back in the pool before httpx sees the response.

Timeouts are httpx's, per operation, and honour the mesh's `Until` values the same way as
`meshlib.http.bounded_io` (each wait gets the smaller of its timeout and the time left before
the bound), so a trickling peer cannot outlive a deadline. Errors are httpx's exception types
with the cause chained (a TLS refusal keeps its `ssl.SSLError` as `__cause__`). TLS goes
through asyncio's `SSLProtocol`, which builds its `SSLObject` from the context's
`sslobject_class`, so the mesh's client contexts run their SPIFFE check and ticket wait here
as under anyio. A peer that answers before it has read the whole request (a 413 to an upload)
and then stops reading gets its answer taken as the response, and the connection dropped; an
upload made in memory yields to the loop after each chunk, so that answer is read before the
next write can fail. A peer that closes at once after answering resets the connection, and a
send that meets the reset makes asyncio stop reading the socket: what the peer said is read
from it as the loop closes it (`_Connection._read_left`; plain connections on asyncio's loop).
HTTP/2, proxies and upgrades are not spoken here: `meshlib.http.clients` keeps
httpcore for those (and for the outside world).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

from meshlib.http.bounded_io import time_left

HIGH_WATER = 256 * 1024
"""Bytes of an unread body buffered before the socket is no longer read (flow control)."""
MAX_HEAD = 64 * 1024
"""A response's status line and headers must fit in this many bytes."""
MAX_CHUNK = 64 * 1024
_NO_BODY_STATUS = frozenset((204, 304))
_KEEP_ALIVE, _CLOSE = b"keep-alive", b"close"
_PORTS = {"http": 80, "https": 443}


class _Connection(asyncio.Protocol):
    """One connection: what arrived (`buffer`), whether the peer is gone, and one waiter."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[Any, ...]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.read_paused = False
        self.write_paused = False
        self.drained: asyncio.Future[bool] | None = None
        self.expires = 0.0
        self.received = 0  # bytes read in all, to tell an exchange the peer never answered

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received += len(data)
        if len(self.buffer) > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake(self.waiter)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(self.waiter)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.eof:
            self._read_left()
        self.eof = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake(self.waiter)
        self._wake(self.drained)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake(self.drained)

    def _read_left(self) -> None:
        """The connection failed (a send met the peer's reset): asyncio's selector transport
        stopped reading it at once, though what the peer said before its reset may still wait
        in the socket (its answer to the part of an upload it read: a 413). It is read here,
        while the transport still has the socket (it closes it after this callback). Only a
        plain connection on asyncio's own loop: TLS bytes would need the TLS layer, and other
        loops (uvloop) read before they fail a send."""
        transport = self.transport
        if (
            transport is None
            or not isinstance(self.loop, asyncio.SelectorEventLoop)
            or transport.get_extra_info("sslcontext") is not None
        ):
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            with sock.dup() as left:
                left.setblocking(False)
                while len(self.buffer) <= MAX_HEAD + HIGH_WATER:
                    data = left.recv(MAX_CHUNK)
                    if not data:
                        break
                    self.buffer += data
                    self.received += len(data)
        except OSError:  # nothing more (EAGAIN), or the reset itself
            pass

    @staticmethod
    def _wake(future: asyncio.Future[bool] | None) -> None:
        if future is not None and not future.done():
            future.set_result(True)

    # -- used by the transport ---------------------------------------------------------------

    def reusable(self, now: float) -> bool:
        return not self.eof and not self.buffer and now < self.expires

    def close(self) -> None:
        self.eof = True
        if self.transport is not None:
            self.transport.close()

    async def more(self, timeout: float | None) -> None:
        """Wait for more bytes than the buffer holds; `ReadTimeout` after `timeout` (held to
        its bound). At EOF it returns at once: the caller tells a short read from a whole one."""
        if self.eof:
            return
        left = time_left(timeout, httpx.ReadTimeout)
        waiter = self.waiter = self.loop.create_future()
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        if left is None:
            await waiter
        else:
            timer = self.loop.call_later(left, _expire, waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
            if not woken:
                raise httpx.ReadTimeout("timed out reading the response")
        self.waiter = None

    async def write(self, data: bytes, timeout: float | None) -> None:
        if self.eof or self.transport is None or self.transport.is_closing():
            # (closing: a send failed and the loop has not yet said so through connection_lost;
            # more writes would only be dropped, each with a warning of asyncio's)
            raise httpx.WriteError(
                f"the connection closed before the request was sent: {self.error or 'EOF'}"
            )
        self.transport.write(data)
        if self.write_paused:
            left = time_left(timeout, httpx.WriteTimeout)
            drained = self.drained = self.loop.create_future()
            timer = self.loop.call_later(left, _expire, drained) if left is not None else None
            try:
                if not await drained:
                    raise httpx.WriteTimeout("timed out writing the request")
            finally:
                if timer is not None:
                    timer.cancel()
                self.drained = None
            if self.eof:
                raise httpx.WriteError(f"the connection closed while the request was sent: {self.error}")

    async def lost(self, timeout: float | None) -> None:
        """After a failed send: wait for the loop to close the connection (a turn or two), which
        reads what the peer had said (`_read_left`); at most `timeout`."""
        try:
            while not self.eof:
                await self.more(timeout)
        except httpx.ReadTimeout:
            pass

    def failed(self, what: str) -> httpx.TransportError:
        """The error for a connection that ended before `what` was whole."""
        if self.error is not None:
            return httpx.ReadError(f"{what}: {self.error}")
        return httpx.RemoteProtocolError(what)


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


class _Pool:
    """Connections by (scheme, host, port, SNI): idle ones newest first, a bound on all."""

    def __init__(self, limits: httpx.Limits) -> None:
        self.max_connections = limits.max_connections or 1 << 30
        self.max_idle = limits.max_keepalive_connections
        if self.max_idle is None:
            self.max_idle = self.max_connections
        self.expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 1e9
        self.idle: dict[tuple[Any, ...], list[_Connection]] = {}
        self.idle_count = 0
        self.open = 0  # connections counted against max_connections (idle, in use, opening)
        self.waiters: deque[asyncio.Future[bool]] = deque()

    def take_idle(self, key: tuple[Any, ...]) -> _Connection | None:
        idle = self.idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            self.idle_count -= 1
            if conn.reusable(now):
                return conn
            conn.close()
            self.open -= 1
        return None

    def evict_one(self) -> bool:
        """Close an idle connection of any endpoint to make room; False if none is idle."""
        for key, idle in self.idle.items():
            if idle:
                idle.pop(0).close()  # the oldest of that endpoint
                self.idle_count -= 1
                self.open -= 1
                if not idle:
                    del self.idle[key]
                return True
        return False

    def give_back(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not conn.eof and self.idle_count < self.max_idle:  # type: ignore[operator]
            conn.expires = time.monotonic() + self.expiry
            idle = self.idle.get(conn.key)
            if idle is None:
                idle = self.idle[conn.key] = []
            idle.append(conn)
            self.idle_count += 1
        else:
            conn.close()
            self.open -= 1
        self._next()

    def lost(self, conn: _Connection) -> None:
        """A connection that was in use is closed for good (an error, a cancellation)."""
        conn.close()
        self.open -= 1
        self._next()

    def _next(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.open -= self.idle_count
        self.idle.clear()
        self.idle_count = 0


class AsyncH1Transport(httpx.AsyncBaseTransport):
    """An httpx async transport speaking HTTP/1.1 over asyncio protocols (see the module doc).

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
        self._connections = _Pool(limits or httpx.Limits(max_connections=100, max_keepalive_connections=20))
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(f"request URL has an unsupported scheme {scheme!r}")
        ext = request.extensions
        timeouts = ext.get("timeout") or {}
        sni = ext.get("sni_hostname") if scheme == "https" else None
        key = (scheme, url.host, url.port or _PORTS[scheme], sni)
        pool = self._connections
        conn = pool.take_idle(key)
        while conn is not None:  # kept alive: the peer may close it just as it is taken
            heard = conn.received
            try:
                return await _exchange(conn, pool, request, timeouts)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                pool.lost(conn)
                if conn.received != heard or not replayable(request):
                    raise
            except BaseException:
                pool.lost(conn)
                raise
            conn = pool.take_idle(key)
        conn = await self._open(key, timeouts)
        try:
            return await _exchange(conn, pool, request, timeouts)
        except BaseException:
            pool.lost(conn)
            raise

    async def _open(self, key: tuple[Any, ...], timeouts: dict[str, Any]) -> _Connection:
        pool = self._connections
        end: float | None = None  # one pool timeout for all the waits of this request
        while pool.open >= pool.max_connections:
            if pool.evict_one():
                break
            timeout = time_left(timeouts.get("pool"), httpx.PoolTimeout)
            if timeout is not None:
                now = time.monotonic()
                end = now + timeout if end is None else end
                timeout = end - now
            await self._wait_for_room(timeout)
            conn = pool.take_idle(key)
            if conn is not None:
                return conn
        pool.open += 1
        try:
            return await self._connect(key, timeouts.get("connect"))
        except BaseException:
            pool.open -= 1
            pool._next()
            raise

    async def _wait_for_room(self, left: float | None) -> None:
        if left is not None and left <= 0:
            raise httpx.PoolTimeout("timed out waiting for a connection")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._connections.waiters.append(waiter)
        timer = loop.call_later(left, _expire, waiter) if left is not None else None
        try:
            woken = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self._connections._next()  # pass the turn on
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not woken:
            raise httpx.PoolTimeout("timed out waiting for a connection")

    async def _connect(self, key: tuple[Any, ...], timeout: float | None) -> _Connection:
        scheme, host, port, sni = key
        left = time_left(timeout, httpx.ConnectTimeout)
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl
            if context is None:
                context = self._ssl = httpx.create_ssl_context(**self._tls)
        try:
            async with asyncio.timeout(left):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, key),
                    host,
                    port,
                    ssl=context,
                    server_hostname=(sni or host) if context is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:  # ssl.SSLError included: a refused certificate stays the cause
            raise httpx.ConnectError(str(exc) or repr(exc)) from exc
        return conn

    async def aclose(self) -> None:
        self._closed = True
        self._connections.close()


async def _exchange(
    conn: _Connection, pool: _Pool, request: httpx.Request, timeouts: dict[str, Any]
) -> httpx.Response:
    """Send `request` on `conn` and read the response's head (and its body when it is in)."""
    items = _header_list(request.headers)
    head = _request_head(request, items)
    sent: httpx.TransportError | None = None
    try:
        await _send_request(conn, request, head, timeouts.get("write"))
    except (httpx.WriteError, httpx.WriteTimeout) as exc:
        # A peer may answer before it has read the whole body (413, 401 to an upload) and stop
        # reading: what it said is the response, as httpcore gives it. Not reused, of course.
        # A peer that closed at once after it answered reset the connection, and the send that
        # met the reset failed before the loop read the answer: that is read as the loop
        # closes the connection.
        if not conn.buffer and isinstance(exc, httpx.WriteError):
            await conn.lost(timeouts.get("read"))
        if not conn.buffer:
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
            await conn.more(read_timeout)
            end = buffer.find(b"\r\n\r\n")
        status, reason, headers, version = _parse_head(bytes(buffer[:end]))
        del buffer[: end + 4]
        if status >= 200:
            break
        if status == 101:
            raise httpx.RemoteProtocolError("this transport does not take protocol upgrades")
        # 100 Continue, 103 Early Hints: an interim response, the real one follows
    length, keep = _framing(request.method, items, status, headers, version)
    keep = keep and sent is None
    extensions = {"http_version": version, "reason_phrase": reason}
    made = _response_headers(headers)
    if length is not None and 0 <= length <= len(buffer):  # the whole body is in: done with the socket
        content = bytes(buffer[:length])
        del buffer[:length]
        response = httpx.Response(status, headers=made, stream=_Whole(content), extensions=extensions)
        pool.give_back(conn, keep)  # last: nothing may fail once the pool has it back
        return response
    body_stream = _Body(conn, pool, length, keep, read_timeout)
    return httpx.Response(status, headers=made, stream=body_stream, extensions=extensions)


IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


def replayable(request: httpx.Request) -> bool:
    """Whether a request that failed on a kept-alive connection before any byte of an answer
    may be sent again on a new one: an idempotent method and a body in memory. Such a failure
    is almost always the peer closing the idle connection as it was taken (its keep-alive ran
    out: uvicorn's and this pool's are both 5 s); clients from Go's to urllib3's send again."""
    if request.method.encode() not in IDEMPOTENT:
        return False
    try:
        request.content  # noqa: B018 - raises for a streamed body (it cannot be replayed)
    except httpx.RequestNotRead:
        return False
    return True


def _header_list(headers: httpx.Headers) -> list[tuple[bytes, bytes, bytes]]:
    """(name as given, lowercase name, value) for each header: httpx's own list when it keeps
    one (`Headers.raw` builds a new list of pairs on every call), else made from `raw`."""
    items = getattr(headers, "_list", None)
    if type(items) is list:
        return items
    return [(name, name.lower(), value) for name, value in headers.raw]


def _request_head(request: httpx.Request, items: list[tuple[bytes, bytes, bytes]]) -> bytes:
    parts = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, _, value in items:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # a CR or LF inside a header would start a header (or a request) of the caller's making
    lines = len(items) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise httpx.LocalProtocolError("a header name or value holds a line break")
    return head


def _response_headers(headers: list[tuple[bytes, bytes]]) -> httpx.Headers:
    """httpx's `Headers` from parsed pairs, its list filled directly when it keeps one (its
    constructor checks and encodes each name and value again)."""
    made = httpx.Headers()
    if type(getattr(made, "_list", None)) is list:
        made._list = [(name, name.lower(), value) for name, value in headers]
        return made
    return httpx.Headers(headers)


async def _send_request(
    conn: _Connection, request: httpx.Request, head: bytes, timeout: float | None
) -> None:
    try:
        body: bytes | None = request.content
    except httpx.RequestNotRead:
        body = None
    if body is not None:
        await conn.write(head + body if len(body) < 65536 else head, timeout)
        if len(body) >= 65536:
            await conn.write(body, timeout)
    else:
        await conn.write(head, timeout)
        await _send_stream(conn, request, timeout)


async def _send_stream(conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
    chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
    stream: Any = request.stream
    async for chunk in stream:
        if not chunk:
            continue
        if chunked:
            await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
        else:
            await conn.write(chunk, timeout)
        # a body made in memory never yields to the loop: let it read what the peer said (an
        # early answer, kept if a later write fails) before the socket is written again
        await asyncio.sleep(0)
    if chunked:
        await conn.write(b"0\r\n\r\n", timeout)


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    lines = head.split(b"\r\n")
    line = lines[0]
    version = line[:8]
    if not version.startswith(b"HTTP/1.") or line[8:9] != b" " or not line[9:12].isdigit():
        raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {line[:40]!r}")
    status = int(line[9:12])
    reason = line[13:]
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or name[:1] in (b" ", b"\t"):
            raise httpx.RemoteProtocolError(f"malformed response header line: {line[:40]!r}")
        headers.append((name, value.strip(b" \t")))
    return status, reason, headers, version


def _framing(
    method: str,
    sent: list[tuple[bytes, bytes, bytes]],
    status: int,
    headers: list[tuple[bytes, bytes]],
    version: bytes,
) -> tuple[int | None, bool]:
    """The body's length (`None`: chunked or until close, `-1`: chunked) and whether the
    connection can carry another request afterwards (RFC 9112 6.3 and 9.3)."""
    length: int | None = None
    chunked = until_close = False
    keep = version == b"HTTP/1.1"
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise httpx.RemoteProtocolError(f"bad Content-Length: {value[:40]!r}")
            length = int(value)
        elif lower == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            until_close = not chunked
        elif lower == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if _CLOSE in tokens:
                keep = False
            elif _KEEP_ALIVE in tokens:
                keep = True
    if keep:
        for item in sent:
            if item[1] == b"connection" and _CLOSE in item[2].lower():
                keep = False
    if method == "HEAD" or status in _NO_BODY_STATUS or status < 200:
        return 0, keep
    if chunked:  # with a Content-Length too: read as chunked, but never trusted with another request
        return -1, keep and length is None
    if until_close or length is None:
        return None, False
    return length, keep


_HEX = frozenset(b"0123456789abcdefABCDEF")


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions after ';' ignored): hex digits only, so a
    sign, a '0x' or an underscore that Python's int() would take is a protocol error."""
    size = line.split(b";", 1)[0].strip(b" \t")
    if not size or len(size) > 16 or not _HEX.issuperset(size):
        raise httpx.RemoteProtocolError(f"bad chunk size: {line[:40]!r}")
    return int(size, 16)


class ShortBody(Exception):
    """The peer closed the connection before the body was whole (the message says how)."""


class _More:
    __slots__ = ()


MORE = _More()
"""What `BodyFraming.take` returns when it needs more bytes from the peer."""


class BodyFraming:
    """A response body's framing without IO, shared by the async and sync transports: `take`
    consumes what it can from the connection's buffer and returns the next piece of the body,
    None at its end, or MORE when the peer must send more first (ShortBody if it closed).

    `length`: the bytes of a body with a Content-Length, -1 for chunked, None until the close."""

    __slots__ = ("_left", "_mode", "_state")

    def __init__(self, length: int | None) -> None:
        self._left = length if length is not None and length >= 0 else 0
        self._mode = (
            "length" if length is not None and length >= 0 else "chunked" if length == -1 else "close"
        )
        self._state = "size"  # chunked: size, data, end (the CRLF after a chunk), trailers

    @property
    def until_close(self) -> bool:
        return self._mode == "close"

    def take(self, buffer: bytearray, eof: bool) -> bytes | _More | None:
        if self._mode == "length":
            return self._fixed(buffer, eof)
        if self._mode == "chunked":
            return self._chunk(buffer, eof)
        if not buffer:
            return None if eof else MORE
        return _cut(buffer, MAX_CHUNK)

    def _fixed(self, buffer: bytearray, eof: bool) -> bytes | _More | None:
        if self._left == 0:
            return None
        if not buffer:
            if eof:
                raise ShortBody(
                    f"peer closed connection without sending complete message body ({self._left} bytes short)"
                )
            return MORE
        data = _cut(buffer, min(self._left, MAX_CHUNK))
        self._left -= len(data)
        return data

    def _chunk(self, buffer: bytearray, eof: bool) -> bytes | _More | None:
        while True:
            if self._state == "data":
                data = self._fixed(buffer, eof)
                if data is not None:
                    return data
                self._state = "end"
                continue
            line = _line(buffer, eof)
            if line is None:
                return MORE
            if self._state == "end":
                if line:
                    raise httpx.RemoteProtocolError("a chunk is longer than its size says")
                self._state = "size"
            elif self._state == "size":
                self._left = chunk_size(line)
                self._state = "data" if self._left else "trailers"
            elif not line:  # trailers, up to an empty line
                return None


def _cut(buffer: bytearray, most: int) -> bytes:
    data = bytes(buffer[:most])
    del buffer[:most]
    return data


def _line(buffer: bytearray, eof: bool) -> bytes | None:
    """The next CRLF-ended line of the buffer, consumed; None while it is not whole."""
    end = buffer.find(b"\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise httpx.RemoteProtocolError("a chunk-size or trailer line is too long")
        if eof:
            raise ShortBody("peer closed connection without sending complete message body")
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 2]
    return line


class _Whole(httpx.AsyncByteStream):
    """A body that arrived with the headers; its own iterator (an async generator would be
    registered with the loop's finaliser on its first step, a few µs each)."""

    __slots__ = ("_content",)

    def __init__(self, content: bytes) -> None:
        self._content = content

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._content)

    async def aclose(self) -> None:
        pass


class _Once:
    __slots__ = ("_content",)

    def __init__(self, content: bytes) -> None:
        self._content = content

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        content = self._content
        if not content:
            raise StopAsyncIteration
        self._content = b""
        return content


class _Body(httpx.AsyncByteStream):
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

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            data = self._framing.take(conn.buffer, conn.eof)
            while data is MORE:
                await conn.more(self._timeout)
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
            raise StopAsyncIteration
        return data  # type: ignore[return-value]

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:  # the caller stopped before the end: the connection cannot be reused
            self._connections.lost(conn)
