"""The `checkout` client of the orders gRPC service: which version answered, and a stream.

    python examples/grpc/client.py --count 50             # about 1 in 10 from v2 (the 90/10 split)
    python examples/grpc/client.py --count 50 --canary    # all from v2 (x-canary: true)
    python examples/grpc/client.py --control https://127.0.0.1:7070 --token mjt_... --ca .mesh/ca-bundle.crt

The generated stub takes `mesh.grpc_channel("orders")` as it would any grpc channel; the mesh
routes each RPC (subsets, weights, the canary header), picks the instance and, with a join
token, calls it over mTLS that checks it is really `orders`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the generated stubs import each other as top-level modules
    sys.path.insert(0, str(HERE))

import orders_pb2  # noqa: E402
import orders_pb2_grpc  # noqa: E402

import meshlib  # noqa: E402

DEFAULT_CONFIG = os.environ.get("MESH_CONFIG") or str(HERE / "mesh.yaml")
CANARY = (("x-canary", "true"),)


def get_orders(mesh: meshlib.Mesh, count: int, canary: bool = False) -> Counter[str]:
    """GetOrder `count` times and print which version answered each; the tally by version."""
    stub = orders_pb2_grpc.OrdersStub(mesh.grpc_channel("orders"))
    answered: Counter[str] = Counter()
    for order_id in range(1, count + 1):
        try:
            order = stub.GetOrder(
                orders_pb2.OrderRequest(id=order_id), timeout=5, metadata=CANARY if canary else ()
            )
        except grpc.RpcError as exc:
            print(f"order {order_id:>3}: failed: {exc.code().name} {exc.details()}")
            answered["failed"] += 1
        else:
            print(f"order {order_id:>3}: answered by orders {order.version} (it saw caller {order.caller})")
            answered[order.version] += 1
    return answered


def watch_orders(mesh: meshlib.Mesh, count: int, canary: bool = False) -> list[orders_pb2.Order]:
    """WatchOrders: one server-streaming RPC, routed like any other."""
    stub = orders_pb2_grpc.OrdersStub(mesh.grpc_channel("orders"))
    streamed = []
    for order in stub.WatchOrders(
        orders_pb2.WatchRequest(count=count), timeout=5, metadata=CANARY if canary else ()
    ):
        print(f"watch: order {order.id} from orders {order.version}")
        streamed.append(order)
    return streamed


def wait_for_orders(mesh: meshlib.Mesh, timeout: float = 10.0) -> bool:
    """With a control service: until the first orders instance is known (a fresh process may
    start before the control service has answered)."""
    mesh.wait_for_control(timeout)
    deadline = time.monotonic() + timeout
    while mesh.snapshot.grpc_plan("orders") is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Call orders over gRPC through the mesh and tally the versions."
    )
    parser.add_argument("--count", type=int, default=20, help="orders to fetch (default 20)")
    parser.add_argument("--canary", action="store_true", help="send x-canary: true (routed to v2)")
    parser.add_argument("--watch", type=int, default=3, help="orders to stream with WatchOrders (default 3)")
    parser.add_argument("--config", help="rules file (default without --control: $MESH_CONFIG or mesh.yaml)")
    parser.add_argument("--control", help="control service URL (default: $MESH_CONTROL; none: local mode)")
    parser.add_argument("--token", help="join token for the CA (default: $MESH_TOKEN): mTLS")
    parser.add_argument("--ca", help="the control service's CA bundle, for an https URL (default: $MESH_CA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    control = args.control or os.environ.get("MESH_CONTROL")
    config = args.config or (None if control else DEFAULT_CONFIG)
    with meshlib.Mesh("checkout", config=config, control=control, token=args.token, ca=args.ca) as mesh:
        if control and not wait_for_orders(mesh):
            print(f"no orders instance registered with {control}")
        answered = get_orders(mesh, args.count, args.canary)
        if args.watch:
            watch_orders(mesh, args.watch, args.canary)
    print("answered by: " + ", ".join(f"{v} {n}" for v, n in sorted(answered.items())))


if __name__ == "__main__":
    main()
