"""A bulkhead slot held by a streamed response its caller never closes comes back when the
client closes (sync and async), and when the response is garbage-collected; real servers on
127.0.0.1."""

from __future__ import annotations

import gc

import pytest

import meshlib
from meshlib.rules import RuleSet
from tests.conftest import Fleet

URL = "http://orders/whoami"


def capped(address: str) -> RuleSet:
    return RuleSet(
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]},
            {"kind": "Destination", "service": "orders", "max_concurrent_requests": 2},
        ]
    )


def in_flight(mesh: meshlib.Mesh) -> tuple[int, int]:
    """(requests holding a slot, requests outstanding at the endpoint)."""
    [endpoint] = mesh.snapshot.plans["orders"].endpoints
    return mesh.resilience.bulkhead("orders", 2).in_flight, endpoint.load.outstanding


def test_closing_the_sync_client_gives_back_the_slots_of_its_unclosed_responses(fleet: Fleet) -> None:
    _, server = fleet.start("orders")
    with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(capped(server.address), "t1")
        client = mesh.sync_client()
        # kept referenced: nothing but the client's close can give their slots back
        held = [client.send(client.build_request("GET", URL), stream=True) for _ in range(2)]
        with pytest.raises(meshlib.BulkheadFullError):
            client.get(URL)
        assert in_flight(mesh) == (2, 2)
        client.close()
        assert in_flight(mesh) == (0, 0) and [r.status_code for r in held] == [200, 200]
        with mesh.sync_client() as fresh:
            assert [fresh.get(URL).status_code for _ in range(3)] == [200, 200, 200]


async def test_closing_the_async_client_gives_back_the_slots_of_its_unclosed_responses(
    fleet: Fleet,
) -> None:
    _, server = fleet.start("orders")
    async with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(capped(server.address), "t1")
        client = mesh.client()
        held = [await client.send(client.build_request("GET", URL), stream=True) for _ in range(2)]
        assert in_flight(mesh) == (2, 2)
        await client.aclose()
        assert in_flight(mesh) == (0, 0) and [r.status_code for r in held] == [200, 200]
        async with mesh.client() as fresh:
            assert (await fresh.get(URL)).status_code == 200


def test_a_response_dropped_unclosed_gives_its_slot_back_when_collected(fleet: Fleet) -> None:
    _, server = fleet.start("orders")
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(capped(server.address), "t1")
        for _ in range(2):
            client.send(client.build_request("GET", URL), stream=True)  # dropped at once, never closed
        gc.collect()  # an httpx response and its stream refer to each other: the collector frees them
        assert in_flight(mesh) == (0, 2)  # the endpoint's load comes back when the client closes
        assert [client.get(URL).status_code for _ in range(3)] == [200, 200, 200]
        client.close()
        assert in_flight(mesh) == (0, 0)  # no slot given back twice
