"""Several control replicas: the shared choice of the one in use, and a Mesh failing over
between real control services (the watch, acks, heartbeats and telemetry move together)."""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.control.endpoints import ControlEndpoints, parse_control_urls
from meshlib.testing import bind
from tests.backend import dead_address
from tests.conftest import wait_until
from tests.control import Control

A, B, C = "http://a:7070", "http://b:7070", "http://c:7070"


# -- the URLs --------------------------------------------------------------------------------


def test_urls_from_a_comma_separated_string_or_a_list() -> None:
    assert parse_control_urls(" http://a:7070/, http://b:7070 ,") == (A, B)
    assert parse_control_urls([A + "/", B]) == (A, B)
    assert parse_control_urls("https://control.example") == ("https://control.example",)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "no URL"),
        ("ftp://a:21", "URL 1 is not an http"),
        ("http://a:7070,127.0.0.1:7070", "URL 2 is not an http"),
        ("http://:7070", "URL 1 is not an http"),
        ("http://a:port", "URL 1 is not a URL"),
        ("http://a:7070/?x=1", "query"),
        ("http://a:7070,https://b:7070", "mix http and https"),
        ("http://a:7070,http://a:7070/", "listed twice"),
    ],
)
def test_bad_urls_are_refused_without_showing_them(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_control_urls(value)
    assert "a:7070" not in str(caught.value)  # a URL may carry a password


# -- moving on -------------------------------------------------------------------------------


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == "meshlib.control"]


def test_a_failure_moves_everyone_once_and_only_all_failed_is_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib.control")
    endpoints = ControlEndpoints([A, B, C], spread=False)
    assert endpoints.current == A
    endpoints.failed(A, "refused")
    assert endpoints.current == B
    endpoints.failed(A, "refused")  # a second loop meeting the same dead replica: no second move
    assert endpoints.current == B and endpoints.switches == 1
    endpoints.failed(B, "refused")
    assert endpoints.current == C
    assert messages(caplog, logging.WARNING) == []  # a switch is not an outage
    switches = messages(caplog, logging.INFO)
    assert switches == [
        f"control service at {A} unreachable (refused); switching to {B}",
        f"control service at {B} unreachable (refused); switching to {C}",
    ]
    endpoints.failed(C, "refused", "keeping control version 3")  # every replica failed: the outage
    endpoints.failed(A, "refused")
    endpoints.failed(B, "refused")
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 1 and warnings[0].startswith(f"every control service replica ({A}, {B}, {C})")
    assert "keeping control version 3" in warnings[0] and endpoints.outage.down
    assert len(messages(caplog, logging.INFO)) == 2  # no switch line during the outage either
    endpoints.ok(endpoints.current)
    back = messages(caplog, logging.INFO)[2:]
    assert len(back) == 1 and "reachable again" in back[0] and not endpoints.outage.down
    endpoints.failed(endpoints.current, "refused")  # a new round: a switch again, not an outage
    assert len(messages(caplog, logging.WARNING)) == 1


