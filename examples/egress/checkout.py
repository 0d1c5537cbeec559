"""A client of an external API through the mesh: plain http in the code, HTTPS on the wire.

    python examples/egress/checkout.py

With mesh.yaml the mesh originates TLS to payments.example (verified against the API's own CA),
answers the old /v1/ path with a redirect that httpx follows, and, under the outbound policy
registry_only, refuses a host that nobody declared.
"""

from __future__ import annotations

import os
from pathlib import Path

import meshlib

CONFIG = os.environ.get("MESH_CONFIG") or str(Path(__file__).with_name("mesh.yaml"))


def main() -> None:
    with meshlib.Mesh("checkout", config=CONFIG, outbound="registry_only") as mesh:
        with mesh.sync_client(follow_redirects=True) as client:
            # the app speaks plain http to a declared External; the mesh speaks HTTPS upstream
            response = client.post("http://payments.example/v1/charges", json={"order": 7, "amount": 42.0})
            response.raise_for_status()
            answer = response.json()
            moved = " -> ".join(f"{r.status_code} {r.headers['location']}" for r in response.history)
            print(f"charge for order {answer['order']}: {answer['status']}")
            print(f"  redirected by the mesh: {moved}")
            print(f"  the API saw {answer['path']} over {answer['scheme']}")
            try:
                client.get("http://api.elsewhere.example/")
            except meshlib.OutboundBlocked as exc:
                print(f"blocked: {exc}")
        print(f"redirects answered by the mesh: {mesh.stats.counter('redirects', 'payments.example')}")
        print(f"calls blocked: {mesh.stats.counter('outbound_blocked', 'api.elsewhere.example')}")


if __name__ == "__main__":
    main()
