"""A Mesh's sink of pushed states (meshlib/control/link.py): a version's documents validated
again only where they changed, and the registry's endpoint lists only for the services whose
list changed; the checks across documents and the refusals stay as they were."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.control.link import ControlLink, ParsedDocuments
from meshlib.control.subscriber import ControlState, fold
from meshlib.rules import RulesError
from tests.conftest import wait_until
from tests.control import Control


def destination(service: str, *subsets: str) -> dict[str, Any]:
    return {"kind": "Destination", "service": service, "subsets": {s: {"version": s} for s in subsets}}


def route(service: str, subset: str, timeout: str = "2s") -> dict[str, Any]:
    return {"kind": "Route", "service": service, "routes": [{"to": [{"subset": subset}], "timeout": timeout}]}


def pushed(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents as a subscriber has them: decoded afresh from an event's JSON."""
    return json.loads(json.dumps(docs))


def test_unchanged_documents_keep_their_validated_models() -> None:
    parsed = ParsedDocuments()
    first = parsed.parse(
        pushed([destination("a", "v1"), route("a", "v1"), destination("b", "v1")]), source="v1"
    )
    second = parsed.parse(
        pushed([destination("a", "v1"), route("a", "v1", "3s"), destination("b", "v1")]), source="v2"
    )
    assert second.get("Destination", "a") is first.get("Destination", "a")
    assert second.get("Destination", "b") is first.get("Destination", "b")
    changed = second.route("a")
    assert changed is not first.route("a") and changed is not None
    assert changed.routes[0].timeout == 3.0
    assert second == ParsedDocuments().parse(pushed(second.to_dicts()), source="v3")  # as a full parse
    again = [destination("a", "v1"), route("a", "v1", "3s"), destination("b", "v1")]
    assert parsed.parse(pushed(again), source="v4") is second  # the same documents: the same set


def test_the_checks_across_documents_still_run_on_reused_ones() -> None:
    """The Route is the same as before, but the Destination it names a subset of changed: the
    set is refused as a full validation would refuse it."""
    parsed = ParsedDocuments()
    parsed.parse(pushed([destination("a", "v1"), route("a", "v1")]), source="v1")
    with pytest.raises(RulesError) as refused:
        parsed.parse(pushed([destination("a", "v2"), route("a", "v1")]), source="v2")
    assert "v1" in str(refused.value)


def test_a_document_equal_to_python_but_not_in_json_is_validated_again() -> None:
    """`true` == 1 in Python; a weight of true is refused, however valid the 1 before it was."""
    one = [{"kind": "Endpoints", "service": "a", "endpoints": [{"address": "127.0.0.1:1", "weight": 1}]}]
    true = [{"kind": "Endpoints", "service": "a", "endpoints": [{"address": "127.0.0.1:1", "weight": True}]}]
    assert one == true
    parsed = ParsedDocuments()
    parsed.parse(pushed(one), source="v1")
    with pytest.raises(RulesError) as refused:
        parsed.parse(pushed(true), source="v2")
    assert "weight" in str(refused.value)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[ControlLink]:
    m = meshlib.Mesh("checkout")
    try:
        yield ControlLink(m, "http://127.0.0.1:9", tmp_path)
    finally:
        m.close()


def test_only_a_changed_endpoint_list_is_validated_again(link: ControlLink) -> None:
    state = ControlState.from_json(
        {
            "epoch": "e",
            "revision": 1,
            "version": 1,
            "documents": [destination("orders", "v1")],
            "endpoints": {
                "orders": [{"address": "127.0.0.1:8001", "labels": {"version": "v1"}}],
                "payments": [{"address": "127.0.0.1:9001", "labels": {}}],
            },
        }
    )
    assert link.apply(state, cache=False) is None
    before = link.mesh.snapshot
    added = {"address": "127.0.0.1:8002", "labels": {"version": "v1"}}
    state = fold(
        state,
        "endpoint",
        {"epoch": "e", "revision": 2, "service": "orders", "address": added["address"], "endpoint": added},
    )
    assert state is not None and link.apply(state, cache=False) is None
    after = link.mesh.snapshot
    assert after.discovered["payments"][0] is before.discovered["payments"][0]  # not validated again
    assert [e.address for e in after.discovered["orders"]] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    bad = fold(
        state,
        "endpoint",
        {"epoch": "e", "revision": 3, "service": "orders", "address": "x", "endpoint": {"address": "x"}},
    )
    assert bad is not None and "invalid endpoints" in (link.apply(bad, cache=False) or "")
    assert link.mesh.snapshot is after  # refused: the state in force stays


def test_the_watch_acks_heartbeats_and_reports_go_through_one_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link's loops share one client (its requests besides the watch share a kept-alive
    connection; a move to another replica opens two connections there, not four), which is
    closed with the Mesh."""
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0.2")
    control = Control(tmp_path / "data")
    m = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
    link = m.link
    try:
        assert link is not None and link.http is not None and link.subscriber is not None
        registration = m.register("127.0.0.1:8001", ttl=1.5)
        assert control.apply([destination("orders", "v1")]).status_code == 200
        rows = lambda: {r["client"]: r for r in control.plane.hub.clients()}  # noqa: E731
        wait_until(lambda: (rows().get(link.client_id) or {}).get("version") == 1, 5.0, "the ack")
        wait_until(lambda: link.client_id in control.plane._telemetry, 5.0, "a report")
        wait_until(lambda: registration.instance_id is not None, 5.0, "the registration")
        assert link.reporter is not None
        shared = {id(x) for x in (link.http, link.subscriber._http, link.reporter._http, registration._http)}
        assert len(shared) == 1
    finally:
        m.close()
        control.stop()
    assert link.http.is_closed
