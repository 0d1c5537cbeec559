"""examples/gateway: the rules file validates, and the README's commands work together: two
orders instances and `meshlib gateway --name edge`, called with a Host header as curl would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import yaml

from meshlib.rules import load_file
from tests.conftest import write_rules
from tests.test_examples import EXAMPLES, free_port, wait_for

RULES = EXAMPLES / "gateway" / "mesh.yaml"


def test_the_gateway_rules_file_validates() -> None:
    rules = load_file(RULES)
    gateway, route = rules.gateway("edge"), rules.route("edge")
    assert gateway is not None and [listener.port for listener in gateway.listeners] == [8080]
    assert route is not None and route.routes[0].to[0].service == "orders"


def test_the_readme_commands(tmp_path: Path) -> None:
    v1, v2 = free_port(), free_port()
    docs = list(yaml.safe_load_all(RULES.read_text()))
    docs[0]["endpoints"] = [
        {"address": f"127.0.0.1:{v1}", "labels": {"version": "v1"}},
        {"address": f"127.0.0.1:{v2}", "labels": {"version": "v2"}},
    ]
    path = write_rules(tmp_path / "mesh.yaml", docs)
    env = {**os.environ, "MESH_CONFIG": str(path), "PYTHONPATH": str(EXAMPLES.parent)}
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], **extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv,
            cwd=EXAMPLES.parent,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    try:
        wait_for(
            f"http://127.0.0.1:{v1}/orders/1",
            start([py, "examples/orders_fastapi.py", "--port", str(v1), "--version", "v1"]),
        )
        wait_for(
            f"http://127.0.0.1:{v2}/orders/1",
            start([py, "examples/orders_fastapi.py", "--port", str(v2)], ORDERS_VERSION="v2"),
        )
        gateway = start(
            [py, "-m", "meshlib", "gateway", "--name", "edge", "--config", str(path), "--port", "8080=0"]
        )
        assert gateway.stdout is not None
        line = gateway.stdout.readline()
        found = re.match(r"gateway edge: 8080 on (127\.0\.0\.1:\d+)", line)
        assert found, line + (gateway.stderr.read() if gateway.poll() is not None and gateway.stderr else "")
        url = f"http://{found.group(1)}/orders/1"
        with httpx.Client(headers={"host": "shop.localhost"}, timeout=10.0) as client:
            answers = [client.get(url).json() for _ in range(100)]
            canary = client.get(url, headers={"x-canary": "true"}).json()
            other = client.get(url, headers={"host": "other.localhost"})
        versions = Counter(a["version"] for a in answers)
        assert versions["v1"] >= 75 and versions["v1"] + versions["v2"] == 100, (
            versions
        )  # 90/10: sd 3, 75 is 5 sd off
        assert all(a["caller"] == "edge" for a in answers)
        assert canary["version"] == "v2" and other.status_code == 404
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
