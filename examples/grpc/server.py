"""The `orders` gRPC service in the mesh, in two versions for canary releases.

    python examples/grpc/server.py --port 50051 --version v1          # rules from mesh.yaml
    python examples/grpc/server.py --port 50053 --version v2 \\
        --control https://127.0.0.1:7070 --token mjt_... --ca .mesh/ca-bundle.crt   # mTLS

With a rules file (local mode) the instance serves plaintext and the clients find it in the
file's Endpoints. With a control service and a join token it gets a certificate from the CA,
serves mTLS (STRICT), and registers itself with the labels `version` and
`meshlib.io/protocol: grpc`, so clients find it without any Endpoints document.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the generated stubs import each other as top-level modules
    sys.path.insert(0, str(HERE))

import orders_pb2  # noqa: E402
import orders_pb2_grpc  # noqa: E402

import meshlib  # noqa: E402
import meshlib.context  # noqa: E402
from meshlib.grpc.serving import GrpcServing  # noqa: E402

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG") or str(HERE / "mesh.yaml")


class Orders(orders_pb2_grpc.OrdersServicer):
    """One orders instance: every answer says which version served it and who called."""

    def __init__(self, version: str) -> None:
        self.version = version

    def order(self, order_id: int) -> orders_pb2.Order:
        inbound = meshlib.context.current()  # set by the mesh's server interceptors
        items = ["coffee beans", "grinder"] if order_id % 2 else ["teapot"]
        caller = (inbound.source or "") if inbound is not None else ""
        return orders_pb2.Order(id=order_id, items=items, version=self.version, caller=caller)

    def GetOrder(self, request: orders_pb2.OrderRequest, context: grpc.ServicerContext) -> orders_pb2.Order:
        if request.id <= 0:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.id}")
        return self.order(request.id)

    def WatchOrders(
        self, request: orders_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[orders_pb2.Order]:
        for order_id in range(1, request.count + 1):
            yield self.order(order_id)


def create_mesh(
    version: str,
    *,
    config: str | None = None,
    control: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    **options: Any,
) -> meshlib.Mesh:
    """The Mesh of one orders instance: local with a rules file, or joined to a control service."""
    return meshlib.Mesh(
        "orders", config=config, control=control, token=token, ca=ca, labels={"version": version}, **options
    )


def serve(mesh: meshlib.Mesh, version: str, port: int, host: str = "127.0.0.1") -> GrpcServing:
    """Start serving (mTLS when the Mesh has an identity; registered when it has a control
    service); returns at once."""
    adders = [functools.partial(orders_pb2_grpc.add_OrdersServicer_to_server, Orders(version))]
    return mesh.serve_grpc(adders, port=port, host=host)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run one instance of the orders gRPC service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument(
        "--version",
        default=os.environ.get("ORDERS_VERSION", "v1"),
        help="this instance's version label (default: $ORDERS_VERSION or v1)",
    )
    parser.add_argument("--config", help="rules file (default without --control: $MESH_CONFIG or mesh.yaml)")
    parser.add_argument("--control", help="control service URL (default: $MESH_CONTROL; none: local mode)")
    parser.add_argument("--token", help="join token for the CA (default: $MESH_TOKEN): mTLS")
    parser.add_argument("--ca", help="the control service's CA bundle, for an https URL (default: $MESH_CA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    control = args.control or os.environ.get("MESH_CONTROL")
    config = args.config or (None if control else DEFAULT_CONFIG)
    mesh = create_mesh(args.version, config=config, control=control, token=args.token, ca=args.ca)
    with mesh:
        serving = serve(mesh, args.version, args.port, args.host)
        mtls = mesh.mtls if mesh.credentials is not None else "off"
        where = f"registered with {control}" if control else "local mode"
        print(f"orders {args.version} serving gRPC on {serving.address} (mTLS {mtls}; {where})", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: serving.stop())  # leave the registry, then stop
        serving.wait()  # until Ctrl-C or SIGTERM; deregisters on the way out


if __name__ == "__main__":
    main()
