"""The OpenTelemetry API is imported only once the app has imported it, and a global provider
set before or after the Mesh was made is used all the same. Each case runs in a fresh
interpreter: a process can set its global providers once, and must start without the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
    import json, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Orders(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Orders)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def set_providers():
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        return exporter, reader

    def api_loaded():
        return sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")

    if MODE == "before":
        exporter, reader = set_providers()

    import meshlib
    from meshlib.rules import parse_documents

    mesh = meshlib.Mesh("checkout")
    address = f"127.0.0.1:{server.server_address[1]}"
    mesh.apply_rules(parse_documents(
        [{"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]}]), "1")
    client = mesh.sync_client()
    statuses = [client.get("http://orders/first").status_code]
    loaded_before = api_loaded()
    if MODE == "after":
        exporter, reader = set_providers()
    statuses.append(client.get("http://orders/second").status_code)

    spans = [(s.name, s.kind.name, s.attributes.get("http.response.status_code"),
              s.attributes.get("mesh.service")) for s in exporter.get_finished_spans()]
    counted = 0
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "mesh.requests":
                    counted += sum(p.value for p in metric.data.data_points
                                   if p.attributes.get("mesh.destination") == "orders")
    client.close()
    mesh.close()
    server.shutdown()
    print(json.dumps({"statuses": statuses, "loaded_before": loaded_before, "spans": spans,
                      "counted": counted}))
"""


def _run(mode: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("MESH_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = f"MODE = {mode!r}\n" + textwrap.dedent(SCRIPT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_providers_set_before_the_mesh_get_every_span_and_the_counts() -> None:
    result = _run("before")
    assert result["statuses"] == [200, 200]
    assert result["spans"] == [["GET orders", "CLIENT", 200, "orders"]] * 2
    assert result["counted"] == 2


def test_providers_set_after_the_mesh_are_picked_up_and_the_api_waits_for_the_app() -> None:
    result = _run("after")
    assert result["statuses"] == [200, 200]
    assert result["loaded_before"] == []  # a request made without the app's API loads none of it
    assert result["spans"] == [["GET orders", "CLIENT", 200, "orders"]]  # the call made after
    assert result["counted"] == 2  # the instruments read counters kept all along


def test_a_source_settles_once_its_answer_can_no_longer_change() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import NoOpTracerProvider

    from meshlib.telemetry.providers import UNSETTLED
    from meshlib.telemetry.trace_facts import tracer_source

    off = tracer_source(False)
    assert off.settled is None and off.get() is None
    assert tracer_source(NoOpTracerProvider()).settled is None
    given = tracer_source(TracerProvider())
    tracer = given.get()
    assert tracer is not None and given.settled is tracer  # what `get` answers, without a call
    assert tracer_source(None).settled is UNSETTLED  # the global provider: looked for by `get`
    given.close()
    assert given.settled is None and given.get() is None
