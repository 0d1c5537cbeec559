"""The control service's HTTP API (docs/control-api.md), as a Starlette app.

`create_app(ControlSettings(data_dir))` builds the app around a `ControlPlane` (reachable as
`app.state.control`, meshlib.control.plane), which holds the rules store, the registry, the SSE
hub and the in-memory telemetry, and does the work; the handlers (meshlib.control.handlers)
parse requests (meshlib.control.parsing) and shape answers. Serve the app with its lifespan
on: the lifespan runs the reaper that expires instances and saves the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from meshlib.control import dashboard, graph
from meshlib.control.handlers import (
    _handler,
    delete_config,
    delete_instance,
    get_clients,
    get_config,
    get_history,
    get_history_version,
    get_registry,
    healthz,
    metrics,
    post_ack,
    post_register,
    post_rollback,
    post_telemetry,
    put_config,
    put_heartbeat,
    watch,
)
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


def create_app(settings: ControlSettings) -> Starlette:
    """The control service app for `settings.data_dir` (created if missing, with the admin token)."""
    from meshlib.control import openapi, security_api

    plane = ControlPlane(settings)

    def route(path: str, **handlers: Callable[[ControlPlane, Request], Awaitable[Response]]) -> Route:
        by_method = {method: _handler(fn, plane) for method, fn in handlers.items()}
        if "GET" in by_method:
            by_method["HEAD"] = by_method["GET"]

        async def dispatch(request: Request) -> Response:
            return await by_method[request.method](request)

        return Route(path, dispatch, methods=list(by_method))

    routes = [
        route("/", GET=dashboard.index),
        route("/dashboard/{name}", GET=dashboard.static_file),
        route("/v1/graph", GET=graph.get_graph),
        route("/v1/diff", GET=dashboard.get_diff),
        route("/healthz", GET=healthz),
        route("/metrics", GET=metrics),
        route("/v1/config", GET=get_config, PUT=put_config),
        route("/v1/config/{kind}/{service}", DELETE=delete_config),
        route("/v1/history", GET=get_history),
        route("/v1/history/{version}", GET=get_history_version),
        route("/v1/rollback/{version}", POST=post_rollback),
        route("/v1/watch", GET=watch),
        route("/v1/ack", POST=post_ack),
        route("/v1/clients", GET=get_clients),
        route("/v1/registry", GET=get_registry),
        route("/v1/registry/{service}", GET=get_registry, POST=post_register),
        route("/v1/registry/{service}/{id}", PUT=put_heartbeat, DELETE=delete_instance),
        route("/v1/telemetry", POST=post_telemetry),
        route("/v1/ca/sign", POST=security_api.post_sign),
        route("/v1/ca/bundle", GET=security_api.get_bundle),
        route("/v1/ca/rotate", POST=security_api.post_rotate),
        route("/v1/tokens", GET=security_api.get_tokens, POST=security_api.post_token),
        route("/v1/tokens/{id}", DELETE=security_api.delete_token),
        route("/openapi.json", GET=openapi.get_openapi),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(plane.run_reaper(), name="meshlib-control-reaper")
        bundles = asyncio.create_task(security_api.run_bundle_watch(plane), name="meshlib-control-bundle")
        log.info("control: serving %s (version %d, epoch %s)", plane.data_dir, plane.version, plane.hub.epoch)
        try:
            yield
        finally:
            reaper.cancel()
            bundles.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            with contextlib.suppress(asyncio.CancelledError):
                await bundles
            await plane.save_registry(final=True)
            plane.close()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.control = plane
    return app
