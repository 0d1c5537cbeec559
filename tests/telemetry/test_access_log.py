"""The access log: JSON lines for inbound requests and outbound calls, tied to their traces,
with no secret from the request in them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from opentelemetry.trace import SpanKind
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import meshlib
from meshlib.telemetry.access_log import KEYS
from meshlib.testing import serve
from tests.backend import Backend
from tests.conftest import wait_until
from tests.telemetry.conftest import Flaky, Traces, point, service

SECRETS = ("s3cret-token", "s3cret-cookie", "s3cret-query")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshlib.access"]


def test_access_log_lines_carry_trace_ids_and_no_secrets(
    caplog: pytest.LogCaptureFixture, traces: Traces
) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.access")
    front = meshlib.Mesh("front", tracing=traces.provider, access_log=True)
    back = meshlib.Mesh("back", tracing=traces.provider, access_log=True)

    async def forward(request: Request) -> Response:
        # the app passes the caller's credentials on, as apps do: they must not reach the log
        keep = {k: v for k, v in request.headers.items() if k in ("authorization", "cookie")}
        async with front.client() as client:
            r = await client.get("http://back/items/9?token=s3cret-query", headers=keep)
        return JSONResponse({"downstream": r.status_code}, status_code=r.status_code)

    with service(back, Flaky(failures=1)) as b, service(front, forward) as f:
        point(front, "back", b.address, retries=2)
        r = httpx.get(
            f"{f.url}/items/1?token=s3cret-query",
            headers={
                "authorization": "Bearer s3cret-token",
                "cookie": "session=s3cret-cookie",
                "x-mesh-source": "edge",
            },
        )
        assert r.status_code == 200
        wait_until(lambda: len(_lines(caplog)) >= 4, what="four access-log lines")
        spans = traces.wait_for(5)  # front's server and call spans, the retry's, back's two
    front.close()
    back.close()

    raw = [r.getMessage() for r in caplog.records if r.name == "meshlib.access"]
    for line in raw:
        assert not any(s in line for s in SECRETS), line
        assert "authorization" not in line.lower() and "cookie" not in line.lower()
    lines = _lines(caplog)
    assert all(list(entry) == list(KEYS) for entry in lines)
    assert len({e["trace_id"] for e in lines}) == 1, "one request, one trace"

    inbound_front = next(e for e in lines if e["direction"] == "in" and e["destination"] == "front")
    outbound = next(e for e in lines if e["direction"] == "out")
    inbound_back = sorted(
        (e for e in lines if e["destination"] == "back" and e["direction"] == "in"),
        key=lambda e: e["attempts"] or 1,
    )

    server = next(s for s in spans if s.kind == SpanKind.SERVER and s.attributes["mesh.service"] == "front")
    client = next(s for s in spans if s.name == "GET back")
    assert inbound_front["trace_id"] == format(server.context.trace_id, "032x")
    assert inbound_front["span_id"] == format(server.context.span_id, "016x")
    assert outbound["span_id"] == format(client.context.span_id, "016x")

    assert inbound_front == inbound_front | {
        "source": "edge",
        "route": "/items/{item}",
        "method": "GET",
        "path": "/items/1",
        "status": 200,
        "upstream": None,
        "mirror": False,
        "error": None,
    }
    assert outbound == outbound | {
        "source": "front",
        "destination": "back",
        "route": "main",
        "upstream": b.address,
        "method": "GET",
        "path": "/items/9",
        "status": 200,
        "attempts": 2,
        "error": None,
    }
    assert [(e["status"], e["attempts"]) for e in inbound_back] == [(503, None), (200, 2)]
    assert all(e["duration_ms"] > 0 for e in lines)
    assert outbound["time"].endswith("Z") and outbound["time"][:2] == "20"


def test_access_log_to_a_file_without_tracing_keeps_the_callers_trace_id(tmp_path: Path, fleet) -> None:
    _, payments = fleet.start("payments")
    log_file = tmp_path / "access.log"
    mesh = meshlib.Mesh("orders", tracing=False, access_log=log_file)
    point(mesh, "payments", payments.address)

    async def app(scope, receive, send) -> None:
        async with mesh.client() as client:
            await client.get("http://payments/pay", headers={"authorization": "Bearer s3cret-token"})
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with serve(mesh.asgi(app)) as front:
        httpx.get(f"{front.url}/checkout", headers={"traceparent": TRACEPARENT, "cookie": "a=s3cret-cookie"})
        wait_until(lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 2, what="2 lines")
    mesh.close()
    text = log_file.read_text()
    assert not any(s in text for s in SECRETS)
    entries = [json.loads(line) for line in text.splitlines()]
    assert {e["direction"] for e in entries} == {"in", "out"}
    assert {e["trace_id"] for e in entries} == {TRACEPARENT.split("-")[1]}
    assert all(e["span_id"] is None for e in entries), "no spans were made"
    inbound = next(e for e in entries if e["direction"] == "in")
    assert inbound["status"] == 204 and inbound["path"] == "/checkout"


def test_access_log_is_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.access")
    mesh = meshlib.Mesh("orders")
    assert mesh.telemetry.access is None
    with serve(mesh.asgi(Backend("orders"))) as server:
        assert httpx.get(server.url).status_code == 200
    mesh.close()
    assert _lines(caplog) == []
