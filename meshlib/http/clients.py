"""Meshed httpx clients: the real transport (mTLS for mesh endpoints when the Mesh has an
identity), wrapped in the mesh's transport, under the httpx client the user asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from meshlib.http.bounded_io import install
from meshlib.http.h1 import AsyncH1Transport
from meshlib.http.h1_sync import H1Transport
from meshlib.http.transport import AsyncMeshTransport, MeshTransport

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

# httpx.Client arguments that configure the transport: when the mesh supplies the transport
# they are given to the real (inner) transport instead of being silently ignored.
_TRANSPORT_KWARGS = ("verify", "cert", "trust_env", "http1", "http2", "limits")
# those that also shape the transports the mesh makes to originate TLS to External hosts
# (verify and cert are the External's own business: its `ca`)
_ORIGIN_KWARGS = ("http1", "http2", "limits")


def async_client(mesh: Mesh, kwargs: dict[str, Any], meshed: tuple[str, ...] = ()) -> httpx.AsyncClient:
    """Requests to mesh endpoints leave over `AsyncH1Transport` (meshlib/http/h1.py) unless the
    caller gives a transport of their own, asks for HTTP/2, or the Mesh says `http_transport=
    "httpcore"`; the outside world (and External hosts) always over httpx's own transport."""
    inner = kwargs.pop("transport", None)
    options = _pop_transport_kwargs(kwargs)
    h1 = (
        inner is None
        and mesh.http_transport == "h1"
        and not options.get("http2")
        and options.get("http1", True)
    )
    if inner is None:
        inner = httpx.AsyncHTTPTransport(**options)
    endpoints: httpx.AsyncBaseTransport | None = None
    limits = options.get("limits")
    if mesh.credentials is not None:  # mesh endpoints over mTLS, the outside world as before
        from meshlib.security import tls

        context = mesh.credentials.client_context
        if h1:
            inner = tls.AsyncSplitTransport(
                lambda: AsyncH1Transport(ssl_context=context, limits=limits), inner
            )
        else:
            own = tls.mesh_transport_kwargs(options, context)
            inner = tls.AsyncSplitTransport(lambda: install(httpx.AsyncHTTPTransport(**own)), inner)
    elif h1:  # (https to a mesh endpoint without mTLS verifies as the caller said)
        verifying = {k: v for k, v in options.items() if k in ("verify", "cert", "trust_env")}
        endpoints = AsyncH1Transport(tls=verifying, limits=limits)
    origin = {k: v for k, v in options.items() if k in _ORIGIN_KWARGS}
    transport = AsyncMeshTransport(mesh, inner, meshed=meshed, origin_options=origin, endpoints=endpoints)
    return _quick_cookies(httpx.AsyncClient(transport=transport, **kwargs))


def sync_client(mesh: Mesh, kwargs: dict[str, Any], meshed: tuple[str, ...] = ()) -> httpx.Client:
    """The sync twin of `async_client`: mesh endpoints over `H1Transport`
    (meshlib/http/h1_sync.py) under the same conditions."""
    inner = kwargs.pop("transport", None)
    options = _pop_transport_kwargs(kwargs)
    h1 = (
        inner is None
        and mesh.http_transport == "h1"
        and not options.get("http2")
        and options.get("http1", True)
    )
    if inner is None:
        inner = httpx.HTTPTransport(**options)
    endpoints: httpx.BaseTransport | None = None
    limits = options.get("limits")
    if mesh.credentials is not None:
        from meshlib.security import tls

        context = mesh.credentials.client_context
        if h1:
            inner = tls.SplitTransport(lambda: H1Transport(ssl_context=context, limits=limits), inner)
        else:
            own = tls.mesh_transport_kwargs(options, context)
            inner = tls.SplitTransport(lambda: install(httpx.HTTPTransport(**own)), inner)
    elif h1:
        verifying = {k: v for k, v in options.items() if k in ("verify", "cert", "trust_env")}
        endpoints = H1Transport(tls=verifying, limits=limits)
    origin = {k: v for k, v in options.items() if k in _ORIGIN_KWARGS}
    transport = MeshTransport(mesh, inner, meshed=meshed, origin_options=origin, endpoints=endpoints)
    return _quick_cookies(httpx.Client(transport=transport, **kwargs))


def _pop_transport_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in _TRANSPORT_KWARGS if k in kwargs}


_SET_COOKIE = (b"set-cookie", b"set-cookie2")


class _Cookies(httpx.Cookies):
    """httpx's cookies, over the same jar, looked for only in responses that set some.

    httpx hands every response to the stdlib's `CookieJar.extract_cookies`, through a urllib
    `Request` and an `email.message` of all its headers built for it (tens of µs per response,
    the largest single cost of an httpx client after the socket), and the jar finds nothing in
    a response without a Set-Cookie header: nearly every one between services."""

    def extract_cookies(self, response: httpx.Response) -> None:
        items = getattr(response.headers, "_list", None)
        if type(items) is list:
            for item in items:
                if item[1] in _SET_COOKIE:
                    break
            else:
                return
        super().extract_cookies(response)


C = TypeVar("C", httpx.Client, httpx.AsyncClient)


def _quick_cookies(client: C) -> C:
    cookies = getattr(client, "_cookies", None)
    if type(cookies) is httpx.Cookies:  # (setting `client.cookies` later puts httpx's back)
        client._cookies = _Cookies(cookies.jar)
    return client
