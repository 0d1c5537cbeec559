"""httpx transports that run the mesh stack: thin sync and async shells over the same filters.

The transport sits where httpx expects one (`httpx.Client(transport=...)`) and wraps a real
transport (`inner`) that does the sending. A request whose host is not a mesh service goes to
`inner` untouched, so one client can call mesh services and the outside world alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from meshlib.context import inbound
from meshlib.errors import NoEndpointsError
from meshlib.headers import ATTEMPT as ATTEMPT_HEADER
from meshlib.headers import FAULT
from meshlib.headers import MIRROR as MIRROR_HEADER
from meshlib.headers import SOURCE as SOURCE_HEADER
from meshlib.headers import TIMEOUT as TIMEOUT_HEADER
from meshlib.http.bounded_io import Bound, install, until
from meshlib.pipeline import Call
from meshlib.resilience.classify import IDEMPOTENT, Failure, refused_by_tls
from meshlib.resilience.deadline import deadline_error
from meshlib.unknown import no_endpoints_message, single_label

if TYPE_CHECKING:
    from meshlib.endpoint import Endpoint
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.transport")


class _ClosingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that runs callbacks once when it is closed, and whose read fails with
    `DeadlineExceeded` when it times out at the call's deadline (`call` set).

    It offers both the sync and the async interface, as the stream it wraps may (httpx's own
    `ByteStream` does); only the one the client uses is ever called."""

    def __init__(self, stream: Any, fn: Callable[[], None] | None = None, call: Call | None = None) -> None:
        self._stream = stream
        self.callbacks = [fn] if fn is not None else []
        self.call = call

    def __iter__(self) -> Iterator[bytes]:
        if self.call is None:
            return iter(self._stream)  # the inner iterator itself: no generator re-yielding each chunk
        return _DeadlineChunks(iter(self._stream), self.call)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self.call is None:
            return self._stream.__aiter__()
        return _DeadlineChunks(self._stream.__aiter__(), self.call)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            _run(self.callbacks)

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            _run(self.callbacks)


class _DeadlineChunks:
    """A body's chunks, where a timeout at the call's deadline becomes `DeadlineExceeded`.

    A class rather than a generator: nothing to finalise when the reader stops early."""

    __slots__ = ("_call", "_chunks")

    def __init__(self, chunks: Any, call: Call) -> None:
        self._chunks = chunks
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except httpx.TransportError as exc:
            error = deadline_error(self._call, exc)
            if error is None:
                raise
            raise error from exc

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except httpx.TransportError as exc:
            error = deadline_error(self._call, exc)
            if error is None:
                raise
            raise error from exc


def _run(callbacks: list[Callable[[], None]]) -> None:
    while callbacks:
        callbacks.pop()()


class _HeaderView:
    """Read-only `get` by lowercase name over httpx's header list.

    `httpx.Headers.get` raises and catches a KeyError for a missing header (~2 us, and route
    rules mostly ask for headers a request does not have); this scans the (raw, lowercase,
    value) triples instead. Repeated headers are joined with ", " as httpx does; values are
    decoded as UTF-8, falling back to Latin-1.
    """

    __slots__ = ("_list",)

    def __init__(self, headers: httpx.Headers) -> None:
        self._list: list[tuple[bytes, bytes, bytes]] = headers._list

    def get(self, name: str, default: Any = None) -> Any:
        key = name.encode("latin-1")
        found: bytes | None = None
        for item in self._list:
            if item[1] == key:
                found = item[2] if found is None else found + b", " + item[2]
        if found is None:
            return default
        try:
            return found.decode("utf-8")
        except UnicodeDecodeError:
            return found.decode("latin-1")


