"""The bootstrap file a gRPC xDS client reads (GRPC_XDS_BOOTSTRAP): where the control service's
ADS port is and who the client is. Plain JSON, no protos: printing it imports nothing heavy."""

from __future__ import annotations

import secrets
from typing import Any


def bootstrap(service: str, server: str, node_id: str | None = None) -> dict[str, Any]:
    """`service` is the client's own service (the node's cluster, shown in `/v1/clients`);
    `server` the control service's xDS host:port. Plaintext for now (channel_creds insecure)."""
    return {
        "xds_servers": [
            {
                "server_uri": server,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id or f"{service}-{secrets.token_hex(4)}",
            "cluster": service,
            "locality": {},
        },
    }
