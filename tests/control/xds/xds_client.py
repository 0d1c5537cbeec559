"""A plain grpcio xDS client (no meshlib import), run as its own process because gRPC reads
GRPC_XDS_BOOTSTRAP once per process. It reads one JSON command a line on stdin:
{"calls": N, "metadata": {...}, "fail": "UNAVAILABLE"} and prints one JSON line: how many calls
each server answered, and the status codes of the failed ones."""

from __future__ import annotations

import collections
import json
import sys

import grpc

from tests.grpc import echo_pb2, echo_pb2_grpc


def main() -> None:
    channel = grpc.insecure_channel(f"xds:///{sys.argv[1]}")
    stub = echo_pb2_grpc.EchoStub(channel)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        servers: collections.Counter[str] = collections.Counter()
        codes: collections.Counter[str] = collections.Counter()
        metadata = tuple(command.get("metadata", {}).items())
        for _ in range(command["calls"]):
            try:
                pong = stub.Unary(
                    echo_pb2.Ping(text="hi", fail=command.get("fail", "")),
                    metadata=metadata,
                    timeout=command.get("timeout", 5.0),
                    wait_for_ready=command.get("wait_for_ready", False),
                )
                servers[pong.server] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        print(json.dumps({"servers": servers, "codes": codes}), flush=True)


if __name__ == "__main__":
    main()
