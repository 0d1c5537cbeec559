"""The Prometheus text exposition (format 0.0.4) of one Mesh's traffic figures.

Rendered straight from the Mesh's `TrafficStats` (requests per edge and status class, the
cumulative duration histogram, decision counters) and its endpoints' load records (requests in
flight), which the request path keeps anyway: serving a scrape costs the scrape, and nothing is
counted twice. The families are those of `meshlib.telemetry.metrics` under Prometheus names;
docs/observability.md lists them, and docs/decisions.md says why this is not an OpenTelemetry
reader or `prometheus_client`.

Served by the mesh's middleware on `Mesh(metrics_path=...)` (off by default) or by `metrics_app`
on a port of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from meshlib.telemetry.metrics import (
    EDGE_LABELS,
    FAMILIES,
    LE,
    OTHER,
    Family,
    active,
    balancer_weights,
    decisions,
    edge_labels,
    limits,
    probe_pools,
)

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.telemetry.hub import Telemetry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REQUESTS = "mesh_requests_total"
DURATION = "mesh_request_duration_seconds"
ACTIVE = "mesh_requests_active"
LIMIT = "mesh_concurrency_limit"
POOL = "mesh_prequal_pool_probes"
WEIGHT = "mesh_balancer_weight"
_LE = LE[:-1]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


def _header(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(telemetry: Telemetry) -> str:
    """The whole exposition, every family together as the format requires."""
    own = telemetry.service
    out: list[str] = []
    edges = sorted(
        ((_labels(zip(EDGE_LABELS, edge_labels(own, key), strict=True)), edge)
         for key, edge in telemetry.stats.edges().items()),
        key=lambda item: item[0],
    )  # fmt: skip

    _header(
        out, REQUESTS, "counter", "Requests per edge and status class (outbound: all attempts count once)."
    )
    for base, edge in edges:
        for cls, n in sorted(dict(edge.by_class).items()):
            out.append(f'{REQUESTS}{{{base},status_class="{cls}"}} {n}')

    _header(out, DURATION, "histogram", "Request durations per edge and status class, to response headers.")
    for base, edge in edges:
        sums = dict(edge.sums)
        for cls, slots in sorted(dict(edge.buckets).items()):
            counts = list(slots)
            labels = f'{base},status_class="{cls}"'
            running = 0
            for le, n in zip(_LE, counts, strict=False):
                running += n
                out.append(f'{DURATION}_bucket{{{labels},le="{le}"}} {running}')
            running += counts[-1]
            out.append(f'{DURATION}_bucket{{{labels},le="+Inf"}} {running}')
            out.append(f"{DURATION}_sum{{{labels}}} {_number(sums.get(cls, 0.0))}")
            out.append(f"{DURATION}_count{{{labels}}} {running}")

    _header(out, ACTIVE, "gauge", "Requests in flight: outbound per endpoint, inbound per service.")
    for labels_map, n in active(telemetry):
        out.append(f"{ACTIVE}{{{_labels(labels_map.items())}}} {n}")

    in_force = list(limits(telemetry))
    if in_force:  # only where a limit is configured: most services have none
        _header(out, LIMIT, "gauge", "The adaptive concurrency limit in force: inbound per service, "
                "outbound per destination.")  # fmt: skip
        for labels_map, n in in_force:
            out.append(f"{LIMIT}{{{_labels(labels_map.items())}}} {n}")
    pools = list(probe_pools(telemetry))
    if pools:  # only where a destination balances with prequal
        _header(out, POOL, "gauge", "Prequal probe answers pooled per destination.")
        for labels_map, n in pools:
            out.append(f"{POOL}{{{_labels(labels_map.items())}}} {n}")

    weights = list(balancer_weights(telemetry))
    if weights:  # only where a balancer weighs endpoints by their reports
        _header(out, WEIGHT, "gauge", "Each endpoint's weight in a balancer that weighs by load reports.")
        for labels_map, weight in weights:
            out.append(f"{WEIGHT}{{{_labels(labels_map.items())}}} {_number(weight)}")

    grouped: dict[Family, list[tuple[Mapping[str, str], int]]] = {}
    for fam, labels_map, n in decisions(telemetry):
        grouped.setdefault(fam, []).append((labels_map, n))
    for fam in (*FAMILIES, OTHER):
        _header(out, fam.prom, "counter", fam.help)
        for labels_of, count in grouped.get(fam, ()):
            out.append(f"{fam.prom}{{{_labels(labels_of.items())}}} {count}")
    return "\n".join(out) + "\n"


def _response(method: str, telemetry: Telemetry) -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers with the length, the body to send: none for HEAD, whose length is the
    GET's)."""
    if method not in ("GET", "HEAD"):
        body = b"method not allowed"
        headers = [("content-type", "text/plain"), ("allow", "GET, HEAD")]
        return 405, [*headers, ("content-length", str(len(body)))], body
    body = render(telemetry).encode()
    headers = [
        ("content-type", CONTENT_TYPE),
        ("cache-control", "no-store"),
        ("content-length", str(len(body))),
    ]
    return 200, headers, body if method == "GET" else b""


async def asgi_answer(telemetry: Telemetry, scope: dict[str, Any], send: Any) -> None:
    """Answer a scrape from inside the ASGI middleware."""
    status, headers, body = _response(scope["method"], telemetry)
    raw = [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def wsgi_answer(telemetry: Telemetry, method: str, start_response: Any) -> list[bytes]:
    """Answer a scrape from inside the WSGI middleware."""
    status, headers, body = _response(method, telemetry)
    reason = {200: "OK", 405: "Method Not Allowed"}[status]
    start_response(f"{status} {reason}", headers)
    return [body]


def metrics_app(mesh: Mesh, path: str = "/metrics") -> Any:
    """An ASGI app that serves only `mesh`'s metrics on `path`: for a port of its own (a plain
    HTTP port Prometheus can reach when the service's own port requires mTLS).

        uvicorn.run(meshlib.telemetry.metrics_app(mesh), host="0.0.0.0", port=9090)
    """
    telemetry = mesh.telemetry
    telemetry.exposed = True  # count inbound requests in flight from now on

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != path:
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"9")]})
            await send({"type": "http.response.body", "body": b"not found"})
            return
        await asgi_answer(telemetry, scope, send)

    return app
