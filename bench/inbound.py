"""Server-side cost per request, without a socket: the ASGI and WSGI middleware, in process.

Each middleware is called in a loop with a hand-made request (an ASGI scope with an httpx
client's usual headers plus `x-mesh-source` and `x-mesh-timeout`, or the WSGI environ of the
same request), in front of an app that answers 200 at once; the same loop calling the app alone
is subtracted. Four meshes: `plain` (no rules, no telemetry), `rules` (an Authorization document
the request passes and a local RateLimit it never hits), `metrics` (`metrics_path` set, so the
in-flight gauge and durations are kept) and `tracing` (an SDK TracerProvider whose spans are
dropped). Figures are nanoseconds per request: the least thread CPU time of many repeats, so
other work on the machine (which wall-clock times would include) does not count.

    python bench/inbound.py            # full run (about 20 s)
    python bench/inbound.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from pathlib import Path
from typing import Any

from _common import RESULTS, machine_info, table, write_json
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import meshlib
from meshlib.asgi import MeshMiddleware as AsgiMesh
from meshlib.rules import parse_documents
from meshlib.wsgi import MeshMiddleware as WsgiMesh

DOCS = [
    {"kind": "Authorization", "service": "orders", "allow": [{"from": ["checkout"], "paths": ["/api/*"]}]},
    {"kind": "RateLimit", "service": "orders", "requests_per_second": 1000000, "burst": 1000000},
]
HEADERS = [
    (b"host", b"orders"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"user-agent", b"python-httpx/0.27"),
    (b"x-mesh-source", b"checkout"),
    (b"x-mesh-timeout", b"1500"),
]
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/api/x",
    "wsgi.url_scheme": "http",
} | {"HTTP_" + k.decode().upper().replace("-", "_"): v.decode() for k, v in HEADERS}


class _Drop(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


async def _receive() -> dict[str, Any]:
    return {"type": "http.request"}


async def _send(message: dict[str, Any]) -> None:
    pass


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


def mesh_for(name: str) -> meshlib.Mesh:
    if name == "metrics":
        return meshlib.Mesh("orders", tracing=False, metrics_path="/metrics")
    if name == "tracing":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_Drop()))
        return meshlib.Mesh("orders", tracing=provider, metrics=False)
    mesh = meshlib.Mesh("orders", tracing=False, metrics=False)
    if name == "rules":
        mesh.apply_rules(parse_documents(DOCS), "1")
    return mesh


def measure(mesh: meshlib.Mesh, n: int, repeats: int) -> tuple[float, float]:
    """(ASGI, WSGI) nanoseconds per request, the app's own cost subtracted."""
    loop = asyncio.new_event_loop()

    async def asgi_loop(app: Any) -> None:
        for _ in range(n):
            scope = {"type": "http", "method": "GET", "path": "/api/x", "scheme": "http"}
            await app(scope | {"headers": list(HEADERS)}, _receive, _send)

    def wsgi_loop(app: Any) -> None:
        for _ in range(n):
            body = app(dict(ENVIRON), _start_response)
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def best(run: Any) -> float:
        return min(timeit.repeat(run, number=1, repeat=repeats, timer=time.thread_time)) / n * 1e9

    asgi = best(lambda: loop.run_until_complete(asgi_loop(AsgiMesh(asgi_app, mesh=mesh))))
    asgi -= best(lambda: loop.run_until_complete(asgi_loop(asgi_app)))
    wsgi = best(lambda: wsgi_loop(WsgiMesh(wsgi_app, mesh=mesh))) - best(lambda: wsgi_loop(wsgi_app))
    loop.close()
    return asgi, wsgi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS / "inbound.json", help="where to write results")
    args = parser.parse_args()
    n, repeats = (200, 5) if args.quick else (2000, 40)
    results: dict[str, dict[str, float]] = {}
    for name in ("plain", "rules", "metrics", "tracing"):
        mesh = mesh_for(name)
        try:
            asgi, wsgi = measure(mesh, n, repeats)
        finally:
            mesh.close()
        results[name] = {"asgi_ns": round(asgi), "wsgi_ns": round(wsgi)}
    rows = [(name, f"{r['asgi_ns'] / 1000:.2f}", f"{r['wsgi_ns'] / 1000:.2f}") for name, r in results.items()]
    print(table(("mesh", "ASGI µs/request", "WSGI µs/request"), rows))
    write_json(args.json, {"machine": machine_info(), "requests": n, "repeats": repeats, "results": results})


if __name__ == "__main__":
    main()
