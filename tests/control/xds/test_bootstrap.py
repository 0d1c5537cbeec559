"""`meshlib xds-bootstrap` prints what a gRPC client needs to find the control service's ADS."""

from __future__ import annotations

import json

import pytest

from meshlib.cli import main


def test_the_bootstrap_names_the_server_and_the_node(capsys) -> None:
    assert main(["xds-bootstrap", "--service", "checkout", "--server", "127.0.0.1:7071"]) == 0
    out = json.loads(capsys.readouterr().out)
    server = out["xds_servers"][0]
    assert server["server_uri"] == "127.0.0.1:7071"
    assert server["channel_creds"] == [{"type": "insecure"}] and server["server_features"] == ["xds_v3"]
    assert out["node"]["cluster"] == "checkout" and out["node"]["id"].startswith("checkout-")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--service", "Bad Name!"], "--service: invalid service name 'Bad Name!'"),
        (
            ["--service", "orders", "--server", "nohostport"],
            "--server: address 'nohostport' must be host:port",
        ),
        (["--service", "orders", "--server", "127.0.0.1:99999"], "port must be a number from 1 to 65535"),
    ],
)
def test_what_grpc_could_not_use_is_refused_with_its_reason(argv: list[str], said: str, capsys) -> None:
    """gRPC reads the file without saying what is wrong with it: the command says it instead."""
    assert main(["xds-bootstrap", *argv]) == 1
    out, err = capsys.readouterr()
    assert out == "" and said in err and len(err.splitlines()) == 1
