"""WSGI server middleware (Flask, Django, any WSGI app).

`flask_app.wsgi_app = MeshMiddleware(flask_app.wsgi_app, mesh=mesh)`. The context variable is
set for the duration of the app call (WSGI runs one request per thread at a time).

The inbound sequence is `meshlib.inbound`'s, as for the ASGI middleware: this shell reads the
environ into its `Request` and answers a `Refusal` itself. A scrape of `Mesh(metrics_path=...)`
is answered before all of it, and so is a prequal probe (`meshlib.probing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from meshlib import probing
from meshlib.balancing.orca import HEADER as LOAD_HEADER
from meshlib.headers import INBOUND
from meshlib.inbound import MARK, Gate, Pending, Request
from meshlib.probing import PROBE_PATH
from meshlib.security.authorization import PEER_KEY, wsgi_peer
from meshlib.telemetry import prometheus
from meshlib.telemetry.server import flask_route
from meshlib.telemetry.tracing import WSGI_HEADERS

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

_KEYS = tuple((name, "HTTP_" + name.upper().replace("-", "_")) for name in INBOUND)


class MeshMiddleware:
    def __init__(self, app: Callable[..., Iterable[bytes]], mesh: Mesh) -> None:
        self.app = app
        self.mesh = mesh
        self.gate = Gate(mesh)
        self.telemetry = mesh.telemetry

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if MARK in environ:  # already meshed further out
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO")
        if path == PROBE_PATH:  # a prequal probe: the mesh's, not the app's, not counted
            return probing.wsgi_answer(self.mesh.load, start_response)
        if path == self.telemetry.metrics_path:  # a scrape: not traffic
            return prometheus.wsgi_answer(self.telemetry, method, start_response)
        request = _request(environ, method)
        try:
            verdict = self.gate.admit(request)
            while isinstance(verdict, Pending):
                verdict.wait()
                verdict = verdict.then()
        except BaseException as exc:  # the mesh's own failure: counted, its span ended, then raised
            request.finish(None, exc)
            raise
        if verdict is not None:
            phrase = HTTPStatus(verdict.status).phrase
            start_response(f"{verdict.status} {phrase}", [(k.title(), v) for k, v in verdict.headers])
            return [verdict.body]
        for name in request.drop:  # a token the app is not to see (`forward: false`)
            environ.pop("HTTP_" + name.upper().replace("-", "_"), None)
        seen: list[Any] = [None, None]  # status, route
        load = self.mesh.load if self.mesh.load_reports else None

        def start(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[0] = int(status_line.split(" ", 1)[0])
            if load is not None:  # ORCA's load report (docs/load-reports.md)
                headers = [*headers, (LOAD_HEADER, load.header())]
            if request.observed is not None:  # Flask forgets its matched rule once the app returns
                seen[1] = flask_route(environ)
            return start_response(status_line, headers, exc_info)

        try:
            result = self.app(environ, start)
        except BaseException as exc:
            request.finish(None, exc, seen[1])
            raise
        request.leave()  # here, in the app's context: the body may be sent from elsewhere

        def done(error: BaseException | None) -> None:
            # a body cut short by a failure is a failed request, whatever its status said
            request.finish(seen[0] if error is None else None, error, seen[1])

        return _Closing(result, done)


def _request(environ: dict[str, Any], method: str) -> Request:
    """The neutral view of an environ (marked as meshed, its peer recorded)."""
    environ[MARK] = True
    peer, secure = wsgi_peer(environ)
    environ[PEER_KEY] = peer
    headers = {}
    for name, key in _KEYS:  # a plain loop: a comprehension is one more call
        if key in environ:
            headers[name] = environ[key]
    scheme = environ.get("wsgi.url_scheme", "http")
    return Request(method, _full_path(environ), scheme, peer, secure, headers, environ, WSGI_HEADERS)


def _full_path(environ: dict[str, Any]) -> str:
    """The request path as the caller wrote it (decoded), mount point included.

    PEP 3333 gives it as latin-1 characters of the raw bytes; rules are written in UTF-8.
    """
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/")
    if not path.isascii():
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    return path


class _Closing:
    """The app's body iterable, counting the request once the server closes it, as failed if
    the body raised while the server read it."""

    def __init__(self, body: Iterable[bytes], done: Callable[[BaseException | None], None]) -> None:
        self._body = body
        self._done = done
        self._error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except GeneratorExit:  # the server stopped reading (the client left): not the app's failure
            raise
        except BaseException as exc:
            self._error = exc
            raise

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._error)
