"""Socket operations held to a deadline: httpcore network backends that clamp each timeout.

httpcore applies a request's timeouts per socket operation, each with the same fixed value, so
a peer that trickles a byte at a time restarts the clock on every read and never times out.
The mesh gives an attempt's timeouts as `Until` values: ordinary floats (every other reader
sees the usual per-operation timeout) that also point to the `Bound` by which the operation
must be over. The backends here wrap httpcore's own and give each connect, read, write and TLS
handshake the smaller of its timeout and the time left, failing at once when none is left, so
a deadline holds whatever the peer does (sync included, where nothing could cancel a read).

The `Bound` is mutable and shared by one attempt's values: the transport moves it from the
attempt's deadline to the call's when the response is handed over, so the body httpcore
reads later is held to the call's deadline (httpcore hands the same value to every operation).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import httpcore
import httpx

log = logging.getLogger("meshlib.transport")

T = TypeVar("T", httpx.BaseTransport, httpx.AsyncBaseTransport)


class Bound:
    """The monotonic time by which one attempt's socket operations must be over (`deadline`),
    and the attempt's own deadline it started as (`attempt`)."""

    __slots__ = ("attempt", "deadline")

    def __init__(self, deadline: float) -> None:
        self.deadline = self.attempt = deadline


class Until(float):
    """A timeout in seconds (as httpx and httpcore take it) with the `Bound` it must also meet."""

    __slots__ = ("bound",)
    bound: Bound


def until(seconds: float, bound: Bound) -> Until:
    """An `Until` (float's own constructor and an attribute: a third of a `__new__`'s cost)."""
    value = Until(seconds)
    value.bound = bound
    return value


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout`, cut to the time left before its bound; `error` if none is left."""
    if type(timeout) is not Until:
        return timeout
    left = timeout.bound.deadline - time.monotonic()
    if left <= 0:
        raise error("timed out: no time left before the deadline")
    return left if left < timeout else timeout


time_left = _left
"""`_left` for transports of the mesh's own (`meshlib.http.h1`), which raise httpx's errors."""


class _Stream(httpcore.NetworkStream):
    """httpcore's stream, each operation's timeout cut to the time left (`_left`)."""

    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """A sync network backend whose streams honour `Until` timeouts."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self.inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self.inner.connect_tcp(host, port, left, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _Stream(self.inner.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _AsyncStream(httpcore.AsyncNetworkStream):
    """The async twin of `_Stream`."""

    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, _left(timeout, httpcore.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AsyncDeadlineBackend(httpcore.AsyncNetworkBackend):
    """The async twin of `DeadlineBackend` (anyio's timeouts, cut the same way)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self.inner.connect_tcp(host, port, left, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        left = _left(timeout, httpcore.ConnectTimeout)
        return _AsyncStream(await self.inner.connect_unix_socket(path, left, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def install(transport: T) -> T:
    """Put the deadline backend under an httpx transport's connection pool; returns `transport`.

    httpx's transports take no network backend, so it goes onto the pool they build (the only
    private attribute the mesh relies on here). Any other transport, and one with HTTP/2 on, is
    left as it is: it still gets per-operation timeouts, just not the deadline clamp. Idempotent.
    """
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, DeadlineBackend | AsyncDeadlineBackend):
        return transport
    if getattr(pool, "_http2", False):
        # an HTTP/2 connection carries many calls and httpcore fails them all when one read
        # times out: one call's deadline must not end the others' (docs/rules.md#deadlines)
        log.info("HTTP/2 enabled: the mesh's deadlines bound each socket operation, not the whole call")
        return transport
    if isinstance(pool, httpcore.ConnectionPool) and isinstance(backend, httpcore.NetworkBackend):
        pool._network_backend = DeadlineBackend(backend)
    elif isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(backend, httpcore.AsyncNetworkBackend):
        pool._network_backend = AsyncDeadlineBackend(backend)
    elif isinstance(transport, httpx.HTTPTransport | httpx.AsyncHTTPTransport):
        log.warning("this httpx keeps no connection pool the mesh knows: deadlines bound each read only")
    return transport


def installed(transport: httpx.BaseTransport | httpx.AsyncBaseTransport) -> bool:
    """Whether `transport`'s socket operations honour the mesh's deadlines."""
    backend = getattr(getattr(transport, "_pool", None), "_network_backend", None)
    return isinstance(backend, DeadlineBackend | AsyncDeadlineBackend)
