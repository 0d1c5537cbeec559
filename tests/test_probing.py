"""The probe answer: the server middleware (ASGI under uvicorn, WSGI under werkzeug) answers
`GET /.meshlib/probe` itself with its requests in flight and latency estimate, and the probe
reaches neither the app nor the counts."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
from werkzeug.serving import make_server

import meshlib
from meshlib.balancing.orca import HEADER
from meshlib.probing import PROBE_PATH, read
from meshlib.testing import serve
from tests.conftest import wait_until


class Held:
    """An ASGI app whose requests wait until `release` is set (so they stay in flight)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


def test_the_asgi_middleware_answers_probes_with_rif_and_latency() -> None:
    mesh = meshlib.Mesh("orders")
    app = Held()
    with serve(mesh.asgi(app)) as server, httpx.Client(base_url=server.url) as c:
        probe = c.get(PROBE_PATH)
        assert probe.status_code == 200 and probe.content == b""
        # nothing in flight, no latency known yet; counting starts now (nobody read it before)
        assert read(probe.headers[HEADER]) == (0, 0.0)
        app.release.set()
        assert c.get("/work").text == "ok"  # one request done: a latency is known
        app.release.clear()
        callers = [threading.Thread(target=c.get, args=("/held",)) for _ in range(3)]
        for t in callers:
            t.start()
        wait_until(lambda: len(app.paths) == 4, 5.0, "three requests in flight")
        answer = read(c.get(PROBE_PATH).headers[HEADER])
        app.release.set()
        for t in callers:
            t.join()
    mesh.close()
    assert answer is not None
    rif, latency = answer
    assert rif == 3
    assert 0.0 < latency < 1.0
    assert PROBE_PATH not in app.paths  # the app never saw a probe
    assert mesh.stats.edge("in", "unknown").total == 4  # the four requests, no probe


def test_the_wsgi_middleware_answers_probes_outside_the_app_and_the_counts() -> None:
    mesh = meshlib.Mesh("orders")
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["PATH_INFO"])
        start_response("200 OK", [("content-length", "2")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, mesh.wsgi(app), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}") as c:
            first = read(c.get(PROBE_PATH).headers[HEADER])  # counting starts with the first probe
            assert c.get("/work").text == "ok"
            # the WSGI server sends the body before the middleware hears the request end (the
            # iterable's close): probe until the request has left the count
            probes: list[httpx.Response] = []

            def left_the_count() -> bool:
                probes.append(c.get(PROBE_PATH))
                answer = read(probes[-1].headers[HEADER])
                return answer is not None and answer[0] == 0

            wait_until(left_the_count, 5.0, "the request to leave the count")
    finally:
        server.shutdown()
        mesh.close()
    assert first == (0, 0.0)
    probe = probes[-1]
    assert probe.status_code == 200
    answer = read(probe.headers[HEADER])
    assert answer is not None and answer[0] == 0 and answer[1] > 0.0
    assert seen == ["/work"]
    assert mesh.stats.edge("in", "unknown").total == 1


def test_a_header_without_rif_is_not_a_probe_answer() -> None:
    assert read("TEXT cpu_utilization=0.5") is None
    assert read(None) is None
    assert read("TEXT named_metrics.rif=2, named_metrics.latency=0.25") == (2, 0.25)
