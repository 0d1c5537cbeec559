"""The examples: the rules file validates, and the services and the client work together."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from werkzeug.serving import make_server

from meshlib.rules import load_file
from meshlib.testing import serve
from tests.conftest import write_rules

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import examples/NAME.py by path, as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rules(orders: list[tuple[str, str]], payments: str, v1: int, v2: int) -> list[dict]:
    return [
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": a, "labels": {"version": v}} for a, v in orders],
        },
        {"kind": "Endpoints", "service": "payments", "endpoints": [{"address": payments}]},
        {
            "kind": "Destination",
            "service": "orders",
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        },
        {
            "kind": "Route",
            "service": "orders",
            "routes": [
                {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]},
                {"to": [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]},
            ],
        },
    ]


def test_example_rules_file_validates() -> None:
    ruleset = load_file(EXAMPLES / "mesh.yaml")
    assert [f"{d.kind}/{d.service}" for d in ruleset] == [
        "Endpoints/orders",
        "Endpoints/payments",
        "Destination/orders",
        "Route/orders",
    ]
    orders = ruleset.endpoints("orders")
    assert orders is not None
    assert [(e.address, e.labels["version"]) for e in orders.endpoints] == [
        ("127.0.0.1:8001", "v1"),
        ("127.0.0.1:8002", "v1"),
        ("127.0.0.1:8003", "v2"),
    ]
    route = ruleset.route("orders")
    assert route is not None
    canary, rest = route.routes
    assert canary.match.headers["x-canary"].exact == "true"
    assert [t.subset for t in canary.to] == ["v2"]
    assert [(t.subset, t.weight) for t in rest.to] == [("v1", 90), ("v2", 10)]


@pytest.fixture
def payments_server() -> Iterator[str]:
    """The Flask payments example on werkzeug's server, on a free port."""
    app, mesh = load_example("payments_flask").create_app(config=None)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)
    server.server_close()
    mesh.close()


async def test_orders_and_checkout_work_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payments_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    orders = load_example("orders_fastapi")
    apps = {version: orders.create_app(version, config=None) for version in ("v1", "v2")}
    servers = {version: serve(app) for version, (app, _) in apps.items()}
    checkout = None
    try:
        path = write_rules(
            tmp_path / "mesh.yaml",
            rules([(s.address, v) for v, s in servers.items()], payments_server, v1=100, v2=0),
        )
        monkeypatch.setenv("MESH_CONFIG", str(path))
        checkout = load_example("checkout")

        order = await checkout.get_order(42)
        assert order["id"] == 42
        assert order["version"] == "v1"
        assert order["caller"] == "checkout"  # the mesh told orders who called
        assert (await checkout.get_order(43, canary=True))["version"] == "v2"

        answered = await checkout.run(count=10, canary=False, interval=0)
        assert answered == Counter({"v1": 10})
        out = capsys.readouterr().out
        assert out.count("answered by orders v1") == 10
        assert "payment for order 10: authorized" in out  # the sync client reached Flask

        # The client's mesh watches the file: move everyone to v2 without touching checkout.
        write_rules(path, rules([(s.address, v) for v, s in servers.items()], payments_server, v1=0, v2=100))
        deadline = time.monotonic() + 10
        while (await checkout.get_order(1))["version"] != "v2":
            assert time.monotonic() < deadline, "the rules file edit was not applied"
            await asyncio.sleep(0.02)
        assert await checkout.run(count=10, canary=False, interval=0) == Counter({"v2": 10})
    finally:
        if checkout is not None:
            await checkout.mesh.aclose()
        for server in servers.values():
            server.stop()
        for _, mesh in apps.values():
            mesh.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate()
                raise AssertionError(f"{url} did not come up:\n{out}\n{err}") from None
            time.sleep(0.1)


def test_examples_run_as_scripts(tmp_path: Path) -> None:
    """The commands in examples/README.md, with ports that are free here."""
    v1, v2, pay = free_port(), free_port(), free_port()
    path = write_rules(
        tmp_path / "mesh.yaml",
        rules([(f"127.0.0.1:{v1}", "v1"), (f"127.0.0.1:{v2}", "v2")], f"127.0.0.1:{pay}", v1=50, v2=50),
    )
    env = {**os.environ, "MESH_CONFIG": str(path)}
    py = sys.executable
    commands = [
        ([py, "examples/orders_fastapi.py", "--port", str(v1), "--version", "v1"], env, "/orders/1", v1),
        (
            [py, "examples/orders_fastapi.py", "--port", str(v2)],
            {**env, "ORDERS_VERSION": "v2"},
            "/orders/1",
            v2,
        ),
        ([py, "examples/payments_flask.py", "--port", str(pay)], env, "/", pay),
    ]
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv, proc_env, probe, port in commands:
            proc = subprocess.Popen(
                argv,
                cwd=EXAMPLES.parent,
                env=proc_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            wait_for(f"http://127.0.0.1:{port}{probe}", proc)
        assert httpx.get(f"http://127.0.0.1:{v2}/orders/7").json()["version"] == "v2"

        result = subprocess.run(
            [py, "examples/checkout.py", "--count", "20", "--interval", "0"],
            cwd=EXAMPLES.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "answered by orders v1" in result.stdout
        assert "answered by orders v2" in result.stdout  # 50/50: both, but for 1 chance in 2^19
        assert "payment for order 20: authorized" in result.stdout
        assert "failed" not in result.stdout
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def test_secure_mesh_example_shows_who_gets_through() -> None:
    """examples/secure_mesh.py: CA, join tokens, mTLS and an Authorization document, for real."""
    result = subprocess.run(
        [sys.executable, "examples/secure_mesh.py"],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines == [
        "checkout GET /orders/1 -> 200 orders saw spiffe://mesh.local/svc/checkout",
        "checkout POST /orders/1 -> 403 RBAC: access denied: source checkout may not POST /orders/1",
        "reports GET /orders/1 -> 403 RBAC: access denied: source reports may not GET /orders/1",
        "plaintext GET /orders/1 -> 403 (no client certificate: STRICT refuses plaintext)",
    ]


async def test_overload_example_refuses_the_excess() -> None:
    """examples/overload.py: twice the capacity offered, the excess answered 503, the limit near 4."""
    result = await load_example("overload").run(2.5)
    assert result["statuses"].get(503, 0) > 0 and result["statuses"].get(200, 0) > 0
    assert set(result["statuses"]) == {200, 503}
    assert 4 <= result["limit"] <= 16


def test_the_prequal_example_sends_the_slow_instance_less() -> None:
    counts, probes = load_example("prequal_balancing").run(seconds=1.0)
    total = counts["fast"] + counts["slow"]
    assert total > 80 and probes > 30
    assert counts["slow"] / total < 0.35  # a quarter of the capacity; round_robin: half


def test_the_load_reports_example_sends_the_costly_server_less(capsys: pytest.CaptureFixture[str]) -> None:
    shares = load_example("load_reports").main(warm=300, n=900)
    assert 0.06 < shares["orders-heavy"] / 900 < 0.2  # a quarter of the others' share: 1/9
    assert shares["orders-a"] > 2.5 * shares["orders-heavy"] < shares["orders-b"]
    assert "orders-heavy" in capsys.readouterr().out
