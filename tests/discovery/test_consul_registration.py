"""Registering this instance in Consul: the agent emulator runs the check the registration
names against a real app, and the provider sees the instance come, fail its check, and go."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlib.discovery.base import Target
from meshlib.discovery.consul import ConsulError, ConsulProvider
from meshlib.discovery.consul_registration import ConsulRegistration
from meshlib.testing import RunningServer, serve
from tests.conftest import interruptible, wait_until
from tests.discovery.consul_agent import ConsulAgentEmulator
from tests.discovery.watching import Watching


class App:
    """An ASGI app whose health answer the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def app() -> Iterator[tuple[App, RunningServer]]:
    a = App()
    with serve(a) as server:
        yield a, server


async def test_registered_checked_and_deregistered(app: tuple[App, RunningServer]) -> None:
    health, server = app
    with ConsulAgentEmulator() as agent:
        provider = ConsulProvider.from_url(agent.url)
        watching = Watching(provider, Target("web", "web", {"wait": 5.0, "min_interval": 0.0}))
        registration = ConsulRegistration(
            agent.url,
            "web",
            server.address,
            tags=("version=v2",),
            meta={"team": "payments"},
            weight=3,
            check_path="/healthz",
            interval=0.05,
        )
        await registration.register()
        await watching.until(lambda: watching.addresses() == {server.address})  # its check passed
        (endpoint,) = watching.last
        assert endpoint.weight == 3
        assert (endpoint.labels["version"], endpoint.labels["team"]) == ("v2", "payments")
        assert "/healthz" in health.paths
        sent = next(r for r in agent.requests if r.path == "/v1/agent/service/register").body
        assert sent["id"] == f"web-127.0.0.1-{server.port}" and sent["address"] == "127.0.0.1"
        assert sent["checks"][0]["http"] == f"http://{server.address}/healthz"
        assert sent["checks"][0]["DeregisterCriticalServiceAfter"] == "60000ms"

        health.status = 503  # the app is unwell: the check goes critical, callers stop seeing it
        await watching.until(lambda: watching.sets[-1] == ())
        health.status = 200
        await watching.until(lambda: watching.addresses() == {server.address})

        await registration.deregister()
        await watching.until(lambda: watching.sets[-1] == ())
        assert registration.service_id not in agent.instances()
        await provider.aclose()


async def test_a_tcp_check_and_the_context_manager(app: tuple[App, RunningServer]) -> None:
    _, server = app
    with ConsulAgentEmulator() as agent:
        registration = ConsulRegistration(agent.url, "web", server.address, check="tcp", interval=0.05)
        assert registration.definition()["tcp"] == server.address
        with pytest.raises(RuntimeError, match="app failed"):
            async with registration:
                deadline = asyncio.get_running_loop().time() + 5.0
                while agent.instances()[registration.service_id or ""].status != "passing":
                    assert asyncio.get_running_loop().time() < deadline, "the TCP check never passed"
                    await asyncio.sleep(0.01)
                raise RuntimeError("app failed")
        assert agent.instances() == {}  # deregistered on the way out


async def test_the_token_is_required_and_sent(app: tuple[App, RunningServer]) -> None:
    _, server = app
    with ConsulAgentEmulator(token="reg-secret") as agent:
        refused = ConsulRegistration(agent.url, "web", server.address, check="none")
        with pytest.raises(ConsulError, match="Permission denied"):
            await refused.register()
        allowed = ConsulRegistration(f"{agent.url}&token=reg-secret", "web", server.address, check="none")
        assert "reg-secret" not in repr(allowed)
        await allowed.register()
        assert agent.instances()[allowed.service_id or ""].status == "passing"  # no check: passing
        await allowed.deregister()
        assert [r.token for r in agent.requests if r.path.startswith("/v1/agent/")][-2:] == ["reg-secret"] * 2


def test_definitions() -> None:
    r = ConsulRegistration("consul://127.0.0.1:8500", "api", "[::1]:9000", check_scheme="https", timeout=2)
    assert r.service_id == "api---1-9000"
    assert r.definition() == {
        "interval": "10000ms",
        "timeout": "2000ms",
        "http": "https://[::1]:9000/",
        "tls_skip_verify": True,
        "DeregisterCriticalServiceAfter": "60000ms",
    }
    assert ConsulRegistration("consul://", "api", "127.0.0.1:1", check="none").definition() == {}
    with pytest.raises(ValueError, match="port"):
        ConsulRegistration("consul://", "api", "127.0.0.1")


SERVE = """\
import sys
from meshlib import Mesh

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})

mesh = Mesh("orders")
mesh.serve(app, port=0, consul=sys.argv[1])
print("serve returned", flush=True)
mesh.close()
"""


def test_mesh_serve_registers_in_consul_and_leaves_on_exit() -> None:
    root = Path(__file__).resolve().parents[2]
    with ConsulAgentEmulator() as agent:
        with interruptible():  # Ctrl-C reaches it as a KeyboardInterrupt
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, agent.url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(root)},
            )
        try:
            passing = lambda: [i for i in agent.instances().values() if i.status == "passing"]  # noqa: E731
            wait_until(lambda: bool(passing()) or proc.poll() is not None, 20, "a passing registration")
            (instance,) = passing()  # the agent's HTTP check reached the app
            assert instance.service == "orders" and instance.check and instance.check["http"].endswith("/")
            assert instance.id == f"orders-127.0.0.1-{instance.port}" and instance.port > 0
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
            assert out == "serve returned\n", err
            assert "Traceback" not in err, err
            assert agent.instances() == {}  # deregistered on the way out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
