"""WSGI server middleware (Flask, Django, any WSGI app).

`flask_app.wsgi_app = MeshMiddleware(flask_app.wsgi_app, mesh=mesh)`. The context variable is
set for the duration of the app call (WSGI runs one request per thread at a time).

Order per request, as in the ASGI middleware: identity -> authorization -> rate limit -> app,
with telemetry started before authorization and a scrape of `Mesh(metrics_path=...)` answered
before all of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from meshlib.context import inbound
from meshlib.inbound import context_from, rate_limited
from meshlib.security.authorization import PEER_KEY, Authorizer, peer_var, wsgi_caller
from meshlib.telemetry import prometheus
from meshlib.telemetry.server import flask_route, wsgi_inbound

if TYPE_CHECKING:
    from meshlib.mesh import Mesh


_MARK = "meshlib.inbound"


class MeshMiddleware:
    def __init__(self, app: Callable[..., Iterable[bytes]], mesh: Mesh) -> None:
        self.app = app
        self.mesh = mesh
        self.authorizer = Authorizer(mesh)
        self.telemetry = mesh.telemetry

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if _MARK in environ:  # already meshed further out
            return self.app(environ, start_response)
        if environ.get("PATH_INFO") == self.telemetry.metrics_path:  # a scrape: not traffic
            return prometheus.wsgi_answer(
                self.telemetry, environ.get("REQUEST_METHOD", "GET"), start_response
            )
        environ[_MARK] = True
        peer, source = wsgi_caller(environ, self.mesh)
        environ[PEER_KEY] = peer
        method = environ.get("REQUEST_METHOD", "GET")
        ctx = context_from(
            self.mesh.service or "",
            method,
            environ.get("PATH_INFO", "/"),
            source,
            environ.get("HTTP_X_MESH_TIMEOUT"),
        )
        path = _full_path(environ)
        observed = wsgi_inbound(self.telemetry, environ, method, path, source)
        status: list[int] = []

        def start(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[:] = [int(status_line.split(" ", 1)[0])]
            if observed is not None:  # Flask forgets its matched rule once the app returns
                observed.route = flask_route(environ)
            return start_response(status_line, headers, exc_info)

        started = time.monotonic()
        reason = self.authorizer.denial(source, method, path)
        if reason is not None:
            self.mesh.stats.record("in", source or "unknown", None, 403, time.monotonic() - started)
            if observed is not None:
                observed.finish(403)
            body = reason.encode("utf-8", "replace")
            start_response(
                "403 Forbidden",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("X-Content-Type-Options", "nosniff"),
                ],
            )
            return [body]
        retry_after = rate_limited(self.mesh)
        if retry_after is not None:
            self.mesh.stats.record("in", source or "unknown", None, 429, time.monotonic() - started)
            if observed is not None:
                observed.finish(429)
            start_response(
                "429 Too Many Requests",
                [("Content-Type", "text/plain"), ("Content-Length", "12"), ("Retry-After", str(retry_after))],
            )
            return [b"rate limited"]
        token = inbound.set(ctx)
        peer_token = peer_var.set(peer) if peer is not None else None
        try:
            result = self.app(environ, start)
        except BaseException as exc:
            if peer_token is not None:
                peer_var.reset(peer_token)
            inbound.reset(token)
            self.mesh.stats.record("in", source or "unknown", None, None, time.monotonic() - started)
            if observed is not None:
                observed.finish(None, exc)
            raise
        if peer_token is not None:
            peer_var.reset(peer_token)
        inbound.reset(token)
        if observed is not None:
            observed.detach()  # here, in the app's context: the body may be sent from elsewhere

        def done() -> None:
            code = status[0] if status else None
            self.mesh.stats.record("in", source or "unknown", None, code, time.monotonic() - started)
            if observed is not None:
                observed.finish(code)

        return _Closing(result, done)


def _full_path(environ: dict[str, Any]) -> str:
    """The request path as the caller wrote it (decoded), mount point included.

    PEP 3333 gives it as latin-1 characters of the raw bytes; rules are written in UTF-8.
    """
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "/")
    if not path.isascii():
        path = path.encode("latin-1", "replace").decode("utf-8", "replace")
    return path


class _Closing:
    """The app's body iterable, counting the request once the server closes it."""

    def __init__(self, body: Iterable[bytes], done: Callable[[], None]) -> None:
        self._body = body
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done()
