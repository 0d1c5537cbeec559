"""What one registration may hold, and what a flood of them costs the control service: bad
labels and addresses are a 422 naming the problem; the largest allowed registrations, sent over
and over, leave its memory flat (measured on a real `meshlib control` process); a restart keeps
each instance's expiry."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control.registration import Registration
from meshlib.control.registry import MAX_LABEL_NAME, MAX_LABEL_PREFIX, MAX_LABEL_VALUE, MAX_LABELS
from tests.conftest import wait_until
from tests.control import Control
from tests.control.process import ControlProcess

MB = 1 << 20


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    c = Control(tmp_path / "data")
    yield c
    c.stop()


def largest_labels(tag: str) -> dict[str, str]:
    """As many labels as allowed, each with the longest key and value allowed."""
    prefix = ".".join(["p" * 63, "q" * 63, "r" * 63, "s" * 61])
    assert len(prefix) == MAX_LABEL_PREFIX
    return {
        f"{prefix}/{i:02d}{'n' * (MAX_LABEL_NAME - 2)}": (tag + "v" * MAX_LABEL_VALUE)[:MAX_LABEL_VALUE]
        for i in range(MAX_LABELS)
    }


def test_bad_labels_and_addresses_are_refused_with_a_clear_error(control: Control) -> None:
    good = {"address": "127.0.0.1:9001"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "labels": {f"k{i}": "v" for i in range(MAX_LABELS + 1)}}, "at most 32 labels"),
        ({**good, "labels": {f"k{i}": "v" * 100 for i in range(1000)}}, "at most 32 labels"),
        ({**good, "labels": {"k" * (MAX_LABEL_NAME + 1): "v"}}, "the name must be 1 to 63"),
        ({**good, "labels": {"": "v"}}, "the name must be"),
        ({**good, "labels": {"a\x00b": "v"}}, "the name must be"),
        ({**good, "labels": {"a\nb": "v"}}, "the name must be"),
        ({**good, "labels": {"-a": "v"}}, "the name must be"),
        ({**good, "labels": {"a b": "v"}}, "the name must be"),
        ({**good, "labels": {"x" * 300 + "/a": "v"}}, "DNS subdomain"),
        ({**good, "labels": {"bad_prefix/a": "v"}}, "DNS subdomain"),
        ({**good, "labels": {"a": "v" * (MAX_LABEL_VALUE + 1)}}, "longer than 256"),
        ({**good, "labels": {"a": "x\x00y"}}, "printable"),
        ({**good, "labels": {"a": "line\nbreak"}}, "printable"),
        ({**good, "labels": {"a": "\x1b[31m"}}, "printable"),
        ({"address": "999.999.999.999:80"}, "not an IPv4 address"),
        ({"address": "1.2.3:80"}, "not an IPv4 address"),
        ({"address": "256.1.1.1:80"}, "not an IPv4 address"),
        ({"address": "127.0.0.1:0"}, "port must be a number from 1 to 65535"),
        ({"address": "127.0.0.1:65536"}, "port must be"),
        ({"address": "127.0.0.1:+80"}, "port must be"),
        ({"address": "127.0.0.1:\u0668\u0660"}, "port must be"),
        ({"address": "[::g]:80"}, "not an IPv6 address"),
        ({"address": "::1:80"}, "IPv6 address in brackets"),
        ({"address": "-bad.example:80"}, "not a valid host name"),
        ({"address": "a..b:80"}, "not a valid host name"),
        ({"address": "h\u00e9te:80"}, "not a valid host name"),
        ({"address": ("a" * 63 + ".") * 4 + "com:80"}, "not a valid host name"),
    ]
    for body, reason in cases:
        r = control.http.post("/v1/registry/orders", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text[:300])
        problems = r.json()["problems"]
        assert any(reason in p["reason"] for p in problems), (body, problems)
    assert len(control.plane.registry) == 0
    for address in (
        "10.0.0.1:1",
        "[::1]:65535",
        "[2001:db8::1]:80",
        "orders-1.internal:8080",
        "localhost:80",
    ):
        r = control.http.post("/v1/registry/orders", json={"address": address})
        assert r.status_code == 201, (address, r.text)
    r = control.http.post(
        "/v1/registry/orders", json={"address": "10.0.0.2:80", "labels": largest_labels("a")}
    )
    assert r.status_code == 201, r.text
    listed = control.http.get("/v1/registry/orders").json()["orders"]
    assert next(i for i in listed if i["address"] == "10.0.0.2:80")["labels"] == largest_labels("a")


def _watch_to_the_end(url: str, seen: list[str], stop: threading.Event) -> None:
    """A subscriber reading every event (so the flood also goes through a live stream)."""
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=30.0)) as http,
        http.stream("GET", f"{url}/v1/watch", params={"client": "reader"}) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if stop.is_set():
                return


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f"meshlib_control_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_registration_flood_leaves_memory_flat(tmp_path: Path) -> None:
    """120 instances with the largest labels allowed, re-registered with new labels round after
    round and heartbeated, with a subscriber reading: the control service's RSS grows by a few
    tens of MB at most (each event carries one instance, and the replay buffer is bounded by
    bytes), where publishing the whole instance list on every change took it up by about 900 MB."""
    control = ControlProcess(tmp_path / "data")
    seen: list[str] = []
    stop = threading.Event()
    reader = threading.Thread(target=_watch_to_the_end, args=(control.url, seen, stop), daemon=True)
    try:
        with httpx.Client(base_url=control.url, timeout=30.0) as http:
            reader.start()
            wait_until(lambda: "snapshot" in seen, what="the subscriber's snapshot")
            # warm up the paths the flood takes, then measure from there
            r = http.post("/v1/registry/warm", json={"address": "10.9.9.9:80", "labels": largest_labels("w")})
            assert r.status_code == 201
            http.put(f"/v1/registry/warm/{r.json()['id']}")
            wait_until(lambda: "endpoint" in seen, what="the first endpoint event")
            baseline = control.rss()

            # oversized registrations (100 KB of labels) are refused and leave nothing behind
            huge = {f"label-{i:04d}": "x" * 100 for i in range(1000)}
            for n in range(20):
                r = http.post("/v1/registry/orders", json={"address": f"10.1.0.{n}:80", "labels": huge})
                assert r.status_code == 422 and "at most 32 labels" in r.text
            ids: dict[str, str] = {}
            rounds = 4
            for round_ in range(rounds):
                for n in range(120):
                    address = f"10.0.{n // 250}.{n % 250}:8080"
                    body = {"address": address, "labels": largest_labels(f"{round_}-{n}-"), "ttl": 600}
                    r = http.post("/v1/registry/orders", json=body)
                    assert r.status_code == 201, r.text
                    ids[address] = r.json()["id"]
                for instance in list(ids.values())[::4]:
                    assert http.put(f"/v1/registry/orders/{instance}").status_code == 200
            assert len(http.get("/v1/registry/orders").json()["orders"]) == 120
            published = 1 + rounds * 120
            wait_until(lambda: seen.count("endpoint") >= published, 30, "every event at the subscriber")
            assert seen.count("endpoint") == published
            buffered = _metric(http, "replay_buffer_bytes")
            grown = control.rss() - baseline
        # each event carries one instance (~20 KB here), not the service's list (~2.4 MB)
        print(f"grown {grown / MB:.1f} MB, buffered {buffered / MB:.1f} MB")
        assert buffered < published * 25_000
        assert grown < 64 * MB, f"RSS grew by {grown / MB:.0f} MB"
    finally:
        stop.set()
        control.stop()


def test_a_restart_keeps_the_expiry_of_an_instance_that_stopped_heartbeating(tmp_path: Path) -> None:
    """The instance dies (no more heartbeats) and the control service restarts: the instance is
    restored with the time it had left and disappears at its original expiry, not a TTL later."""
    data = tmp_path / "data"
    control = ControlProcess(data)
    ttl = 8.0
    try:
        with httpx.Client(base_url=control.url, timeout=10.0) as http:
            r = http.post("/v1/registry/orders", json={"address": "10.0.0.1:80", "ttl": ttl})
            assert r.status_code == 201
            expires = time.time() + ttl
            instance = r.json()["id"]
            alive = http.post("/v1/registry/orders", json={"address": "10.0.0.2:80", "ttl": 600}).json()["id"]
    finally:
        control.stop()
    # the control service stays down for a while (the scenario, not a synchronisation)
    time.sleep(max(0.0, expires - ttl + 3 - time.time()))
    control = ControlProcess(data, port=control.port)
    try:
        with httpx.Client(base_url=control.url, timeout=10.0) as http:

            def listed() -> dict[str, float]:
                return {i["id"]: i["expires_in"] for i in http.get("/v1/registry/orders").json()["orders"]}

            now, restored = time.time(), listed()
            assert alive in restored and restored[alive] > 590  # a live one keeps its time too
            if instance in restored:  # restarted before its expiry: it has only what was left
                assert restored[instance] <= expires - now + 0.5
            # a fresh TTL would keep it until at least 3 + 8 s after registering
            while instance in listed():
                assert time.time() < expires + 2, "the dead instance outlived its original expiry"
                time.sleep(0.05)
            assert time.time() >= expires - 0.5
            assert list(listed()) == [alive]
            assert http.put(f"/v1/registry/orders/{alive}").status_code == 200
    finally:
        control.stop()


def test_heartbeats_move_the_saved_expiry_on(control: Control) -> None:
    """A live instance's saved expiry follows its heartbeats (saved at most a second later), so
    a restart keeps it rather than dropping it at its first expiry."""
    path = control.data_dir / "registry.json"

    def saved_expiry(instance: str) -> float:
        if not path.exists():
            return 0.0
        return next((i["expires_at"] for i in json.loads(path.read_text()) if i["id"] == instance), 0.0)

    r = control.http.post("/v1/registry/orders", json={"address": "10.0.0.1:80", "ttl": 5})
    instance = r.json()["id"]
    wait_until(lambda: 0 < saved_expiry(instance) <= time.time() + 5, what="the registration saved")
    assert control.http.put(f"/v1/registry/orders/{instance}", json={"ttl": 60}).status_code == 200
    wait_until(lambda: saved_expiry(instance) > time.time() + 50, what="the heartbeat saved")


def test_saved_instances_beyond_the_bounds_are_not_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A registry.json from a version that accepted anything: what is valid now comes back, the
    rest is dropped with one warning."""
    item = {"service": "orders", "weight": 1, "ttl": 60, "expires_at": time.time() + 60, "labels": {}}
    saved = [
        {**item, "id": "a" * 16, "address": "10.0.0.1:80", "labels": {"version": "v1"}},
        {**item, "id": "b" * 16, "address": "999.999.999.999:80"},
        {**item, "id": "c" * 16, "address": "10.0.0.3:80", "labels": {f"k{i}": "v" for i in range(100)}},
        {**item, "id": "d" * 16, "address": "10.0.0.4:80", "labels": {"a": "\x00"}},
    ]
    (tmp_path / "registry.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="meshlib.control"):
        plane = ControlPlane(ControlSettings(tmp_path))
    try:
        assert [i["id"] for i in plane.registry.describe("orders")["orders"]] == ["a" * 16]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "3 saved instances" in warnings[0]
    finally:
        plane.close()


def test_a_registration_beyond_the_bounds_fails_where_it_is_made() -> None:
    for address, labels in (
        ("999.999.999.999:80", {}),
        ("10.0.0.1:0", {}),
        ("10.0.0.1:80", {"a": "x\ny"}),
        ("10.0.0.1:80", {f"k{i}": "v" for i in range(MAX_LABELS + 1)}),
    ):
        with pytest.raises(ValueError):
            Registration("http://127.0.0.1:9", "orders", address, labels=labels)
    assert Registration("http://127.0.0.1:9", "orders", "[::1]:80", labels=largest_labels("x")).labels
