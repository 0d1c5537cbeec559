"""Shared pieces of the telemetry tests: SDK providers passed to a Mesh (never set globally),
a meshed Starlette service, and rules pointing one service at another."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import meshlib
import meshlib.asgi
from meshlib.rules import parse_documents
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until


class Traces:
    """A TracerProvider exporting to memory, for Mesh(tracing=...)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def wait_for(self, count: int, what: str = "spans") -> list[ReadableSpan]:
        wait_until(lambda: len(self.spans()) >= count, timeout=10, what=f"{count} {what}")
        return self.spans()


@pytest.fixture
def traces() -> Iterator[Traces]:
    t = Traces()
    yield t
    t.provider.shutdown()


@pytest.fixture
def meter() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider, reader
    provider.shutdown()


class Flaky:
    """Answers 503 to the first `failures` requests, then 200."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.seen.append(dict(request.headers))
            fail = self.failures > 0
            self.failures -= fail
        if fail:
            return JSONResponse({"error": "try again"}, status_code=503)
        return JSONResponse({"item": request.path_params.get("item")})


def relay(mesh: meshlib.Mesh, downstream: str) -> Callable[[Request], Any]:
    """A handler that calls `downstream` through the mesh and answers with its status."""

    async def handler(request: Request) -> Response:
        async with mesh.client() as client:
            r = await client.get(f"http://{downstream}/items/{request.path_params['item']}")
        return JSONResponse({"downstream": r.status_code}, status_code=r.status_code)

    return handler


def calls_payments(mesh: meshlib.Mesh) -> Callable[..., Any]:
    """An ASGI app that calls `payments` through the mesh, then answers 204."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with mesh.client() as client:
            await client.get("http://payments/pay")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def service(mesh: meshlib.Mesh, handler: Callable[[Request], Any]) -> RunningServer:
    """A Starlette app with one route template, meshed, under uvicorn on 127.0.0.1."""
    endpoint = handler if inspect.isfunction(handler) else handler.__call__  # an object: its method
    app = Starlette(routes=[Route("/items/{item}", endpoint)])
    app.add_middleware(meshlib.asgi.MeshMiddleware, mesh=mesh)
    return serve(app)


def point(mesh: meshlib.Mesh, service_name: str, address: str, retries: int = 1, **route: Any) -> None:
    """Rules in `mesh` sending `service_name` to `address`, with `retries` attempts in all."""
    rule: dict[str, Any] = {"name": "main", "match": {"path": {"prefix": "/"}}, **route}
    if retries > 1:
        rule["retries"] = {"attempts": retries, "on": ["5xx"], "backoff": {"base": "1ms", "max": "2ms"}}
    docs = [
        {"kind": "Endpoints", "service": service_name, "endpoints": [{"address": address}]},
        {"kind": "Route", "service": service_name, "routes": [rule]},
    ]
    mesh.apply_rules(parse_documents(docs, source="test"), "test")