def test_one_url_warns_at_the_first_failure_and_never_switches(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.control")
    endpoints = ControlEndpoints(A)
    endpoints.failed(A, "refused")
    endpoints.leave(A, "stream ended")
    assert endpoints.current == A and endpoints.switches == 0
    assert [m.split(" (")[0] for m in messages(caplog, logging.WARNING)] == [
        f"control service at {A} unreachable"
    ]


def test_a_broken_stream_moves_on_without_counting_as_a_failure() -> None:
    endpoints = ControlEndpoints([A, B])
    endpoints.leave(A, "incomplete chunked read")
    assert endpoints.current == B and endpoints.failures == 0
    endpoints.leave(A, "late report")  # not the one in use any more
    assert endpoints.current == B


def test_the_pause_is_short_while_untried_replicas_remain_and_grows_per_round() -> None:
    endpoints = ControlEndpoints([A, B], backoff=(0.1, 5.0))
    endpoints.failed(A, "x")
    assert all(0.1 <= endpoints.pause() <= 0.2 for _ in range(50))
    endpoints.failed(B, "x")
    assert all(0.1 <= endpoints.pause() <= 0.2 for _ in range(50))  # one full round
    for _ in range(4):  # two more rounds
        endpoints.failed(endpoints.current, "x")
    assert max(endpoints.pause() for _ in range(200)) > 0.4
    assert all(endpoints.pause() <= 0.8 for _ in range(50))
    for _ in range(40):
        endpoints.failed(endpoints.current, "x")
    assert all(endpoints.pause() <= 5.0 for _ in range(50))
    assert all(endpoints.pause(high=1.0) <= 1.0 for _ in range(50))


def test_after_the_preferred_replica_each_process_has_an_order_of_its_own() -> None:
    """Clients given A,B,C all prefer A; when A dies they spread over B and C rather than all
    landing on B (which would then carry twice its share)."""
    seconds: Counter[str] = Counter()
    for _ in range(300):
        endpoints = ControlEndpoints([A, B, C])
        assert endpoints.current == A and sorted(endpoints.order) == [A, B, C] and endpoints.order[0] == A
        endpoints.failed(A, "refused")
        assert endpoints.current == endpoints.order[1]
        seconds[endpoints.current] += 1
        assert str(endpoints) == f"{A},{B},{C}"  # the list as given (it names the cache)
    assert 110 < seconds[B] < 190 and seconds[B] + seconds[C] == 300  # about half each


def test_away_from_the_preferred_replica_until_going_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="meshlib.control")
    endpoints = ControlEndpoints([A, B, C], return_after=(2.0, 4.0), spread=False)
    assert endpoints.preferred == A and not endpoints.away
    assert not endpoints.go_back(10.0)  # not away: nothing to do
    endpoints.failed(A, "refused")
    assert endpoints.away and endpoints.current == B
    settles = [endpoints.settle() for _ in range(200)]
    assert all(2.0 <= s <= 4.0 for s in settles) and max(settles) - min(settles) > 1.0  # jittered
    assert endpoints.go_back(3.2)
    assert endpoints.current == A and not endpoints.away and endpoints.switches == 2
    assert (
        messages(caplog, logging.INFO)[-1]
        == f"control service at {A} healthy for 3s; moving back to it from {B}"
    )
    assert not endpoints.go_back(3.2)  # a second loop: no second move


def test_every_move_is_told_to_the_listeners_and_nothing_else_is() -> None:
    endpoints = ControlEndpoints([A, B, C], spread=False, return_after=(1.0, 1.0))
    seen: list[str] = []
    stop = endpoints.on_move(lambda: seen.append(endpoints.current))
    endpoints.failed(A, "refused")  # a move
    endpoints.failed(A, "refused")  # a late report about a replica left already: none
    endpoints.ok(B)
    endpoints.leave(B, "stream ended")  # a move
    endpoints.go_back(1.0)  # a move
    assert seen == [B, C, A]
    stop()
    stop()  # twice is harmless
    endpoints.failed(A, "refused")
    assert seen == [B, C, A]


def test_never_away_with_one_url_or_with_going_back_turned_off() -> None:
    assert not ControlEndpoints(A).away
    endpoints = ControlEndpoints([A, B], return_after=None)
    endpoints.failed(A, "refused")
    assert endpoints.current == B and not endpoints.away and not endpoints.go_back(60.0)


# -- a Mesh over real replicas ------------------------------------------------------------------


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Control, Control]]:
    """Two control services, each with its own SQLite store (not sharing state)."""
    a, b = Control(tmp_path / "a", ping=0.5), Control(tmp_path / "b", ping=0.5)
    yield a, b
    for c in (a, b):
        c.stop()


def destination(subset: str) -> dict:
    return {"kind": "Destination", "service": "orders", "subsets": {subset: {"version": subset}}}


def subsets_in_force(m: meshlib.Mesh) -> set[str]:
    assert m.link is not None and m.link.state is not None
    return {s for d in m.link.state.documents if d["kind"] == "Destination" for s in d["subsets"]}


def acked(control: Control, client_id: str) -> int | None:
    for c in control.http.get("/v1/clients").json():
        if c["client"] == client_id:
            return c["version"]
    return None


