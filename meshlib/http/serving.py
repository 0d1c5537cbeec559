"""What `Mesh.serve` runs: the app behind the mesh's middleware, as one ASGI app for uvicorn.

An ASGI app gets the ASGI middleware. A WSGI app (Flask, Django, werkzeug, a plain function)
gets the WSGI middleware and then a2wsgi's adapter, which runs it on a thread pool and puts the
ASGI scope into the environ (`environ["asgi.scope"]`): the peer certificate that uvicorn's TLS
layer recorded there reaches `meshlib.security.authorization.wsgi_peer` that way.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

Interface = Literal["asgi", "wsgi"]
INTERFACES = ("auto", "asgi", "asgi3", "wsgi")


def interface_of(app: Any) -> Interface:
    """ "asgi" for an ASGI 3 app, "wsgi" for a WSGI app; TypeError when it is neither or unclear.

    ASGI: a coroutine function of (scope, receive, send), or an object whose `__call__` is one
    (Starlette, FastAPI, middleware classes). WSGI: a plain callable of (environ,
    start_response) (Flask, Django, werkzeug). A plain callable of three arguments is taken as
    ASGI (it returns an awaitable)."""
    if not callable(app):
        raise TypeError(f"serve() needs an ASGI or WSGI app, not {type(app).__name__}")
    if inspect.isclass(app):
        raise TypeError(
            f"serve() got the class {app.__name__}: pass an app instance (ASGI 2 apps are not supported)"
        )
    if _is_coroutine_callable(app):
        return "asgi"
    two, three = _accepts(app, 2), _accepts(app, 3)
    if two and not three:
        return "wsgi"
    if three and not two:
        return "asgi"
    raise TypeError(
        f"serve() cannot tell whether {app!r} is an ASGI or a WSGI app: pass interface='asgi' or 'wsgi'"
    )


def meshed_app(mesh: Mesh, app: Any, interface: str = "auto") -> tuple[Any, Any]:
    """(the ASGI app to run, a callable to release its resources afterwards)."""
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, not {interface!r}")
    kind = interface_of(app) if interface == "auto" else "wsgi" if interface == "wsgi" else "asgi"
    if kind == "asgi":  # serve() registers the address it binds: the lifespan must not
        from meshlib.http.asgi import MeshMiddleware

        return MeshMiddleware(app, mesh=mesh, register=False), _nothing
    from a2wsgi import WSGIMiddleware

    adapter = WSGIMiddleware(mesh.wsgi(app))
    return adapter, functools.partial(adapter.executor.shutdown, wait=False)


def _nothing() -> None:
    return None


def _is_coroutine_callable(app: Any) -> bool:
    while isinstance(app, functools.partial):
        app = app.func
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(type(app), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return not inspect.isroutine(app) and inspect.iscoroutinefunction(call)


def _accepts(app: Any, n: int) -> bool:
    try:
        inspect.signature(app).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): cannot tell
        return True
    return True
