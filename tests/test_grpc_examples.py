"""examples/grpc: the rules file validates; the orders servers and the client work together with
the rules file (plaintext), and with the real control service (registration, CA, mTLS)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import pytest
import yaml

import meshlib
from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.grpc.serving import GrpcServing
from meshlib.rules import load_file
from meshlib.rules.loading import RulesLoader
from tests.conftest import wait_until, write_rules
from tests.security.test_mtls_live import SecureControl
from tests.test_examples import free_port, load_example

GRPC = Path(__file__).resolve().parent.parent / "examples" / "grpc"
RULES = GRPC / "mesh.yaml"
VERSIONS = ("v1", "v1", "v2")  # as in examples/grpc/mesh.yaml


def example(name: str) -> ModuleType:
    return load_example(f"grpc/{name}")


def documents(
    addresses: list[str] | None, v1: int = 90, v2: int = 10, versions: tuple[str, ...] = VERSIONS
) -> list[dict[str, Any]]:
    """examples/grpc/mesh.yaml with these orders instances (None: no Endpoints) and weights."""
    docs = list(yaml.load_all(RULES.read_text(), Loader=RulesLoader))  # YAML 1.2: `on` is a key
    for doc in docs:
        if doc["kind"] == "Route":
            doc["routes"][1]["to"] = [{"subset": "v1", "weight": v1}, {"subset": "v2", "weight": v2}]
    if addresses is None:
        return [d for d in docs if d["kind"] != "Endpoints"]
    for doc in docs:
        if doc["kind"] == "Endpoints":
            doc["endpoints"] = [
                {"address": a, "labels": {PROTOCOL_LABEL: "grpc", "version": v}}
                for a, v in zip(addresses, versions, strict=True)
            ]
    return docs


def test_the_grpc_rules_file_validates() -> None:
    ruleset = load_file(RULES)
    assert [f"{d.kind}/{d.service}" for d in ruleset] == [
        "Endpoints/orders",
        "Destination/orders",
        "Route/orders",
        "Authorization/orders",
    ]
    orders = ruleset.endpoints("orders")
    assert orders is not None
    assert [(e.address, e.labels[PROTOCOL_LABEL], e.labels["version"]) for e in orders.endpoints] == [
        ("127.0.0.1:50051", "grpc", "v1"),
        ("127.0.0.1:50052", "grpc", "v1"),
        ("127.0.0.1:50053", "grpc", "v2"),
    ]
    route = ruleset.route("orders")
    assert route is not None
    canary, rest = route.routes
    assert canary.match.headers["x-canary"].exact == "true"
    assert [(t.subset, t.weight) for t in rest.to] == [("v1", 90), ("v2", 10)]


@dataclass
class Instances:
    """Three orders instances of examples/grpc/server.py, in this process."""

    meshes: list[meshlib.Mesh]
    servings: list[GrpcServing]  # kept: a grpc server that is garbage-collected stops

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servings]

    def stop(self) -> None:
        for serving in self.servings:
            serving.stop(grace=0)
        for mesh in self.meshes:
            mesh.close()


def start(server: ModuleType, ports: list[int], **mesh_options: Any) -> Instances:
    instances = Instances([], [])
    for version, port in zip(VERSIONS, ports, strict=True):
        mesh = server.create_mesh(version, **mesh_options)
        instances.meshes.append(mesh)
        instances.servings.append(server.serve(mesh, version, port=port))
    return instances


def check_split_canary_and_stream(client: ModuleType, mesh: meshlib.Mesh) -> None:
    answered = client.get_orders(mesh, 300)
    assert answered["failed"] == 0 and answered["v1"] + answered["v2"] == 300
    assert 10 <= answered["v2"] <= 55, answered  # 90/10: 30 expected, ~5 standard deviations each way
    assert client.get_orders(mesh, 20, canary=True) == {"v2": 20}
    streamed = client.watch_orders(mesh, 3, canary=True)
    assert [(o.id, o.version, o.caller) for o in streamed] == [(i, "v2", "checkout") for i in (1, 2, 3)]


def test_servers_and_client_with_the_rules_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, client = example("server"), example("client")
    ports = [free_port() for _ in VERSIONS]
    path = write_rules(tmp_path / "mesh.yaml", documents([f"127.0.0.1:{p}" for p in ports]))
    instances = start(server, ports, config=path)  # the servers read the Authorization document there
    try:
        with meshlib.Mesh("checkout", config=path) as checkout:
            check_split_canary_and_stream(client, checkout)
            assert "answered by orders v1 (it saw caller checkout)" in capsys.readouterr().out
        # the Authorization document of the rules file lets only checkout in
        with meshlib.Mesh("reports", config=path) as reports:
            stub = client.orders_pb2_grpc.OrdersStub(reports.grpc_channel("orders"))
            with pytest.raises(grpc.RpcError) as info:
                stub.GetOrder(client.orders_pb2.OrderRequest(id=1), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        instances.stop()


@pytest.fixture
def control(tmp_path: Path) -> Iterator[SecureControl]:
    c = SecureControl(tmp_path / "control", lifetime=600)
    yield c
    c.stop()


def test_servers_and_client_with_the_control_service_and_mtls(
    control: SecureControl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = httpx.put(
        f"{control.url}/v1/config",
        json=documents(None),
        headers={"authorization": f"Bearer {control.admin}"},
    )
    assert r.status_code == 200, r.text
    server, client = example("server"), example("client")
    instances = start(
        server, [0, 0, 0], control=control.url, token=control.token("orders"), cache_dir=tmp_path / "c"
    )
    try:
        assert all(m.credentials is not None and m.mtls == "STRICT" for m in instances.meshes)
        wait_until(
            lambda: sorted(a for a, _ in registered(control)) == sorted(instances.addresses), what="registry"
        )
        assert {labels[PROTOCOL_LABEL] for _, labels in registered(control)} == {"grpc"}
        token = control.token("checkout")
        with meshlib.Mesh("checkout", control=control.url, token=token, cache_dir=tmp_path / "c") as checkout:
            assert client.wait_for_orders(checkout)
            wait_until(lambda: known(checkout) == set(instances.addresses), what="the three instances")
            check_split_canary_and_stream(client, checkout)  # caller: the verified certificate's service
        # the script's own path: --control and --token
        capsys.readouterr()
        client.main(["--control", control.url, "--token", token, "--count", "10", "--canary"])
        out = capsys.readouterr().out
        assert out.count("answered by orders v2 (it saw caller checkout)") == 10
        assert "watch: order 3 from orders v2" in out and "answered by: v2 10" in out
        # STRICT: a caller without a certificate never reaches an instance
        with grpc.insecure_channel(instances.addresses[0]) as channel, pytest.raises(grpc.RpcError) as info:
            stub = client.orders_pb2_grpc.OrdersStub(channel)
            stub.GetOrder(client.orders_pb2.OrderRequest(id=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        instances.stop()
    wait_until(lambda: registered(control) == [], what="the instances deregistered")


def known(mesh: meshlib.Mesh) -> set[str]:
    plan = mesh.snapshot.grpc_plan("orders")
    return {e.address for e in plan.endpoints} if plan is not None else set()


def registered(control: SecureControl) -> list[tuple[str, dict[str, str]]]:
    instances = httpx.get(f"{control.url}/v1/registry/orders").json().get("orders", [])
    return [(i["address"], i["labels"]) for i in instances]


def test_the_grpc_examples_run_as_scripts(tmp_path: Path) -> None:
    """The commands of examples/grpc/README.md (two instances, 50/50), with free ports."""
    v1, v2 = free_port(), free_port()
    addresses = [f"127.0.0.1:{v1}", f"127.0.0.1:{v2}"]
    path = write_rules(tmp_path / "mesh.yaml", documents(addresses, 50, 50, ("v1", "v2")))
    env = {**os.environ, "MESH_CONFIG": str(path)}
    py, root = sys.executable, GRPC.parent.parent
    procs = [
        subprocess.Popen(
            [py, "examples/grpc/server.py", "--port", str(port), "--version", version],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port, version in ((v1, "v1"), (v2, "v2"))
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "serving gRPC on 127.0.0.1:" in line and "mTLS off; local mode" in line, proc.stderr.read()
        result = subprocess.run(
            [py, "examples/grpc/client.py", "--count", "30"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "answered by orders v1" in result.stdout
        assert "answered by orders v2" in result.stdout  # 50/50: both, but for 1 chance in 2^29
        assert "watch: order 3 from orders" in result.stdout
        assert "failed" not in result.stdout
    finally:
        for proc in procs:
            proc.terminate()  # SIGTERM: the server stops cleanly
        for proc in procs:
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        assert [proc.returncode for proc in procs] == [0, 0]
