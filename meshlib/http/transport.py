"""httpx transports that run the mesh stack: thin sync and async shells over the same filters.

The transport sits where httpx expects one (`httpx.Client(transport=...)`) and wraps a real
transport (`inner`) that does the sending. A request whose host is not a mesh service goes to
`inner` untouched, so one client can call mesh services and the outside world alike; a host
declared by an External document goes through the stack too (with TLS originated by a transport
of the shell's own where the External asks for it), and under the outbound policy
`registry_only` any other host is refused (docs/egress.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import quote

import httpx

from meshlib.balancing.prequal import HTTP
from meshlib.context import inbound
from meshlib.egress import Origination, block, declared_port
from meshlib.errors import NoEndpointsError
from meshlib.headers import ATTEMPT as ATTEMPT_HEADER
from meshlib.headers import FAULT
from meshlib.headers import MIRROR as MIRROR_HEADER
from meshlib.headers import SOURCE as SOURCE_HEADER
from meshlib.headers import TIMEOUT as TIMEOUT_HEADER
from meshlib.http.bounded_io import Bound, install, until
from meshlib.http.probes import HttpProber
from meshlib.pipeline import Call
from meshlib.raw_path import prefix_end
from meshlib.redirects import location
from meshlib.resilience.classify import IDEMPOTENT, Failure, refused_by_tls
from meshlib.resilience.deadline import deadline_error
from meshlib.unknown import no_endpoints_message, single_label

_current_inbound = inbound.get  # bound once: `inbound.get()` makes a bound method per call

if TYPE_CHECKING:
    from meshlib.egress import ExternalTarget
    from meshlib.endpoint import Endpoint
    from meshlib.mesh import Mesh
    from meshlib.rules import RedirectSpec
    from meshlib.runtime import Runtime
    from meshlib.snapshot import ServicePlan, Snapshot

log = logging.getLogger("meshlib.transport")


class _ClosingStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that runs callbacks once when it is closed, whose read fails with
    `DeadlineExceeded` when it times out at the call's deadline (`call` set), and that tells
    `failures` once when a read fails (the health stage: a body cut short is the endpoint's).

    It offers both the sync and the async interface, as the stream it wraps may (httpx's own
    `ByteStream` does); only the one the client uses is ever called.

    `owner`: the set of a shell's responses still open, which it leaves when closed (the shell
    closes those left when its client closes, see `_hold`)."""

    owner: set[_ClosingStream] | None = None

    def __init__(self, stream: Any, fn: Callable[[], None] | None = None, call: Call | None = None) -> None:
        self._stream = stream
        self.callbacks = [fn] if fn is not None else []
        self.call = call
        self.failures: list[Callable[[BaseException], None]] = []

    def __iter__(self) -> Iterator[bytes]:
        if self.call is None and not self.failures:
            return iter(self._stream)  # the inner iterator itself: no generator re-yielding each chunk
        return _DeadlineChunks(iter(self._stream), self.call, self.failures)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self.call is None and not self.failures:
            return self._stream.__aiter__()
        return _DeadlineChunks(self._stream.__aiter__(), self.call, self.failures)

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            owner = self.owner
            if owner is not None:
                owner.discard(self)
            _run(self.callbacks)

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            owner = self.owner
            if owner is not None:
                owner.discard(self)
            _run(self.callbacks)


class _DeadlineChunks:
    """A body's chunks, where a timeout at the call's deadline becomes `DeadlineExceeded` and
    a failed read is told to `failures` (once, with the error the reader gets).

    A class rather than a generator: nothing to finalise when the reader stops early."""

    __slots__ = ("_call", "_chunks", "_failures")

    def __init__(
        self, chunks: Any, call: Call | None, failures: list[Callable[[BaseException], None]]
    ) -> None:
        self._chunks = chunks
        self._call = call
        self._failures = failures

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except httpx.TransportError as exc:
            error = self._failed(exc)
            if error is exc:
                raise
            raise error from exc

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except httpx.TransportError as exc:
            error = self._failed(exc)
            if error is exc:
                raise
            raise error from exc

    def _failed(self, exc: httpx.TransportError) -> BaseException:
        error = deadline_error(self._call, exc) if self._call is not None else None
        failures = self._failures
        while failures:
            failures.pop()(error or exc)
        return error or exc


def _run(callbacks: list[Callable[[], None]]) -> None:
    """Each callback once, even when the caller and a closing client close the stream at once."""
    while callbacks:
        try:
            fn = callbacks.pop()
        except IndexError:  # the other closer took the last one
            return
        fn()


