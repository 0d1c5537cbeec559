"""OpenTelemetry tracing and metrics, Prometheus exposition and the access log.

- `hub`: a Mesh's settings (`Mesh(tracing=, metrics=, metrics_path=, access_log=)`), asked by
  every request what there is to do.
- `providers`: which OpenTelemetry provider to use, at near-zero cost when there is none.
- `trace_facts`: what needs no OpenTelemetry API (the carried trace context, ids, names), so a
  process whose app never imports the API does not load it.
- `tracing`: span attributes and W3C trace context on the wire (imports the API).
- `sdk_spans`: spans made by the mesh where the SDK's answer is known (dropped ones, and the
  SDK's own span class filled from a template).
- `client`: the client stack's stages (a span per call, one per retry or hedged copy).
- `server`: what the ASGI/WSGI middleware records per inbound request.
- `metrics`: observable OpenTelemetry instruments over the mesh's own counters.
- `prometheus`: the text exposition of the same figures.
- `access_log`: JSON lines, one per inbound request and per outbound call.

See docs/observability.md.
"""

from meshlib.telemetry.hub import Telemetry
from meshlib.telemetry.prometheus import metrics_app, render

__all__ = ["Telemetry", "metrics_app", "render"]
