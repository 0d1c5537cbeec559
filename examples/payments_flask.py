"""The `payments` service: a Flask app in the mesh, through the WSGI middleware.

    python examples/payments_flask.py --port 8010

It runs on werkzeug's development server; any WSGI server can serve the app `create_app()` returns.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

from flask import Flask, jsonify, request

import meshlib
import meshlib.context
import meshlib.wsgi

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG") or str(Path(__file__).with_name("mesh.yaml"))


def create_app(config: str | None = DEFAULT_CONFIG) -> tuple[Flask, meshlib.Mesh]:
    """The payments app, and the Mesh it belongs to."""
    mesh = meshlib.Mesh("payments", config=config)
    app = Flask("payments")
    app.wsgi_app = meshlib.wsgi.MeshMiddleware(app.wsgi_app, mesh=mesh)  # type: ignore[method-assign]
    receipts = itertools.count(1)

    @app.post("/payments")
    def pay():  # type: ignore[no-untyped-def]
        body = request.get_json(silent=True) or {}
        inbound = meshlib.context.current()  # set by the mesh middleware
        return jsonify(
            receipt=next(receipts),
            order=body.get("order"),
            amount=body.get("amount"),
            status="authorized",
            caller=inbound.source if inbound else None,
        )

    return app, mesh


def main() -> None:
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description="Run the payments service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help="rules file (default: $MESH_CONFIG or mesh.yaml)"
    )
    args = parser.parse_args()

    app, mesh = create_app(args.config)
    try:
        run_simple(args.host, args.port, app, threaded=True)
    finally:
        mesh.close()


if __name__ == "__main__":
    main()