def test_the_watch_acks_and_reports_move_to_the_other_replica(
    replicas: tuple[Control, Control],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = replicas
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0.2")
    assert a.apply([destination("va")]).status_code == 200
    assert b.apply([destination("vb")]).status_code == 200
    caplog.set_level(logging.INFO, logger="meshlib.control")
    with meshlib.Mesh("checkout", control=[a.url, b.url], cache_dir=tmp_path / "cache") as m:
        assert m.link is not None and m.link.subscriber is not None
        assert m.wait_for_control(10)
        assert subsets_in_force(m) == {"va"}
        assert m.link.subscriber.watching == a.url
        wait_until(lambda: acked(a, m.link.client_id) == 1, 5.0, "the ack on A")
        a.server.kill()  # a crashed replica: its streams break off
        wait_until(lambda: m.link.subscriber.watching == b.url, 5.0, "the watch on B")
        # B cannot resume A's event id (its own store): it sent its state, which is in force
        wait_until(lambda: subsets_in_force(m) == {"vb"}, 5.0, "B's state")
        assert b.apply([destination("vb2")]).status_code == 200  # a change on B reaches the Mesh
        wait_until(lambda: subsets_in_force(m) == {"vb2"}, 5.0, "the change applied on B")
        wait_until(lambda: acked(b, m.link.client_id) == 2, 5.0, "the ack on B")
        wait_until(lambda: m.link.client_id in b.plane.telemetry(), 5.0, "a report on B")
        assert m.link.url == b.url
    ours = [r for r in caplog.records if r.name == "meshlib.control"]
    assert not [r.getMessage() for r in ours if r.levelno >= logging.WARNING]  # a switch is no outage
    assert any(f"switching to {b.url}" in r.getMessage() and r.levelno == logging.INFO for r in ours)


def test_heartbeats_register_the_instance_with_the_other_replica(
    replicas: tuple[Control, Control], tmp_path: Path
) -> None:
    a, b = replicas
    sock = bind()  # an address nothing else takes while the test runs
    address = f"127.0.0.1:{sock.getsockname()[1]}"

    def listed(control: Control) -> list[str]:
        body = control.http.get("/v1/registry/payments").json()
        return [i["address"] for i in body.get("payments", [])]

    with meshlib.Mesh("payments", control=f"{a.url},{b.url}", cache_dir=tmp_path / "cache") as m:
        registration = m.register(address, ttl=1.0)
        wait_until(lambda: listed(a) == [address], 5.0, "registered through A")
        assert listed(b) == []
        a.server.kill()
        wait_until(lambda: listed(b) == [address], 5.0, "registered with B after A died")
        assert registration.url == b.url
        m.deregister()
        assert listed(b) == []  # deregistration went to the replica in use
    sock.close()


def test_every_replica_down_is_one_warning_and_one_line_when_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshlib.control.app import ControlSettings, create_app
    from meshlib.testing import serve

    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    caplog.set_level(logging.DEBUG, logger="meshlib.control")
    first, second = dead_address(), dead_address()
    urls = [f"http://{first}", f"http://{second}"]
    with meshlib.Mesh("checkout", control=urls, cache_dir=tmp_path / "cache") as m:
        assert m.link is not None

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

        wait_until(lambda: m.link.outage.failures >= 2, 10.0, "a retry after the warning")
        assert len(warnings()) == 1 and warnings()[0].startswith(f"every control service replica ({urls[0]}")
        host, port = second.rsplit(":", 1)
        server = serve(
            create_app(ControlSettings(tmp_path / "control")), host=host, port=int(port), lifespan="on"
        )
        try:
            assert m.wait_for_control(15)
            wait_until(lambda: "reachable again" in caplog.text, 5.0, "the back-again line")
            assert m.link.url == urls[1]
            records = list(caplog.records)  # not what the kill below causes: both down again
        finally:
            server.kill()  # the Mesh still watches: no graceful wait for its stream
    back = [r for r in records if "reachable again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert len([r for r in records if r.levelno >= logging.WARNING and r.name == "meshlib.control"]) == 1


def test_the_watch_comes_back_to_a_restarted_replica_when_the_other_fails(
    replicas: tuple[Control, Control], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshlib.control.app import ControlSettings, create_app
    from meshlib.testing import serve

    a, b = replicas
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    with meshlib.Mesh("checkout", control=[a.url, b.url], cache_dir=tmp_path / "cache") as m:
        assert m.link is not None and m.link.subscriber is not None and m.wait_for_control(10)
        a.server.kill()
        wait_until(lambda: m.link.subscriber.watching == b.url, 5.0, "the watch on B")
        restarted = serve(create_app(ControlSettings(a.data_dir)), port=a.server.port, lifespan="on")
        try:
            assert m.link.subscriber.watching == b.url  # no move back while B serves
            b.server.kill()
            wait_until(lambda: m.link.subscriber.watching == a.url, 5.0, "the watch back on A")
            assert restarted.url == a.url
        finally:
            restarted.kill()  # the Mesh still watches: no graceful wait for its stream


def test_the_watch_goes_back_to_its_preferred_replica_once_healthy_and_not_behind(
    replicas: tuple[Control, Control], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted preferred replica gets its clients back after its health held for a while,
    but not while it serves an older version than they have (cut off from the store, say)."""
    from meshlib.control.app import ControlSettings, create_app
    from meshlib.testing import serve

    a, b = replicas
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    assert a.apply([destination("va")]).json()["version"] == 1
    with meshlib.Mesh("checkout", control=[a.url, b.url], cache_dir=tmp_path / "cache") as m:
        assert m.link is not None and m.link.subscriber is not None and m.wait_for_control(10)
        m.link.endpoints.return_after = (0.3, 0.6)
        a.server.kill()
        wait_until(lambda: m.link.subscriber.watching == b.url, 5.0, "the watch on B")
        for subset in ("vb", "vb2"):
            assert b.apply([destination(subset)]).status_code == 200
        wait_until(lambda: subsets_in_force(m) == {"vb2"}, 5.0, "B's version 2")
        restarted = serve(create_app(ControlSettings(a.data_dir)), port=a.server.port, lifespan="on")
        try:
            restarted_admin = {"Authorization": f"Bearer {a.token}"}
            time.sleep(1.5)  # the time a move back takes (0.6 s at most) and then some: it must not
            assert m.link.subscriber.watching == b.url  # A answers, but serves version 1 < 2
            put = httpx.put(f"{a.url}/v1/config", json=[destination("va3")], headers=restarted_admin)
            assert put.json()["version"] == 2  # A catches up (its own store here)
            wait_until(lambda: m.link.subscriber.watching == a.url, 5.0, "the watch back on A")
            wait_until(lambda: subsets_in_force(m) == {"va3"}, 5.0, "A's rules in force")
            assert m.link.url == a.url  # the acks and reports go back with it
        finally:
            restarted.kill()  # the Mesh still watches: no graceful wait for its stream


def test_a_preferred_replica_that_stays_down_is_asked_less_and_less_often(
    replicas: tuple[Control, Control], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed health check doubles the wait before the next, up to the settle period: a
    fleet that left a dead machine does not keep asking it every few seconds."""
    import socket
    import threading

    a, b = replicas
    monkeypatch.setenv("MESH_TELEMETRY_INTERVAL", "0")
    with meshlib.Mesh("checkout", control=[a.url, b.url], cache_dir=tmp_path / "cache") as m:
        assert m.link is not None and m.link.subscriber is not None and m.wait_for_control(10)
        m.link.endpoints.return_after = (2.0, 2.0)  # checks every 0.25-0.5 s at first, then up to 2 s
        port = a.server.port
        a.server.kill()
        # where A listened, something that takes each connection and drops it: every check fails
        listener = socket.create_server(("127.0.0.1", port))
        listener.settimeout(0.2)
        checks: list[float] = []
        stop = threading.Event()

        def take() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                checks.append(time.monotonic())
                conn.close()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        try:
            wait_until(lambda: m.link.subscriber.watching == b.url, 5.0, "the watch on B")
            wait_until(lambda: len(checks) >= 1, 5.0, "a first health check of A")
            first = checks[0]
            wait_until(lambda: time.monotonic() - first > 6.0, 10.0, "six seconds of checks")
            within = [t for t in checks if t - first <= 6.0]
            # without the backoff: one every 0.25-0.5 s, 12 or more; with it at most 7 (each wait
            # at least half of 0.5, 1, 2, 2, ... s)
            assert 3 <= len(within) <= 8, [round(t - first, 2) for t in within]
            gaps = [later - earlier for earlier, later in itertools.pairwise(within)]
            assert max(gaps) >= 0.9, gaps  # a wait of 1 s or more (jittered to at least half) came
            assert m.link.subscriber.watching == b.url
        finally:
            stop.set()
            taker.join(5)
            listener.close()
