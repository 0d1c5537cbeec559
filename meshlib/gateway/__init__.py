"""The ingress gateway (docs/gateway.md): outside traffic into the mesh, routed by host, path
and headers to mesh services through the Mesh's own client stack.

One module per job: `hosts` (host names and patterns), `table` (a gateway's Route compiled),
`forwarding` (which headers cross, `x-forwarded-*`), `tls` (certificates by SNI), `proxy` (a
request in, a call out, bodies streamed), `https_redirect`, `listeners` (one server per port,
kept in step with the Gateway document) and `serving` (the running gateway).
"""

from meshlib.gateway.serving import GatewayServing, serve_gateway

__all__ = ["GatewayServing", "serve_gateway"]
