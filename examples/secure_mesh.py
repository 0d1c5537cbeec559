"""A secure mesh in one process: the control service's CA, join tokens, mTLS and authorization.

    python examples/secure_mesh.py

It starts the control service with security on (over https, in a temporary data dir), gives
`orders` and two callers a join token each, serves `orders` with mTLS (STRICT) and an
Authorization document that lets only `checkout` GET orders, then shows who gets through:

    checkout GET  /orders/1 -> 200  orders saw spiffe://mesh.local/svc/checkout
    checkout POST /orders/1 -> 403  RBAC: access denied: source checkout may not POST /orders/1
    reports  GET  /orders/1 -> 403  RBAC: access denied: source reports may not GET /orders/1
    plaintext GET /orders/1 -> 403  (no client certificate: STRICT refuses plaintext)
"""

from __future__ import annotations

import argparse
import logging
import ssl
import tempfile
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from meshlib.control.app import ControlSettings, create_app
from meshlib.control.server_tls import uvicorn_tls_options
from meshlib.security.authorization import current_peer
from meshlib.testing import serve

POLICY = [
    {
        "kind": "Authorization",
        "service": "orders",
        "allow": [{"from": ["checkout"], "methods": ["GET"], "paths": ["/orders/*"]}],
    }
]


async def order(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["id"], "caller": current_peer()})


def show(who: str, method: str, response: httpx.Response) -> None:
    detail = response.json()["caller"] if response.status_code == 200 else response.text.strip()
    if response.status_code == 200:
        detail = f"orders saw {detail}"
    print(f"{who:<9} {method:<4} /orders/1 -> {response.status_code}  {detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "control"
        control_app = create_app(ControlSettings(data, security=True))
        plane = control_app.state.control
        control = serve(control_app, lifespan="on", **uvicorn_tls_options(plane))
        url = f"https://127.0.0.1:{control.port}"
        bundle = str(data / "ca-bundle.crt")
        admin = {"authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
        trust = ssl.create_default_context(cafile=bundle)  # the control service's own CA
        httpx.put(f"{url}/v1/config", json=POLICY, headers=admin, verify=trust).raise_for_status()

        def mesh(service: str) -> meshlib.Mesh:
            token = plane.tokens.create(service, 600)  # what `meshlib token create` does
            return meshlib.Mesh(service, control=url, token=token, ca=bundle, cache_dir=Path(tmp) / "cache")

        orders = mesh("orders")
        server = serve(
            orders.asgi(Starlette(routes=[Route("/orders/{id}", order)])), **orders.uvicorn_options()
        )
        orders.register(server.address)
        checkout, reports = mesh("checkout"), mesh("reports")
        try:
            deadline = time.monotonic() + 10
            for caller in (checkout, reports):  # until orders' registration reaches them
                while "orders" not in caller.snapshot.plans and time.monotonic() < deadline:
                    time.sleep(0.02)
            with checkout.sync_client() as client:
                show("checkout", "GET", client.get("http://orders/orders/1"))
                show("checkout", "POST", client.post("http://orders/orders/1"))
            with reports.sync_client() as client:
                show("reports", "GET", client.get("http://orders/orders/1"))
            plain = httpx.get(f"http://{server.address}/orders/1")
            print(
                f"{'plaintext':<9} GET  /orders/1 -> {plain.status_code}  (no client certificate: "
                "STRICT refuses plaintext)",
                flush=True,
            )
        finally:
            for m in (checkout, reports, orders):
                m.close()
            server.stop()
            control.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