MIRROR_MAX_BODY = 64 * 1024
MIRROR_MAX_IN_FLIGHT = 256
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def _failure_kind(error: BaseException) -> Failure | None:
    if isinstance(error, httpx.ConnectError | httpx.ReadError) and refused_by_tls(error):
        return Failure.REFUSED  # a certificate refused, by either side: retrying will not help
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return Failure.CONNECT
    if isinstance(error, httpx.TimeoutException):
        return Failure.TIMEOUT
    if isinstance(error, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return Failure.RESET
    return None


DRAIN_MAX_BYTES = 64 * 1024


def _drainable(response: httpx.Response) -> bool:
    if response.is_closed or response.is_stream_consumed:
        return False
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= DRAIN_MAX_BYTES


def _back_to_attempt(response: httpx.Response) -> None:
    """Hold what is left of a discarded response's body to its attempt's deadline again."""
    bound: Bound | None = response.extensions.get(_BOUND)
    if bound is not None:
        bound.deadline = bound.attempt


class HttpxWire:
    """The `Wire` for httpx, one per Mesh (mirrored copies leave from the Mesh's runtime)."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._mirror_client: httpx.AsyncClient | None = None
        # taken on the caller's thread, given back on the runtime's: a semaphore, not a counter
        self._mirror_slots = threading.BoundedSemaphore(MIRROR_MAX_IN_FLIGHT)

    def status(self, response: httpx.Response) -> int:
        return response.status_code

    def header(self, response: httpx.Response, name: str) -> str | None:
        return response.headers.get(name)

    def header_view(self, headers: httpx.Headers) -> Any:
        return _HeaderView(headers) if type(getattr(headers, "_list", None)) is list else headers

    def on_close(self, response: httpx.Response, fn: Callable[[], None]) -> None:
        if response.is_closed:  # a body read in full already (a made-up or mocked response)
            fn()
            return
        stream = response.stream
        if isinstance(stream, _ClosingStream):
            stream.callbacks.append(fn)
        else:
            response.stream = _ClosingStream(stream, fn)

    def open(self, response: httpx.Response) -> bool:
        """An HTTP status is final with the headers: a body that fails later is the caller's."""
        return False

    def on_end(self, response: httpx.Response, fn: Callable[[BaseException | None], None]) -> None:
        fn(None)

    def close(self, response: httpx.Response) -> None:
        """Discard a response (a failed attempt, a losing hedge); a small body is read first
        so that its connection goes back to the pool instead of being dropped."""
        if _drainable(response):
            _back_to_attempt(response)  # the drain is part of the attempt, not the caller's read
            with contextlib.suppress(httpx.HTTPError):
                response.read()
        response.close()

    async def aclose(self, response: httpx.Response) -> None:
        if _drainable(response):
            _back_to_attempt(response)
            with contextlib.suppress(httpx.HTTPError):
                await response.aread()
        await response.aclose()

    def failure_kind(self, error: BaseException) -> Failure | None:
        return _failure_kind(error)

    def body_size(self, request: httpx.Request) -> int | None:
        try:
            return len(request.content)
        except httpx.RequestNotRead:
            return None

    def idempotent(self, call: Call, concurrent: bool = False) -> bool:
        return call.method in IDEMPOTENT

    def condition(self, response: httpx.Response) -> str | None:
        return None

    def rpc_attributes(self, call: Call, response: httpx.Response | None) -> dict[str, Any] | None:
        return None

    def copy_request(self, request: httpx.Request) -> httpx.Request:
        return httpx.Request(
            request.method,
            request.url,
            headers=request.headers.copy(),
            content=request.content,
            extensions=dict(request.extensions),
        )

    def synthesize(self, call: Call, status: int, reason: str) -> httpx.Response:
        return httpx.Response(status, headers={FAULT: "abort"}, content=reason.encode(), request=call.request)

    def mirror(self, call: Call, endpoint: Endpoint) -> bool:
        request: httpx.Request = call.request
        size = self.body_size(request)
        if size is None or size > MIRROR_MAX_BODY or not self._mirror_slots.acquire(blocking=False):
            self._mesh.stats.count("mirror_skipped", call.service)
            return False
        url = request.url.copy_with(host=endpoint.host, port=endpoint.port, path=call.path)
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
        headers.append((MIRROR_HEADER, "1"))
        identity = self._mesh.credentials
        if identity is not None:  # mTLS: the copy leaves over the identity's client (https, peer check)
            done = self._mirror_slots.release
            self._mesh.runtime.submit(
                identity.send_copy(request.method, url, headers, request.content, call.service, done)
            )
            return True
        self._mesh.runtime.submit(self._send_mirror(request.method, url, headers, request.content))
        return True

    async def _send_mirror(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        try:
            if self._mirror_client is None:
                self._mirror_client = httpx.AsyncClient(timeout=10.0)
            response = await self._mirror_client.request(method, url, headers=headers, content=body)
            await response.aclose()
        except Exception as exc:  # a mirror's failure is nobody's business but the log's
            log.debug("mirrored %s %s failed: %s", method, url, exc)
        finally:
            self._mirror_slots.release()

    async def shutdown(self) -> None:
        if self._mirror_client is not None:
            await self._mirror_client.aclose()
            self._mirror_client = None


_PLAIN_HOST = re.compile(r"[a-z0-9.-]+\Z")


def _with_endpoint(url: httpx.URL, host: str, port: int, scheme: str | None = None) -> httpx.URL:
    """`url` with another host and port (and scheme), without running httpx's URL parser again.

    `URL.copy_with` re-parses and re-validates the whole URL (the largest single cost of the
    mesh per request); only host and port change here, and an IPv4 address or a plain
    lowercase name needs no encoding, so the parsed form is reused. Anything else, or an httpx
    whose URL is built differently, takes the public path.
    """
    ref: Any = getattr(url, "_uri_reference", None)
    if type(ref) is not _PARSE_RESULT or not _PLAIN_HOST.match(host):
        return url.copy_with(scheme=scheme or url.scheme, host=host, port=port)
    new = httpx.URL.__new__(httpx.URL)
    # a NamedTuple's _replace costs ~1.5 us; building the tuple directly a fifth of that
    fields = (scheme or ref[0], ref[1], host, port, ref[4], ref[5], ref[6])
    new._uri_reference = tuple.__new__(_PARSE_RESULT, fields)
    return new


def _parse_result_type() -> type | None:
    """httpx's parsed-URL tuple type, if it has the fields `_with_endpoint` relies on."""
    ref = getattr(httpx.URL("http://a/"), "_uri_reference", None)
    fields = getattr(type(ref), "_fields", None)
    ok = fields == ("scheme", "userinfo", "host", "port", "path", "query", "fragment")
    return type(ref) if ok else None


_PARSE_RESULT: Any = _parse_result_type()


_SOURCE_KEY = SOURCE_HEADER.encode()


def _set_source(headers: httpx.Headers, service: str) -> None:
    """`headers[x-mesh-source] = service`, on the header list itself when httpx keeps one.

    `Headers.__setitem__` encodes, lowercases and scans on every call (~1.5 us); the list
    holds (raw name, lowercase name, value) triples, so a request without the header (nearly
    every one) gets it appended with no more than a scan.
    """
    items = getattr(headers, "_list", None)
    if type(items) is not list or not service.isascii():
        headers[SOURCE_HEADER] = service
        return
    for item in items:
        if item[1] == _SOURCE_KEY:
            headers[SOURCE_HEADER] = service
            return
    items.append((_SOURCE_KEY, _SOURCE_KEY, service.encode()))


def _start(
    mesh: Mesh, wire: HttpxWire, request: httpx.Request, meshed: frozenset[str], passthrough: bool
) -> Call | None:
    """The Call for a request to a mesh service, or None to pass it through untouched.

    A host without rules is a mesh service, and fails with a NoEndpointsError that says why,
    when it is in `meshed` (a `@mesh.call` name) or is a single-label name and `passthrough`
    is off; any other (a dotted name, an IP, localhost) goes to the outside world. For such
    a host this costs a set lookup and a few string tests."""
    snapshot = mesh.snapshot
    url = request.url
    host = url.host
    plan = snapshot.plans.get(host)
    if plan is None:
        if host in meshed:
            raise NoEndpointsError(no_endpoints_message(mesh, host), request=request)
        if not passthrough and "." not in host and single_label(host):  # dotted: out at once
            raise NoEndpointsError(no_endpoints_message(mesh, host, host=True), request=request)
        return None
    if mesh.service:
        _set_source(request.headers, mesh.service)
    ctx = inbound.get()
    return Call(
        plan,
        wire,
        request,
        request.method,
        url.path,
        request.headers,
        mesh.service,
        ctx.deadline if ctx is not None else None,
    )


def _address(call: Call) -> httpx.Request:
    """Point the request at the picked endpoint (the Host header keeps the service name), and
    give the attempt its timeout: on the socket, and to the peer as `x-mesh-timeout`.

    The socket's timeouts are `Until` values bound to the attempt's deadline, so that each
    socket operation gets no more than the time left (see `meshlib.http.bounded_io`)."""
    request: httpx.Request = call.request
    endpoint = call.endpoint
    assert endpoint is not None
    url = request.url
    identity = call.wire._mesh.credentials  # type: ignore[attr-defined]
    scheme = "https" if identity is not None else None  # mTLS to mesh endpoints
    if call.path != url.path:
        request.url = url.copy_with(
            scheme=scheme or url.scheme, host=endpoint.host, port=endpoint.port, path=call.path
        )
    else:
        request.url = _with_endpoint(url, endpoint.host, endpoint.port, scheme)
    if identity is not None:  # the service whose SPIFFE id the peer must show
        identity.secure(request, call.service)
    if call.attempt > 1:
        request.headers[ATTEMPT_HEADER] = str(call.attempt)
    budget = call.attempt_timeout
    if budget is not None:
        request.headers[TIMEOUT_HEADER] = str(max(1, int(budget * 1000)))
        ext = request.extensions
        user = ext.setdefault("meshlib.user_timeout", ext.get("timeout") or {})
        end = time.monotonic() + budget
        if call.deadline is not None and call.deadline < end:
            end = call.deadline
        bound = ext[_BOUND] = Bound(end)
        whole = until(budget, bound)
        ext["timeout"] = {
            k: whole if user.get(k) is None else until(min(user[k], budget), bound) for k in _TIMEOUT_KEYS
        }
    return request


_BOUND = "meshlib.bound"


def _hand_over(call: Call, request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """The attempt's response goes to the caller (unless a filter discards it): from now on no
    retry, and its body is held to the call's deadline (not the attempt's), failing with
    `DeadlineExceeded` past it."""
    bound: Bound | None = request.extensions.get(_BOUND)
    if bound is not None:
        deadline = call.deadline
        bound.deadline = math.inf if deadline is None else deadline
        response.extensions[_BOUND] = bound  # for a drain, should the response be discarded
        if deadline is not None and not response.is_closed:
            response.stream = _ClosingStream(response.stream, call=call)
    return response


class _Shell:
    """What both shells keep: the mesh, its wire, and which hosts are mesh services.

    `meshed`: hosts that are always mesh services, never sent to DNS (the names of
    `@mesh.call`); single-label hosts are too unless `Mesh(passthrough=True)`."""

    def __init__(self, mesh: Mesh, meshed: Iterable[str]) -> None:
        self._mesh = mesh
        self._wire = mesh.http_wire
        self._meshed = frozenset(name.lower() for name in meshed)  # as httpx gives hosts
        self._passthrough = mesh.passthrough


class MeshTransport(_Shell, httpx.BaseTransport):
    """Sync shell: `httpx.Client(transport=MeshTransport(mesh))`."""

    def __init__(
        self, mesh: Mesh, inner: httpx.BaseTransport | None = None, *, meshed: Iterable[str] = ()
    ) -> None:
        super().__init__(mesh, meshed)
        self._inner = install(inner or httpx.HTTPTransport())
        self._service = mesh.stack.build(self._send)

    def _send(self, call: Call) -> httpx.Response:
        request = _address(call)
        return _hand_over(call, request, self._inner.handle_request(request))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, self._wire, request, self._meshed, self._passthrough)
        if call is None:
            return self._inner.handle_request(request)
        return self._service(call)

    def close(self) -> None:
        self._inner.close()


class AsyncMeshTransport(_Shell, httpx.AsyncBaseTransport):
    """Async shell: `httpx.AsyncClient(transport=AsyncMeshTransport(mesh))`."""

    def __init__(
        self, mesh: Mesh, inner: httpx.AsyncBaseTransport | None = None, *, meshed: Iterable[str] = ()
    ) -> None:
        super().__init__(mesh, meshed)
        self._inner = install(inner or httpx.AsyncHTTPTransport())
        self._service = mesh.stack.build_async(self._send)

    async def _send(self, call: Call) -> httpx.Response:
        request = _address(call)
        return _hand_over(call, request, await self._inner.handle_async_request(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, self._wire, request, self._meshed, self._passthrough)
        if call is None:
            return await self._inner.handle_async_request(request)
        return await self._service(call)

    async def aclose(self) -> None:
        await self._inner.aclose()
