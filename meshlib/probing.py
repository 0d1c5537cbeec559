"""The prequal probe on the wire: what a client asks and what a server answers.

A probe is `GET /.meshlib/probe` (HTTP) or the gRPC method `/meshlib.Probe/Check`. The server
middleware or interceptor answers it itself, before the app and outside every count (it is not a
request of the app's: no stats, no telemetry, no load of its own), with `200` and an empty body
(gRPC: OK, an empty message) and `endpoint-load-metrics` (a header; gRPC: trailing metadata) in
ORCA's TEXT form, the same as a load report, carrying `named_metrics.rif` (requests in flight
now) and `named_metrics.latency` (the server's latency estimate in seconds for one more request,
from `ServerLoad.latency`: with nothing recent, the latest it knows). A server that has served
nothing yet leaves it out; the client reads that as 0 (nothing known to be slow).
The first probe a server gets turns its request counting on (`ServerLoad.tracking`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshlib.balancing.orca import HEADER, format_report, parse_report
from meshlib.server_load import ServerLoad

PROBE_PATH = "/.meshlib/probe"
"""The reserved path of a probe (any method answers the same; clients send GET)."""

PROBE_STATUS = 200

PROBE_METHOD = "/meshlib.Probe/Check"
"""The reserved gRPC method of a probe: empty request and answer (raw bytes), the figures in
the trailing metadata `endpoint-load-metrics`, answered by the server interceptors."""


def answer(load: ServerLoad) -> list[tuple[str, str]]:
    """The probe answer's headers for this server's load now."""
    return [(HEADER, report_text(load)), ("content-length", "0")]


def report_text(load: ServerLoad) -> str:
    """The `endpoint-load-metrics` value of a probe answer. A server counts its requests only
    once something reads the counts: the first probe turns that on (it answers 0 in flight and
    no latency; the next ones, the figures), so a server needs no setting to be probed."""
    load.tracking = True
    report = load.report()
    named = dict(report.named_metrics)
    latency = load.latency()
    if latency is not None:
        named["latency"] = latency
    return format_report(type(report)(cpu_utilization=report.cpu_utilization, named_metrics=named))


async def asgi_answer(load: ServerLoad, send: Any) -> None:
    """Answer a probe on an ASGI connection (the request body, if any, is not read)."""
    headers = [(name.encode(), value.encode("latin-1")) for name, value in answer(load)]
    await send({"type": "http.response.start", "status": PROBE_STATUS, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def wsgi_answer(load: ServerLoad, start_response: Callable[..., Any]) -> list[bytes]:
    """Answer a probe on a WSGI server."""
    start_response(f"{PROBE_STATUS} OK", answer(load))
    return []


def read(value: str | bytes | None) -> tuple[int, float] | None:
    """(requests in flight, latency in seconds) from a probe answer's header; None when the
    header says no RIF (not a probe answer)."""
    report = parse_report(value)
    if report is None:
        return None
    rif = report.named_metrics.get("rif")
    if rif is None:
        return None
    return int(rif), report.named_metrics.get("latency", 0.0)
