"""`meshlib xds-bootstrap` prints what a gRPC client needs to find the control service's ADS."""

from __future__ import annotations

import json

from meshlib.cli import main


def test_the_bootstrap_names_the_server_and_the_node(capsys) -> None:
    assert main(["xds-bootstrap", "--service", "checkout", "--server", "127.0.0.1:7071"]) == 0
    out = json.loads(capsys.readouterr().out)
    server = out["xds_servers"][0]
    assert server["server_uri"] == "127.0.0.1:7071"
    assert server["channel_creds"] == [{"type": "insecure"}] and server["server_features"] == ["xds_v3"]
    assert out["node"]["cluster"] == "checkout" and out["node"]["id"].startswith("checkout-")