def _hold(response: httpx.Response, open_streams: set[_ClosingStream]) -> httpx.Response:
    """Keep a response whose close something waits for (its bulkhead slot, its endpoint's load)
    among the shell's open ones until it is closed, so that closing the client can close it:
    a streamed response the caller never closes would otherwise hold its slot for good."""
    stream = response.stream
    if type(stream) is _ClosingStream and stream.callbacks:
        stream.owner = open_streams
        open_streams.add(stream)
    return response


def _open_streams(open_streams: set[_ClosingStream]) -> Iterator[_ClosingStream]:
    """Take the still-open streams out of `open_streams`, one at a time (requests on other
    threads may close theirs meanwhile)."""
    while open_streams:
        try:
            yield open_streams.pop()
        except KeyError:
            return


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


_PATH_SAFE = "/!$&'()*+,;=:@~-._"
_NO_BODY = frozenset((204, 304))  # statuses whose answers have no body (1xx are refused by the rules)
MIRROR_MAX_BODY = 64 * 1024
MIRROR_MAX_IN_FLIGHT = 256
MIRROR_TIMEOUT = 10.0
"""Seconds a mirrored copy may take in all (a gRPC copy's deadline too): a peer that trickles
its answer cannot hold one of the MIRROR_MAX_IN_FLIGHT slots for longer."""
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
        self._told_mirror_off = False  # the log says once that copies are skipped after close
        # prequal's probes of mesh endpoints (a balancer asks; they run on the runtime's loop)
        hub = mesh.loads.probes
        self.prober = hub.probers[HTTP] = HttpProber(mesh, hub.budget)

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
        """An HTTP status is final with the headers; a body that fails later is told to
        `on_failure` (the endpoint's health), and raises in the caller's read."""
        return False

    def on_failure(self, response: httpx.Response, fn: Callable[[BaseException], None]) -> bool:
        if response.is_closed:  # read in full already: nothing can fail now
            return False
        stream = response.stream
        if not isinstance(stream, _ClosingStream):
            stream = response.stream = _ClosingStream(stream)
        stream.failures.append(fn)
        return True

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

    def rpc_attributes(
        self, call: Call, response: httpx.Response | None, error: BaseException | None = None
    ) -> dict[str, Any] | None:
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
        """An injected abort: `reason` as its body, but none where HTTP allows none (204, 304,
        an answer to HEAD), as a server's answer would have none (nor its content-length)."""
        if status in _NO_BODY or call.method == "HEAD":
            return httpx.Response(status, headers={FAULT: "abort"}, request=call.request)
        return httpx.Response(status, headers={FAULT: "abort"}, content=reason.encode(), request=call.request)

    def redirect(self, call: Call, spec: RedirectSpec) -> httpx.Response:
        """301 (or the rule's code) with the Location `meshlib.redirects.location` gives for the
        request's URL, and an empty body."""
        url: httpx.URL = call.request.url
        path, _, query = url.raw_path.decode("ascii").partition("?")
        host = url.raw_host.decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        authority = host if url.port is None else f"{host}:{url.port}"
        route = call.route
        prefix = route.match.prefix if route is not None else None
        if prefix is not None and not path.startswith(prefix):  # matched decoded, sent encoded:
            cut = prefix_end(path, prefix)  # the encoded part that reads as the prefix is replaced
            if cut is not None:
                prefix = path[:cut]
            else:
                path = quote(call.path, safe=_PATH_SAFE)
        where = location(
            spec, scheme=url.scheme, authority=authority, path=path, query=query, matched_prefix=prefix
        )
        headers = {"location": where, "content-length": "0"}
        return httpx.Response(spec.code, headers=headers, request=call.request)

    def mirror(self, call: Call, endpoint: Endpoint) -> bool:
        request: httpx.Request = call.request
        if call.plan.external is not None:  # the rules refuse it; a copy never leaves the mesh
            self._mesh.stats.count("mirror_skipped", call.service)
            return False
        size = self.body_size(request)
        if size is None or size > MIRROR_MAX_BODY or not self._mirror_slots.acquire(blocking=False):
            self._mesh.stats.count("mirror_skipped", call.service)
            return False
        runtime = self._runtime()
        if runtime is None:  # the Mesh is closed: no loop to send the copy from
            self._mirror_slots.release()
            self._mesh.stats.count("mirror_skipped", call.service)
            return False
        url = request.url
        if call.path != url.path:  # rewritten: the path as `_address` sends it
            url = _rewritten(call, url)
        url = _with_endpoint(url, endpoint.host, endpoint.port)
        headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
        headers.append((MIRROR_HEADER, "1"))
        identity = self._mesh.credentials
        if identity is not None:  # mTLS: the copy leaves over the identity's client (https, peer check)
            done = self._mirror_slots.release
            copy = identity.send_copy(request.method, url, headers, request.content, call.service, done)
        else:
            copy = self._send_mirror(request.method, url, headers, request.content)
        try:
            runtime.submit(copy)
        except RuntimeError:  # the loop closed since `_runtime` looked (a close on another thread)
            copy.close()  # never started: nothing of it ran, its slot is still taken
            self._mirror_slots.release()
            self._mirror_off()
            self._mesh.stats.count("mirror_skipped", call.service)
            return False
        return True

    def _runtime(self) -> Runtime | None:
        """The Mesh's runtime, to send a copy from; None once the Mesh is closed (and its loop
        with it), so that the copy is skipped rather than failing the request it copies."""
        mesh = self._mesh
        if not mesh.closed:
            runtime = mesh.runtime
            if runtime.loop.is_running():
                return runtime
        self._mirror_off()
        return None

    def _mirror_off(self) -> None:
        if not self._told_mirror_off:
            self._told_mirror_off = True
            log.warning("mirrored copies are skipped from now on: the Mesh is closed")

    async def _send_mirror(
        self, method: str, url: httpx.URL, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        try:
            if self._mirror_client is None:
                self._mirror_client = httpx.AsyncClient(timeout=MIRROR_TIMEOUT)
            async with asyncio.timeout(MIRROR_TIMEOUT):  # httpx's restarts with every byte read
                response = await self._mirror_client.request(method, url, headers=headers, content=body)
                await response.aclose()
        except Exception as exc:  # a mirror's failure is nobody's business but the log's
            log.debug("mirrored %s %s failed: %s", method, url, exc)
        finally:
            self._mirror_slots.release()

    async def shutdown(self) -> None:
        await self.prober.aclose()
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
    mesh: Mesh,
    wire: HttpxWire,
    request: httpx.Request,
    meshed: frozenset[str],
    passthrough: bool,
    registry_only: bool = False,
) -> Call | None:
    """The Call for a request to a mesh service or a declared External, or None to pass it
    through untouched.

    A host without rules is a mesh service, and fails with a NoEndpointsError that says why,
    when it is in `meshed` (a `@mesh.call` name) or is a single-label name and `passthrough`
    is off; any other (a dotted name, an IP, localhost) goes to the outside world, or with
    `registry_only` fails with OutboundBlocked. For a mesh service this costs a dict lookup."""
    snapshot = mesh.snapshot
    url = request.url
    host = url.host
    plan = snapshot.plans.get(host)
    if plan is None:
        plan = _outside(mesh, snapshot, request, meshed, passthrough, registry_only)
        if plan is None:
            return None
    elif mesh.service:  # never told to an External: the caller's name stays inside the mesh
        _set_source(request.headers, mesh.service)
    ctx = _current_inbound()
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


