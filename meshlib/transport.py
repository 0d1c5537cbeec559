"""httpx transports that run the mesh stack: thin sync and async shells over the same filters.

The transport sits where httpx expects one (`httpx.Client(transport=...)`) and wraps a real
transport (`inner`) that does the sending. A request whose host is not a mesh service goes to
`inner` untouched, so one client can call mesh services and the outside world alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import httpx

from meshlib.context import inbound
from meshlib.pipeline import Call

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

SOURCE_HEADER = "x-mesh-source"


class _ClosingSyncStream(httpx.SyncByteStream):
    """A response body that runs callbacks once when it is closed."""

    def __init__(self, stream: httpx.SyncByteStream, fn: Callable[[], None]) -> None:
        self._stream = stream
        self.callbacks = [fn]

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            _run(self.callbacks)


class _ClosingAsyncStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, fn: Callable[[], None]) -> None:
        self._stream = stream
        self.callbacks = [fn]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            _run(self.callbacks)


def _run(callbacks: list[Callable[[], None]]) -> None:
    while callbacks:
        callbacks.pop()()


class HttpxWire:
    """The `Wire` for httpx responses."""

    def status(self, response: httpx.Response) -> int:
        return response.status_code

    def on_close(self, response: httpx.Response, fn: Callable[[], None]) -> None:
        stream = response.stream
        if isinstance(stream, _ClosingSyncStream | _ClosingAsyncStream):
            stream.callbacks.append(fn)
        elif isinstance(stream, httpx.SyncByteStream):
            response.stream = _ClosingSyncStream(stream, fn)
        else:
            response.stream = _ClosingAsyncStream(stream, fn)  # type: ignore[arg-type]

    def close(self, response: httpx.Response) -> None:
        response.close()

    async def aclose(self, response: httpx.Response) -> None:
        await response.aclose()


WIRE = HttpxWire()


def _start(mesh: Mesh, request: httpx.Request) -> Call | None:
    """The Call for a request to a mesh service, or None to pass it through untouched."""
    snapshot = mesh.snapshot
    url = request.url
    plan = snapshot.plans.get(url.host)
    if plan is None:
        return None
    if mesh.service:
        request.headers[SOURCE_HEADER] = mesh.service
    ctx = inbound.get()
    return Call(
        snapshot=snapshot,
        plan=plan,
        wire=WIRE,
        request=request,
        method=request.method,
        path=url.path,
        headers=request.headers,
        source=mesh.service,
        deadline=ctx.deadline if ctx is not None else None,
    )


def _address(call: Call) -> httpx.Request:
    """Point the request at the picked endpoint (the Host header keeps the service name)."""
    request: httpx.Request = call.request
    endpoint = call.endpoint
    assert endpoint is not None
    url = request.url
    if call.path != url.path:
        request.url = url.copy_with(host=endpoint.host, port=endpoint.port, path=call.path)
    else:
        request.url = url.copy_with(host=endpoint.host, port=endpoint.port)
    return request


class MeshTransport(httpx.BaseTransport):
    """Sync shell: `httpx.Client(transport=MeshTransport(mesh))`."""

    def __init__(self, mesh: Mesh, inner: httpx.BaseTransport | None = None) -> None:
        self._mesh = mesh
        self._inner = inner or httpx.HTTPTransport()
        self._service = mesh.stack.build(self._send)

    def _send(self, call: Call) -> httpx.Response:
        return self._inner.handle_request(_address(call))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, request)
        if call is None:
            return self._inner.handle_request(request)
        return self._service(call)

    def close(self) -> None:
        self._inner.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Async shell: `httpx.AsyncClient(transport=AsyncMeshTransport(mesh))`."""

    def __init__(self, mesh: Mesh, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self._mesh = mesh
        self._inner = inner or httpx.AsyncHTTPTransport()
        self._service = mesh.stack.build_async(self._send)

    async def _send(self, call: Call) -> httpx.Response:
        return await self._inner.handle_async_request(_address(call))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        call = _start(self._mesh, request)
        if call is None:
            return await self._inner.handle_async_request(request)
        return await self._service(call)

    async def aclose(self) -> None:
        await self._inner.aclose()
