"""WSGI server middleware (Flask, Django, any WSGI app).

`flask_app.wsgi_app = MeshMiddleware(flask_app.wsgi_app, mesh=mesh)`. The context variable is
set for the duration of the app call (WSGI runs one request per thread at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from meshlib.context import inbound
from meshlib.inbound import context_from, rate_limited

if TYPE_CHECKING:
    from meshlib.mesh import Mesh


_MARK = "meshlib.inbound"


class MeshMiddleware:
    def __init__(self, app: Callable[..., Iterable[bytes]], mesh: Mesh) -> None:
        self.app = app
        self.mesh = mesh

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if _MARK in environ:  # already meshed further out
            return self.app(environ, start_response)
        environ[_MARK] = True
        source = environ.get("HTTP_X_MESH_SOURCE")
        ctx = context_from(
            self.mesh.service or "",
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("PATH_INFO", "/"),
            source,
            environ.get("HTTP_X_MESH_TIMEOUT"),
        )
        status: list[int] = []

        def start(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status[:] = [int(status_line.split(" ", 1)[0])]
            return start_response(status_line, headers, exc_info)

        started = time.monotonic()
        retry_after = rate_limited(self.mesh)
        if retry_after is not None:
            self.mesh.stats.record("in", source or "unknown", None, 429, time.monotonic() - started)
            start_response(
                "429 Too Many Requests",
                [("Content-Type", "text/plain"), ("Content-Length", "12"), ("Retry-After", str(retry_after))],
            )
            return [b"rate limited"]
        token = inbound.set(ctx)
        try:
            result = self.app(environ, start)
        except BaseException:
            inbound.reset(token)
            self.mesh.stats.record("in", source or "unknown", None, None, time.monotonic() - started)
            raise
        inbound.reset(token)
        return _Closing(
            result,
            lambda: self.mesh.stats.record(
                "in", source or "unknown", None, status[0] if status else None, time.monotonic() - started
            ),
        )


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
