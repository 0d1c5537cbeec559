"""Lookups at the process default provider for names nobody configured (a call to a single-label
host with no endpoints): each starts a watch, but they are bounded, by count and by time unused,
so hostnames taken from input cannot start watches without end; names the rules, `@mesh.call`
or `wait_for_discovery` give are watched for good. A real Mesh and the test provider
(tests/discovery/fake.py); the time of lookups is the test's own clock."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

import meshlib
from meshlib.discovery.runner import Watch
from meshlib.rules import parse_documents
from tests.clock import Clock
from tests.conftest import wait_until
from tests.discovery.fake import FakeProvider

pytestmark = pytest.mark.usefixtures("provider_kinds")


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def mesh(fake: FakeProvider) -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("checkout", discovery=[fake])
    yield m
    m.close()


def watched(mesh: meshlib.Mesh) -> set[str]:
    return set(mesh.discovery.watches())


def ended(watches: list[Watch]) -> bool:
    return all(w.future is not None and w.future.done() for w in watches)


def test_lookups_past_the_bound_stop_the_least_recently_looked_up(
    fake: FakeProvider, mesh: meshlib.Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib.discovery")
    runner = mesh.discovery
    runner.max_looked_up = 3

    @mesh.call("orders")  # named: watched for good, endpoints or not
    def call(client: httpx.Client) -> None: ...

    runner.look_up("payments")
    fake.send("payments", ["127.0.0.1:8001"])  # a real service found by a lookup: in use
    wait_until(lambda: bool(runner.watches()["payments"].good), 5.0, "payments' endpoints")
    first = runner.watches()
    for i in range(10):
        runner.look_up(f"typo{i}")
    assert watched(mesh) == {"orders", "payments", "typo7", "typo8", "typo9"}
    runner.look_up("typo7")  # looked up again: the most recent now
    runner.look_up("typo10")
    assert watched(mesh) == {"orders", "payments", "typo7", "typo9", "typo10"}
    gone = [w for name, w in first.items() if name not in watched(mesh)]
    wait_until(lambda: ended(gone), 5.0, "the stopped watches to end")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "more than 3 services looked up" in warnings[0], warnings


def test_a_lookup_unused_for_a_while_stops_and_one_in_use_stays(
    fake: FakeProvider, mesh: meshlib.Mesh
) -> None:
    runner = mesh.discovery
    clock = runner.clock = Clock()
    mesh.apply_rules(parse_documents([{"kind": "Destination", "service": "inventory"}]), "test")
    runner.look_up("typo", "payments", "inventory")  # inventory: named by the rules already
    fake.send("payments", ["127.0.0.1:8001"])
    wait_until(lambda: bool(runner.watches()["payments"].good), 5.0, "payments' endpoints")
    assert watched(mesh) == {"inventory", "typo", "payments"}
    clock.now += runner.lookup_idle / 2
    runner.look_up("typo")  # used again: its time starts over
    clock.now += runner.lookup_idle / 2
    runner.sweep()
    assert watched(mesh) == {"inventory", "typo", "payments"}
    typo = runner.watches()["typo"]
    clock.now += runner.lookup_idle
    runner.sweep()
    assert watched(mesh) == {"inventory", "payments"}  # payments has endpoints: in use
    wait_until(lambda: ended([typo]), 5.0, "the unused lookup's watch to end")
    fake.send("payments", [])  # none any more: unused from now on
    wait_until(lambda: not runner.watches()["payments"].good, 5.0, "payments empty")
    clock.now += runner.lookup_idle
    runner.sweep()
    assert watched(mesh) == {"inventory"}


def test_a_looked_up_name_that_is_then_named_is_watched_for_good(
    fake: FakeProvider, mesh: meshlib.Mesh
) -> None:
    runner = mesh.discovery
    clock = runner.clock = Clock()
    runner.max_looked_up = 1
    runner.look_up("orders")
    assert not mesh.wait_for_discovery("orders", timeout=0.01)  # named by the caller now
    runner.look_up("typo1", "typo2")
    clock.now += runner.lookup_idle * 2
    runner.sweep()
    assert watched(mesh) == {"orders"}


def test_unused_lookups_stop_on_their_own(fake: FakeProvider, mesh: meshlib.Mesh) -> None:
    runner = mesh.discovery
    runner.lookup_idle = 0.2  # swept every 0.05 s
    runner.look_up("typo")
    assert watched(mesh) == {"typo"}
    wait_until(lambda: not watched(mesh), 5.0, "the sweep to stop the unused lookup")