def _outside(
    mesh: Mesh,
    snapshot: Snapshot,
    request: httpx.Request,
    meshed: frozenset[str],
    passthrough: bool,
    registry_only: bool,
) -> ServicePlan | None:
    """The plan of a declared External's port, None to pass the request through; raises for a
    mesh service with no endpoints and for a host the outbound policy blocks."""
    url = request.url
    host = url.host
    ports = snapshot.externals.get(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    if ports is not None:
        return declared_port(mesh, ports, host, port, registry_only, request)
    if host in meshed:
        raise NoEndpointsError(no_endpoints_message(mesh, host), request=request)
    if not passthrough and "." not in host and single_label(host):  # dotted: out at once
        raise NoEndpointsError(no_endpoints_message(mesh, host, host=True), request=request)
    if registry_only:
        block(mesh, host, port, request=request)
    return None


def _address(call: Call) -> httpx.Request:
    """Point the request at the picked endpoint (the Host header keeps the service name), and
    give the attempt its timeout: on the socket, and to the peer as `x-mesh-timeout`.

    The socket's timeouts are `Until` values bound to the attempt's deadline, so that each
    socket operation gets no more than the time left (see `meshlib.http.bounded_io`)."""
    request: httpx.Request = call.request
    endpoint = call.endpoint
    assert endpoint is not None
    external = call.plan.external
    if external is not None:
        return _address_external(call, request, endpoint, external)
    url = request.url
    identity = call.wire._mesh.credentials  # type: ignore[attr-defined]
    scheme = "https" if identity is not None else None  # mTLS to mesh endpoints
    if call.path != url.path:  # rewritten; a later attempt starts from this one's URL
        url = _rewritten(call, url)
        call.path = url.path  # what is sent, decoded: that later attempt sees no rewrite to do
    request.url = _with_endpoint(url, endpoint.host, endpoint.port, scheme)
    if identity is not None:  # the service whose SPIFFE id the peer must show
        identity.secure(request, call.service)
    if call.attempt > 1:
        request.headers[ATTEMPT_HEADER] = str(call.attempt)
    budget = call.attempt_timeout
    if budget is not None:
        request.headers[TIMEOUT_HEADER] = str(max(1, int(budget * 1000)))
        _bound(call, request, budget)
    return request


def _address_external(
    call: Call, request: httpx.Request, endpoint: Endpoint, external: ExternalTarget
) -> httpx.Request:
    """`_address` for an External host: never the mesh's identity nor its headers; https with
    the host (or the origination's `sni`) as SNI when the app or the mesh speaks TLS."""
    url = request.url
    origination = external.origination
    scheme = "https" if origination is not None else url.scheme
    if call.path != url.path:  # as in `_address`
        url = _rewritten(call, url)
        call.path = url.path
    request.url = _with_endpoint(url, endpoint.host, endpoint.port, scheme)
    if scheme == "https":
        request.extensions["sni_hostname"] = origination.sni if origination is not None else external.host
    budget = call.attempt_timeout
    if budget is not None:
        _bound(call, request, budget)
    return request


def _rewritten(call: Call, url: httpx.URL) -> httpx.URL:
    """`url` with the route's `rewrite.prefix` in place of the part of its path, as sent (still
    encoded), that the matched prefix was read from: the rest goes on as the caller encoded it.

    Routes match the decoded path (`call.path`, rewritten by the route stage); encoding that
    again would turn an encoded `/` (`a%2Fb`) into a separator. Only called for a rewrite."""
    route = call.route
    assert route is not None and route.rewrite is not None  # only a rewrite changes call.path
    raw = url.raw_path.decode("ascii").partition("?")[0]
    cut = prefix_end(raw, route.match.prefix or "")
    if cut is None:  # not read from this path (cannot happen for the URL the route matched)
        return url.copy_with(path=call.path)
    rest = raw[cut:]
    if route.rewrite.endswith("/") and rest.startswith("/"):
        rest = rest[1:]  # joined as `CompiledRoute.rewrite_path` joins them
    return url.copy_with(path=route.rewrite + rest)  # the rule's prefix encoded as httpx would


def _bound(call: Call, request: httpx.Request, budget: float) -> None:
    """The attempt's socket timeouts, held to its deadline (`budget` seconds from now)."""
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
            stream = response.stream
            if isinstance(stream, _ClosingStream):  # one wrapper: the failures see the deadline too
                stream.call = call
            else:
                response.stream = _ClosingStream(stream, call=call)
    return response


def _refused(
    exc: httpx.ConnectError, call: Call, request: httpx.Request, origination: Origination
) -> NoReturn:
    """A connect error of an originated TLS call, said in the External's terms when the peer's
    certificate was refused (the same exception type: still a refusal, never retried)."""
    if not refused_by_tls(exc):
        raise exc
    endpoint = call.endpoint.address if call.endpoint is not None else "?"
    raise httpx.ConnectError(
        f"TLS origination to {call.service} at {endpoint} (SNI {origination.sni}): the server's "
        f"certificate failed verification against {origination.verified_by}: {exc}",
        request=request,
    ) from exc


T = TypeVar("T", httpx.BaseTransport, httpx.AsyncBaseTransport)


class _Shell:
    """What both shells keep: the mesh, its wire, and which hosts are mesh services.

    `meshed`: hosts that are always mesh services, never sent to DNS (the names of
    `@mesh.call`); single-label hosts are too unless `Mesh(passthrough=True)`."""

    def __init__(
        self, mesh: Mesh, meshed: Iterable[str], origin_options: dict[str, Any] | None = None
    ) -> None:
        self._mesh = mesh
        # the client's own transport options (limits, http2) for the transports that originate TLS
        self._origin_options = dict(origin_options or {})
        self._wire = mesh.http_wire
        self._meshed = frozenset(name.lower() for name in meshed)  # as httpx gives hosts
        self._passthrough = mesh.passthrough
        self._registry_only = mesh.outbound == "registry_only"
        self._tls_lock = threading.Lock()
        self._origin_transports: dict[tuple[str, str], Any] = {}  # (SNI, CA digest) -> transport
        # responses handed to the caller and not closed yet: closing the client closes them
        self._open: set[_ClosingStream] = set()

    def _originating(self, origination: Origination, make: Callable[..., T]) -> T:
        """The transport that speaks TLS for an External: one per (SNI, CAs), kept across
        Snapshots that keep them, so its connections are reused (and never shared with another
        External's SNI at the same address)."""
        context, key = origination.prepare()
        transports = self._origin_transports
        transport = transports.get(key)
        if transport is None:
            with self._tls_lock:
                transport = transports.get(key)
                if transport is None:
                    transport = transports[key] = install(make(verify=context, **self._origin_options))
        return transport


class MeshTransport(_Shell, httpx.BaseTransport):
    """Sync shell: `httpx.Client(transport=MeshTransport(mesh))`."""

    def __init__(
        self,
        mesh: Mesh,
        inner: httpx.BaseTransport | None = None,
        *,
        meshed: Iterable[str] = (),
        origin_options: dict[str, Any] | None = None,
        endpoints: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(mesh, meshed, origin_options)
        self._inner = install(inner or httpx.HTTPTransport())
        # what sends to mesh endpoints, when not `inner` (meshlib.http.clients: H1Transport)
        self._endpoints = install(endpoints) if endpoints is not None else self._inner
        self._service = mesh.stack.build(self._send)

    def _send(self, call: Call) -> httpx.Response:
        request = _address(call)
        external = call.plan.external
        if external is None:
            return _hand_over(call, request, self._endpoints.handle_request(request))
        if external.origination is None:
            return _hand_over(call, request, self._inner.handle_request(request))
        transport = self._originating(external.origination, httpx.HTTPTransport)
        try:
            response = transport.handle_request(request)
        except httpx.ConnectError as exc:
            _refused(exc, call, request, external.origination)
        return _hand_over(call, request, response)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, self._wire, request, self._meshed, self._passthrough, self._registry_only)
        if call is None:
            return self._inner.handle_request(request)
        url = request.url
        try:
            return _hold(self._service(call), self._open)
        finally:
            request.url = url  # the caller's URL again: response.url, cookies, relative redirects

    def close(self) -> None:
        """Close the responses still open first (as httpx's pool closes their connections):
        their slots and loads are given back; then the transports."""
        for stream in _open_streams(self._open):
            with contextlib.suppress(Exception):  # its callbacks ran all the same
                stream.close()
        try:
            for transport in list(self._origin_transports.values()):
                transport.close()
            if self._endpoints is not self._inner:
                self._endpoints.close()
        finally:
            self._inner.close()


class AsyncMeshTransport(_Shell, httpx.AsyncBaseTransport):
    """Async shell: `httpx.AsyncClient(transport=AsyncMeshTransport(mesh))`."""

    def __init__(
        self,
        mesh: Mesh,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        meshed: Iterable[str] = (),
        origin_options: dict[str, Any] | None = None,
        endpoints: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(mesh, meshed, origin_options)
        self._inner = install(inner or httpx.AsyncHTTPTransport())
        # what sends to mesh endpoints, when not `inner` (meshlib.http.clients: AsyncH1Transport)
        self._endpoints = install(endpoints) if endpoints is not None else self._inner
        self._service = mesh.stack.build_async(self._send)

    async def _send(self, call: Call) -> httpx.Response:
        request = _address(call)
        external = call.plan.external
        if external is None:
            return _hand_over(call, request, await self._endpoints.handle_async_request(request))
        if external.origination is None:
            return _hand_over(call, request, await self._inner.handle_async_request(request))
        transport = self._originating(external.origination, httpx.AsyncHTTPTransport)
        try:
            response = await transport.handle_async_request(request)
        except httpx.ConnectError as exc:
            _refused(exc, call, request, external.origination)
        return _hand_over(call, request, response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, self._wire, request, self._meshed, self._passthrough, self._registry_only)
        if call is None:
            return await self._inner.handle_async_request(request)
        url = request.url
        try:
            return _hold(await self._service(call), self._open)
        finally:
            request.url = url  # the caller's URL again: response.url, cookies, relative redirects

    async def aclose(self) -> None:
        """As `MeshTransport.close`."""
        for stream in _open_streams(self._open):
            with contextlib.suppress(Exception):
                await stream.aclose()
        try:
            for transport in list(self._origin_transports.values()):
                await transport.aclose()
            if self._endpoints is not self._inner:
                await self._endpoints.aclose()
        finally:
            await self._inner.aclose()
