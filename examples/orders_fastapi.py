"""The `orders` service: a FastAPI app in the mesh, in two versions for canary releases.

    python examples/orders_fastapi.py --port 8001 --version v1
    python examples/orders_fastapi.py --port 8002 --version v1
    ORDERS_VERSION=v2 python examples/orders_fastapi.py --port 8003

The instance's `version` label is what the `v1`/`v2` subsets of examples/mesh.yaml select on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fastapi import FastAPI

import meshlib
import meshlib.asgi
import meshlib.context

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG") or str(Path(__file__).with_name("mesh.yaml"))


def create_app(version: str, config: str | None = DEFAULT_CONFIG) -> tuple[FastAPI, meshlib.Mesh]:
    """An orders app of the given version, and the Mesh it belongs to."""
    mesh = meshlib.Mesh("orders", config=config, labels={"version": version})
    app = FastAPI(title=f"orders {version}")
    app.add_middleware(meshlib.asgi.MeshMiddleware, mesh=mesh)

    @app.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, object]:
        inbound = meshlib.context.current()  # set by the mesh middleware
        return {
            "id": order_id,
            "version": version,
            "items": ["coffee beans", "grinder"] if order_id % 2 else ["teapot"],
            "caller": inbound.source if inbound else None,
        }

    return app, mesh


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one instance of the orders service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--version",
        default=os.environ.get("ORDERS_VERSION", "v1"),
        help="this instance's version label (default: $ORDERS_VERSION or v1)",
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="rules file (default: $MESH_CONFIG or mesh.yaml)"
    )
    args = parser.parse_args()

    app, mesh = create_app(args.version, args.config)
    print(f"orders {args.version} on http://{args.host}:{args.port}", flush=True)
    try:
        mesh.serve(app, host=args.host, port=args.port)
    finally:
        mesh.close()


if __name__ == "__main__":
    main()
