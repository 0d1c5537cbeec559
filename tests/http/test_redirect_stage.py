"""Redirect rules in the httpx clients: the mesh answers (status, Location, no endpoint
contacted), counts it, marks the span; httpx's follow_redirects routes the Location again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import meshlib
from meshlib.rules import RuleSet
from meshlib.telemetry.metrics import decisions
from tests.backend import Backend
from tests.conftest import Fleet
from tests.telemetry.conftest import Traces


def rules(address: str, code: int = 301) -> RuleSet:
    return RuleSet(
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]},
            {
                "kind": "Route",
                "service": "orders",
                "routes": [
                    {"name": "v1", "match": {"path": {"prefix": "/v1/"}},
                     "redirect": {"prefix": "/v2/", "code": 308}},
                    {"match": {"path": {"exact": "/old"}}, "redirect": {"uri": "/new", "code": code}},
                    {"match": {"path": {"prefix": "/away"}},
                     "redirect": {"authority": "shop.example.com:8443", "scheme": "https", "code": 302}},
                    {"to": [{}]},
                ],
            },
        ]
    )  # fmt: skip


@pytest.fixture
def traces() -> Iterator[Traces]:
    t = Traces()
    yield t
    t.provider.shutdown()


@pytest.fixture
def backend(fleet: Fleet) -> Iterator[tuple[Backend, str]]:
    backend, server = fleet.start("orders")
    yield backend, server.address


def test_the_mesh_answers_a_prefix_redirect_without_calling_the_service(backend: tuple[Backend, str]) -> None:
    app, address = backend
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(address), "t1")
        r = client.get("http://orders/v1/items?id=7")
        assert (r.status_code, r.headers["location"], r.content) == (308, "http://orders/v2/items?id=7", b"")
        assert mesh.stats.counter("redirects", "orders") == 1
        assert mesh.stats.edge("out", "orders").by_class == {"3xx": 1}
        exported = [(f.prom, labels, n) for f, labels, n in decisions(mesh.telemetry)]
        assert exported == [("mesh_redirects_total", {"service": "checkout", "destination": "orders"}, 1)]
    assert app.hits == 0


def test_a_prefix_sent_encoded_is_replaced_and_the_rest_keeps_its_encoding(
    backend: tuple[Backend, str],
) -> None:
    """`/%761/` reads as `/v1/`: that part goes, what follows stays as sent (`a%2Fb` one segment)."""
    _, address = backend
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(address), "t1")
        for sent in ("http://orders/v1/a%2Fb", "http://orders/%761/a%2Fb"):
            r = client.get(sent)
            assert (r.status_code, r.headers["location"]) == (308, "http://orders/v2/a%2Fb"), sent


def test_follow_redirects_goes_through_the_mesh_to_the_new_path(backend: tuple[Backend, str]) -> None:
    app, address = backend
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client(follow_redirects=True) as client:
        mesh.apply_rules(rules(address), "t1")
        r = client.get("http://orders/v1/items?id=7")
        assert r.status_code == 200 and r.json()["path"] == "/v2/items"
        assert [h.status_code for h in r.history] == [308]
        assert mesh.stats.edge("out", "orders").by_class == {"3xx": 1, "2xx": 1}
    assert [s["path"] for s in app.seen] == ["/v2/items"]


async def test_async_client_keeps_method_and_body_through_a_308(backend: tuple[Backend, str]) -> None:
    app, address = backend
    async with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(rules(address), "t1")
        async with mesh.client(follow_redirects=True) as client:
            r = await client.post("http://orders/v1/orders", content=b"one order")
        assert r.status_code == 200 and r.json()["body"] == "one order"
        assert mesh.stats.counter("redirects", "orders") == 1
    assert [(s["method"], s["path"]) for s in app.seen] == [("POST", "/v2/orders")]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_each_code_is_answered_as_given(backend: tuple[Backend, str], code: int) -> None:
    app, address = backend
    async with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(rules(address, code), "t1")
        async with mesh.client() as client:
            r = await client.get("http://orders/old?keep=1")
    assert (r.status_code, r.headers["location"]) == (code, "http://orders/new?keep=1")
    assert app.hits == 0


def test_authority_and_scheme_leave_the_mesh(backend: tuple[Backend, str]) -> None:
    app, address = backend
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(address), "t1")
        r = client.get("http://orders/away/x")
    assert (r.status_code, r.headers["location"]) == (302, "https://shop.example.com:8443/away/x")
    assert app.hits == 0


def test_other_rules_still_reach_the_service(backend: tuple[Backend, str]) -> None:
    app, address = backend
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(address), "t1")
        assert client.get("http://orders/whoami").json()["path"] == "/whoami"
        assert mesh.stats.counter("redirects", "orders") == 0
    assert app.hits == 1


def test_the_request_span_shows_the_redirect_and_no_attempt(
    backend: tuple[Backend, str], traces: Traces
) -> None:
    _, address = backend
    with meshlib.Mesh("checkout", tracing=traces.provider) as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(address), "t1")
        client.get("http://orders/v1/a")
    [span] = traces.wait_for(1)  # the request's span; no attempt span: no endpoint was picked
    attributes = dict(span.attributes or {})
    assert attributes["mesh.redirect"] == "http://orders/v2/a"
    assert attributes["mesh.route"] == "v1" and attributes["mesh.attempt"] == 0
    assert attributes["http.response.status_code"] == 308
