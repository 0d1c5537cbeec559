"""examples/egress: the rules file validates, and the checkout client reaches the payments API
over TLS originated by the mesh, through a redirect, with an undeclared host blocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from meshlib.rules import load_file
from tests.conftest import write_rules
from tests.test_examples import free_port

ROOT = Path(__file__).resolve().parent.parent
EGRESS = ROOT / "examples" / "egress"


def test_the_egress_rules_file_validates() -> None:
    rules = load_file(EGRESS / "mesh.yaml")
    assert [f"{d.kind}/{d.service}" for d in rules] == [
        "Destination/payments.example",
        "Route/payments.example",
        "External/payments.example",
    ]
    external = rules.external("payments.example")
    assert external is not None and external.endpoints == ("127.0.0.1:8443",)
    [port] = external.ports
    assert port.port == 80 and port.tls is not None and port.tls.port == 443


def _listening(port: int, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate()
                raise AssertionError(f"the payments API did not come up:\n{out}\n{err}") from None
            time.sleep(0.05)


def test_checkout_calls_the_external_api_as_the_readme_says(tmp_path: Path) -> None:
    port = free_port()
    certs = tmp_path / "certs"
    docs = list(yaml.safe_load_all((EGRESS / "mesh.yaml").read_text()))
    for doc in docs:
        if doc["kind"] == "External":
            doc["endpoints"] = [f"127.0.0.1:{port}"]
            doc["ports"][0]["tls"]["ca"] = str(certs / "ca.pem")
    config = write_rules(tmp_path / "mesh.yaml", docs)
    api = subprocess.Popen(
        [sys.executable, "examples/egress/payments_api.py", "--port", str(port), "--certs", str(certs)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _listening(port, api)
        result = subprocess.run(
            [sys.executable, "examples/egress/checkout.py"],
            cwd=ROOT,
            env={**os.environ, "MESH_CONFIG": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        api.terminate()
        api.communicate(timeout=10)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "charge for order 7: authorized",
        "  redirected by the mesh: 308 http://payments.example/v2/charges",
        "  the API saw /v2/charges over https",
    ]
    assert lines[3].startswith("blocked: outbound policy registry_only: 'api.elsewhere.example' is neither")
    assert lines[4:] == ["redirects answered by the mesh: 1", "calls blocked: 1"]
