"""The control service's HTTP API (docs/control-api.md), as a Starlette app around a `ControlPlane`
(`plane`, reachable as `app.state.control`) with the routes of `handlers`. Serve it with its
lifespan on: the lifespan runs the reaper that expires instances and saves the registry, and
on an etcd store the watch that brings other replicas' rules versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meshlib.control.ack_route import AckFastPath
from meshlib.control.handlers import routes
from meshlib.control.parsing import ApiError
from meshlib.control.plane import ControlPlane, ControlSettings

__all__ = ["ApiError", "ControlPlane", "ControlSettings", "create_app"]

log = logging.getLogger("meshlib.control")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("control: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, 500)


async def _idle() -> None:
    """Nothing to do (no etcd: no client records to share)."""


async def _xds(plane: ControlPlane) -> None:
    """The ADS server, when the settings give it a port (its protos are imported only then)."""
    s = plane.settings
    if s.xds_port is None:
        return
    if s.security:  # plaintext with no join token: it would hand rules and endpoints to anyone
        log.error("xds: not served: the ADS port has no TLS yet, and security is on")
        return
    from meshlib.control.xds.server import serve

    try:
        await serve(plane, s.xds_host, s.xds_port)
    except Exception:
        log.exception("xds: the ADS server stopped")
        raise


def create_app(settings: ControlSettings) -> Starlette:
    """The control service app for `settings.data_dir` (created if missing, with the admin token)."""
    from meshlib.control import security_api

    plane = ControlPlane(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(plane.run_reaper(), name="meshlib-control-reaper")
        bundles = asyncio.create_task(security_api.run_bundle_watch(plane), name="meshlib-control-bundle")
        store = asyncio.create_task(plane.run_store_watch(), name="meshlib-control-store-watch")
        security = asyncio.create_task(security_api.run_shared(plane), name="meshlib-control-security-watch")
        shared = plane.shared_clients
        records = asyncio.create_task(shared.run() if shared else _idle(), name="meshlib-control-clients")
        xds = asyncio.create_task(_xds(plane), name="meshlib-control-xds")
        log.info("control: serving %s (version %d, epoch %s)", plane.data_dir, plane.version, plane.hub.epoch)
        try:
            yield
        finally:
            for task in (reaper, bundles, store, security, records, xds):
                task.cancel()
            for task in (reaper, bundles, store, security, records, xds):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if shared is not None:
                await shared.close()  # this replica's clients leave the others' views now
            await plane.save_registry(final=True)
            plane.close()

    app = Starlette(
        routes=routes(plane),
        middleware=[Middleware(AckFastPath, plane=plane)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.control = plane
    return app
