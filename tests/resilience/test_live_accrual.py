"""Default failure accrual: a crashed instance leaves the pool without any rules asking for it.

Connection failures (nothing is listening) are the one signal every caller can trust; without
`outlier_detection` in the Destination, five in a row eject the endpoint as Envoy's defaults
would, so a dead instance stops costing each caller a retry and a share of the retry budget.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import meshlib
from meshlib.context import inbound, inbound_context
from tests.backend import dead_address
from tests.conftest import Fleet, write_rules

URL = "http://orders/whoami"


def rules(tmp_path: Path, addresses: list[str], **dest: object) -> Path:
    docs: list[dict] = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": a} for a in addresses]},
        {"kind": "Destination", "service": "orders", "load_balancer": "round_robin"} | dest,
        {"kind": "Route", "service": "orders", "routes": [{"retries": {"attempts": 3}}]},
    ]
    return write_rules(tmp_path / "mesh.yaml", docs)


def test_a_dead_endpoint_is_ejected_after_five_connection_failures(tmp_path: Path, fleet: Fleet) -> None:
    a, server_a = fleet.start("a", {"name": "a"})
    b, server_b = fleet.start("b", {"name": "b"})
    dead = dead_address()
    cfg = rules(tmp_path, [dead, server_a.address, server_b.address])
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        statuses = [client.get(URL).status_code for _ in range(60)]
        assert statuses == [200] * 60  # every refusal was retried elsewhere
        assert mesh.stats.counter("ejections", "orders") == 1
        refused = mesh.stats.counter("retries", "orders")
        assert refused == 5  # five refusals, then the dead endpoint is out of the rotation
        assert len(a.seen) + len(b.seen) == 60
        assert abs(len(a.seen) - len(b.seen)) <= 6  # the two live ones share the traffic


def test_5xx_answers_do_not_eject_without_outlier_detection(tmp_path: Path, fleet: Fleet) -> None:
    """A 503 is the application's answer: only rules may eject on it, not the default."""
    bad, server_bad = fleet.start("bad", {"name": "bad"})
    _, server_good = fleet.start("good", {"name": "good"})
    bad.fail_status = 503
    cfg = rules(tmp_path, [server_bad.address, server_good.address])
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        for _ in range(40):
            client.get(URL)
        assert mesh.stats.counter("ejections", "orders") == 0
        assert len(bad.seen) >= 20  # still in the rotation


def test_configured_outlier_detection_replaces_the_default(tmp_path: Path, fleet: Fleet) -> None:
    _, server_a = fleet.start("a", {"name": "a"})
    dead = dead_address()
    # consecutive_5xx 20: twenty refusals in a row before an ejection, not the default five
    cfg = rules(tmp_path, [dead, server_a.address], outlier_detection={"consecutive_5xx": 20})
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        for _ in range(12):  # round robin over two: the dead one takes (nearly) every first attempt
            assert client.get(URL).status_code == 200
        assert mesh.stats.counter("ejections", "orders") == 0
        # 11 or 12 (where the rotation starts is random); the default would have stopped at 5
        assert mesh.stats.counter("retries", "orders") >= 11


@pytest.fixture
def unanswered() -> Iterator[str]:
    """An address on 127.0.0.1 whose listener accepts no connection: its backlog is full (one
    queued, never accepted), so the kernel drops each new SYN and a connect waits until its
    caller gives up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued = socket.create_connection(address)
    try:
        yield f"127.0.0.1:{address[1]}"
    finally:
        queued.close()
        listener.close()


def test_a_connect_the_callers_deadline_cuts_short_is_no_verdict(
    tmp_path: Path, fleet: Fleet, unanswered: str
) -> None:
    # the caller's deadline says how long it waits, not whether the endpoint is there; a route's
    # timeout is the owner's word on the endpoint, and five such connects in a row eject it
    _, live = fleet.start("live", {"name": "live"})
    docs: list[dict] = []
    for name in ("orders", "timed"):
        endpoints = [{"address": unanswered}, {"address": live.address}]
        docs.append({"kind": "Endpoints", "service": name, "endpoints": endpoints})
        docs.append({"kind": "Destination", "service": name, "load_balancer": "round_robin"})
    docs.append({"kind": "Route", "service": "timed", "routes": [{"timeout": "100ms"}]})
    cfg = write_rules(tmp_path / "mesh.yaml", docs)
    with meshlib.Mesh("checkout", config=cfg) as mesh, mesh.sync_client() as client:
        outcomes = []
        for _ in range(12):
            token = inbound.set(inbound_context("checkout", "web", time.monotonic() + 0.1, "GET", "/"))
            try:  # as while serving a request with 100 ms left
                outcomes.append(client.get(URL).status_code)
            except meshlib.DeadlineExceeded:
                outcomes.append("deadline")
            finally:
                inbound.reset(token)
        assert outcomes.count("deadline") == 6  # every other one: the rotation kept it
        assert mesh.stats.counter("ejections", "orders") == 0
        outcomes = []
        for _ in range(12):
            try:
                outcomes.append(client.get("http://timed/whoami").status_code)
            except meshlib.DeadlineExceeded:
                outcomes.append("deadline")
        assert mesh.stats.counter("ejections", "timed") == 1
        assert outcomes.count("deadline") == 5 and outcomes[-2:] == [200, 200]  # out after five
