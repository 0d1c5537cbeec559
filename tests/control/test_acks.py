"""Ack bodies: one ack (the old form) or a batch, checked by hand with the bounds of the
documented model; the latest ack of a client wins. Against a real control service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from meshlib.control.acks import MAX_BATCH, Ack, latest, parse_acks
from meshlib.control.parsing import AckBatch, AckBody, ApiError
from meshlib.control.stream import Hub
from tests.control import DESTINATION, ROUTE, Control


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data")
    yield c
    c.stop()


def rows(control: Control) -> dict[str, dict[str, Any]]:
    return {r["client"]: r for r in control.http.get("/v1/clients").json()}


def test_the_old_single_ack_body_is_still_taken(control: Control) -> None:
    control.apply([DESTINATION])
    body = {"client": "old", "service": "checkout", "revision": 1, "version": 1, "ok": True, "error": None}
    assert control.http.post("/v1/ack", json=body).status_code == 204
    row = rows(control)["old"]
    assert (row["revision"], row["version"], row["ok"], row["service"]) == (1, 1, True, "checkout")
    assert row["replica"] == control.plane.replica_id


def test_a_batch_lands_every_client_and_the_latest_of_each_wins(control: Control) -> None:
    control.apply([DESTINATION])
    control.apply([DESTINATION, ROUTE])
    epoch = control.plane.hub.epoch
    batch = [
        {"client": "a", "revision": 2, "version": 2, "epoch": epoch},
        {"client": "b", "revision": 1, "version": 1, "epoch": epoch},
        {"client": "a", "revision": 1, "version": 1, "epoch": epoch},  # older, later in the list
        {"client": "b", "revision": 2, "version": 2, "ok": False, "error": "no", "epoch": epoch},
    ]
    assert control.http.post("/v1/ack", json={"acks": batch}).status_code == 204
    listed = rows(control)
    assert (listed["a"]["revision"], listed["a"]["ok"]) == (2, True)
    assert (listed["b"]["revision"], listed["b"]["ok"], listed["b"]["error"]) == (2, False, "no")
    # a retry of an older ack that arrives after the newer one does not set the client back
    old = {"client": "a", "revision": 1, "version": 1, "epoch": epoch}
    assert control.http.post("/v1/ack", json=old).status_code == 204
    assert rows(control)["a"]["revision"] == 2
    # nor does an ack about another stream (another epoch), though it counts as a sign of life
    seen = rows(control)["a"]["last_seen"]
    other = {"client": "a", "revision": 9, "version": 9, "epoch": "another"}
    assert control.http.post("/v1/ack", json=other).status_code == 204
    assert rows(control)["a"]["revision"] == 2 and rows(control)["a"]["last_seen"] >= seen
    assert control.plane.hub.stale_acks_total == 2


BAD_BODIES: list[Any] = [
    {},
    {"client": ""},
    {"client": "a b"},
    {"client": 5},
    {"client": "c", "revision": "1"},
    {"client": "c", "revision": True},
    {"client": "c", "revision": -1},
    {"client": "c", "version": 2**64},
    {"client": "c", "ok": "yes"},
    {"client": "c", "error": "e" * 10_001},
    {"client": "c", "epoch": ""},
    {"client": "c", "epoch": 5},
    {"client": "c", "service": ["s"]},
    {"acks": []},
    {"acks": {"client": "c"}},
    {"acks": [{"client": "c"}, {"client": "c", "revision": -1}]},
    {"acks": [{"client": "c"}] * (MAX_BATCH + 1)},
    {"acks": ["c"]},
    {"acks": [{"client": "c"}], "client": "c"},
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_bodies_are_refused_and_nothing_is_taken(control: Control, body: Any) -> None:
    reply = control.http.post("/v1/ack", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"] in ("invalid request", "expected a JSON object, got a list")
    assert control.http.get("/v1/clients").json() == []


def test_a_bad_ack_in_a_batch_is_named_by_its_position(control: Control) -> None:
    body = {"acks": [{"client": "ok"}, {"client": "c", "revision": -1}]}
    problems = control.http.post("/v1/ack", json=body).json()["problems"]
    assert [p["field"] for p in problems] == ["acks.1.revision"]


def test_not_json_and_wrong_methods_keep_their_answers(control: Control) -> None:
    assert control.http.post("/v1/ack", content=b"{").status_code == 400
    assert control.http.post("/v1/ack", content=b"[]").status_code == 422
    assert (
        control.http.post("/v1/ack", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    )
    assert control.http.post("/v1/ack", content=b"{" + b" " * (2 << 20) + b"}").status_code == 413
    assert control.http.get("/v1/ack").status_code == 405


@pytest.mark.parametrize("body", [*BAD_BODIES, {"client": "c"}, {"client": "c", "revision": 3, "x": 1}])
def test_the_hand_checks_agree_with_the_documented_model(body: Any) -> None:
    """The OpenAPI document shows AckBody/AckBatch; the handler checks by hand: same verdicts."""
    try:
        parse_acks(body)
        hand = True
    except ApiError:
        hand = False
    model = False
    for form in (AckBody, AckBatch):
        try:
            form.model_validate(body)
            model = not ("acks" in body and "client" in body)  # both forms at once: refused by hand
        except ValidationError:
            pass
    assert hand == model


def test_latest_keeps_one_ack_per_client() -> None:
    acks = [Ack("a", revision=3), Ack("b"), Ack("a", revision=5), Ack("a", revision=4), Ack("b", ok=False)]
    assert latest(acks) == [Ack("a", revision=5), Ack("b", ok=False)]


def test_acks_without_an_epoch_are_taken_as_they_come() -> None:
    """Clients from before the epoch field: the last ack received is the record (as always)."""
    hub = Hub()
    hub.ack("c", service=None, revision=5, version=5, ok=True, error=None)
    hub.ack("c", service=None, revision=4, version=4, ok=True, error=None)
    assert hub.clients()[0]["revision"] == 4


def test_a_batch_with_one_ack_the_caller_may_not_send_is_refused_whole(tmp_path: Path) -> None:
    from tests.control.test_security_api import SecureControl, bearer

    secure = SecureControl(tmp_path / "secure")
    try:
        http = secure.http
        payments, orders = bearer(secure.token("payments")), bearer(secure.token("orders"))
        assert (
            http.post("/v1/ack", json={"client": "pay-1", "revision": 0}, headers=payments).status_code == 204
        )
        batch = {
            "acks": [{"client": "ord-1", "revision": 0}, {"client": "pay-1", "revision": 0, "ok": False}]
        }
        assert http.post("/v1/ack", json=batch, headers=orders).status_code == 403
        listed = {r["client"]: r for r in http.get("/v1/clients").json()}
        assert "ord-1" not in listed and listed["pay-1"]["ok"] is True  # nothing of it taken
        assert http.post("/v1/ack", json={"acks": batch["acks"][:1]}, headers=orders).status_code == 204
    finally:
        secure.stop()
