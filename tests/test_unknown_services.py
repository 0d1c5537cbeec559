"""Unknown services: a NoEndpointsError that says why, never a DNS error; and a dead control
service logged once per outage. Real servers and a real control service on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.control.app import ControlSettings, create_app
from meshlib.testing import RunningServer, serve
from meshlib.unknown import single_label
from tests.backend import dead_address
from tests.conftest import Fleet, wait_until, write_rules

MODES = ["sync", "async"]


def call(mesh: meshlib.Mesh, mode: str, service: str, path: str = "/whoami") -> httpx.Response:
    """GET `path` through `@mesh.call(service)`, from a sync or an async function."""
    if mode == "sync":

        @mesh.call(service)
        def get(client: httpx.Client) -> httpx.Response:
            return client.get(path)

        return get()

    @mesh.call(service)
    async def aget(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(path)

    return asyncio.run(aget())  # the loop's shared client closes as asyncio.run shuts it down


def get(mesh: meshlib.Mesh, mode: str, url: str, **kwargs: Any) -> httpx.Response:
    """GET `url` with a plain mesh client, sync or async (`kwargs` go to the client)."""
    if mode == "sync":
        with mesh.sync_client(**kwargs) as client:
            return client.get(url)

    async def run() -> httpx.Response:
        async with mesh.client(**kwargs) as client:
            return await client.get(url)

    return asyncio.run(run())


def start_control(data: Path, port: int = 0) -> RunningServer:
    return serve(create_app(ControlSettings(data, ping=0.5)), port=port, lifespan="on")


@pytest.fixture
def control(tmp_path: Path) -> Iterator[RunningServer]:
    server = start_control(tmp_path / "control")
    yield server
    server.kill()


def admin(data: Path) -> dict[str, str]:
    return {"authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}


def orders_file(tmp_path: Path, address: str) -> Path:
    docs = [{"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]}]
    return write_rules(tmp_path / "mesh.yaml", docs)


# -- @mesh.call: always a mesh service -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_call_without_rules_says_the_mesh_has_none(mode: str) -> None:
    mesh = meshlib.Mesh("checkout")
    try:
        with pytest.raises(meshlib.NoEndpointsError) as err:
            call(mesh, mode, "billing")
        assert "'billing'" in str(err.value)
        assert "no control service and no rules file" in str(err.value)
        assert err.value.request.url.host == "billing"  # like any httpx error, it names the request
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_call_of_a_service_the_rules_file_lacks_names_the_file(
    mode: str, tmp_path: Path, fleet: Fleet
) -> None:
    _, server = fleet.start("orders")
    path = orders_file(tmp_path, server.address)
    mesh = meshlib.Mesh("checkout", config=path)
    try:
        assert call(mesh, mode, "orders").json()["name"] == "orders"  # the file's service works
        with pytest.raises(
            meshlib.NoEndpointsError, match=rf"rules file {path} has no Endpoints for 'billing'"
        ):
            call(mesh, mode, "billing")
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_call_of_a_service_whose_endpoints_document_lists_none_says_so(mode: str, tmp_path: Path) -> None:
    """`endpoints: []` is "none, on purpose": the document is there, and the error says so."""
    path = write_rules(tmp_path / "mesh.yaml", [{"kind": "Endpoints", "service": "empty", "endpoints": []}])
    mesh = meshlib.Mesh("checkout", config=path)
    try:
        with pytest.raises(meshlib.NoEndpointsError) as err:
            call(mesh, mode, "empty")
        text = str(err.value)
        assert f"the Endpoints document for 'empty' in the rules file {path} lists no instances" in text
        assert "has no Endpoints" not in text
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_call_stays_meshed_with_passthrough_on(mode: str) -> None:
    """`passthrough` is for plain clients' hosts; a `@mesh.call` name never goes to DNS."""
    mesh = meshlib.Mesh("checkout", passthrough=True)
    try:
        with pytest.raises(meshlib.NoEndpointsError, match="'billing'") as err:
            call(mesh, mode, "billing")
        assert "passthrough" not in str(err.value)  # the hint is for single-label hosts only
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_control_not_reached_yet_points_at_wait_for_control(mode: str, tmp_path: Path) -> None:
    url = f"http://{dead_address()}"
    mesh = meshlib.Mesh("checkout", control=url, cache_dir=tmp_path / "cache")
    try:
        assert mesh.wait_for_control(timeout=0.2) is False  # no state, no cache: not ready
        with pytest.raises(meshlib.NoEndpointsError) as err:
            call(mesh, mode, "billing")
        text = str(err.value)
        assert f"control service at {url} not reached yet" in text
        assert "Mesh.wait_for_control()" in text and "'billing'" in text
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_control_without_endpoints_or_instances_for_the_service(
    mode: str, tmp_path: Path, control: RunningServer
) -> None:
    mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
    try:
        assert mesh.wait_for_control(timeout=10) is True
        with pytest.raises(meshlib.NoEndpointsError) as err:
            call(mesh, mode, "billing")
        assert "no Endpoints document and no registry instances for 'billing'" in str(err.value)
        assert "control version" in str(err.value)
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_control_endpoints_document_listing_none_and_no_instances(
    mode: str, tmp_path: Path, control: RunningServer
) -> None:
    docs = [{"kind": "Endpoints", "service": "billing", "endpoints": []}]
    r = httpx.put(f"{control.url}/v1/config", json=docs, headers=admin(tmp_path / "control"))
    assert r.status_code < 300, r.text
    mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
    try:
        assert mesh.wait_for_control(timeout=10) is True
        wait_until(lambda: mesh.snapshot.rules.endpoints("billing") is not None, what="the document")
        with pytest.raises(meshlib.NoEndpointsError) as err:
            call(mesh, mode, "billing")
        text = str(err.value)
        assert "the Endpoints document for 'billing' lists no instances and the registry has none" in text
        assert "no Endpoints document" not in text and "control version" in text
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
def test_registry_emptied_for_the_service(
    mode: str, tmp_path: Path, control: RunningServer, fleet: Fleet
) -> None:
    _, server = fleet.start("billing")
    r = httpx.post(f"{control.url}/v1/registry/billing", json={"address": server.address, "ttl": 30})
    assert r.status_code == 201, r.text
    mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
    try:
        assert mesh.wait_for_control(timeout=10) is True
        wait_until(lambda: mesh.snapshot.plan("billing") is not None, what="billing's instance")
        assert call(mesh, mode, "billing").json()["name"] == "billing"
        gone = httpx.delete(f"{control.url}/v1/registry/billing/{r.json()['id']}")
        assert gone.status_code < 300, gone.text
        wait_until(lambda: not mesh.snapshot.plans["billing"].endpoints, what="the empty registry")
        with pytest.raises(meshlib.NoEndpointsError, match="the registry has no live instances of 'billing'"):
            call(mesh, mode, "billing")
    finally:
        mesh.close()


# -- plain clients: single-label hosts ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_typo_host_is_a_mesh_service_while_dotted_hosts_and_ips_pass(
    mode: str, tmp_path: Path, fleet: Fleet
) -> None:
    _, orders = fleet.start("orders")
    _, outside = fleet.start("outside")
    mesh = meshlib.Mesh("checkout", config=orders_file(tmp_path, orders.address))
    try:
        with pytest.raises(meshlib.NoEndpointsError) as err:
            get(mesh, mode, "http://ordrs/orders/42")
        text = str(err.value)
        assert "'ordrs'" in text and "did you mean 'orders'?" in text
        assert "passthrough=True" in text and "MESH_PASSTHROUGH" in text
        # the outside world, by IP literal and by localhost, is untouched
        assert get(mesh, mode, f"{outside.url}/whoami").json()["name"] == "outside"
        assert get(mesh, mode, f"http://localhost:{outside.port}/whoami").json()["name"] == "outside"
        assert get(mesh, mode, "http://orders/whoami").json()["name"] == "orders"
    finally:
        mesh.close()


def _outside_world(seen: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    """Stands in for DNS and the internet behind the mesh's inner transport."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200, text="outside")

    return handler


@pytest.mark.parametrize("mode", MODES)
def test_dotted_hosts_reach_the_inner_transport_but_single_labels_do_not(mode: str) -> None:
    seen: list[str] = []
    mesh = meshlib.Mesh("checkout")
    try:
        transport = httpx.MockTransport(_outside_world(seen))
        kwargs = {"transport": transport}
        assert get(mesh, mode, "http://api.example.com/x", **kwargs).text == "outside"
        with pytest.raises(meshlib.NoEndpointsError, match="'billing'"):
            get(mesh, mode, "http://billing/x", **kwargs)
        assert seen == ["api.example.com"]
    finally:
        mesh.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_passthrough_sends_single_label_hosts_to_the_inner_transport(
    mode: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    if how == "environment":
        monkeypatch.setenv("MESH_PASSTHROUGH", "true")
        mesh = meshlib.Mesh("checkout")
    else:
        monkeypatch.setenv("MESH_PASSTHROUGH", "0")  # the argument wins over the environment
        mesh = meshlib.Mesh("checkout", passthrough=True)
    try:
        assert mesh.passthrough is True
        r = get(mesh, mode, "http://billing/x", transport=httpx.MockTransport(_outside_world(seen)))
        assert r.text == "outside" and seen == ["billing"]
    finally:
        mesh.close()


def test_a_malformed_passthrough_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_PASSTHROUGH", "maybe")
    with pytest.raises(ValueError, match=r"MESH_PASSTHROUGH: Input should be a valid boolean"):
        meshlib.Mesh("checkout")
    monkeypatch.setenv("MESH_PASSTHROUGH", "off")
    mesh = meshlib.Mesh("checkout")
    assert mesh.passthrough is False
    mesh.close()


# -- a dead control service: one WARNING per outage -----------------------------------------


def test_unreachable_control_service_warns_once_and_says_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fleet: Fleet
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib")
    address = dead_address()
    url = f"http://{address}"
    mesh = meshlib.Mesh("checkout", control=url, cache_dir=tmp_path / "cache")
    _, server = fleet.start("checkout")
    control: RunningServer | None = None
    try:
        assert mesh.link is not None
        mesh.register(server.address)  # the registration heartbeat meets the same outage

        def warnings() -> list[logging.LogRecord]:
            return [
                r for r in caplog.records if r.name.startswith("meshlib") and r.levelno >= logging.WARNING
            ]

        # several failed watches and heartbeats: each one is a DEBUG line, not another warning
        def attempts() -> int:
            return sum(url in r.getMessage() for r in caplog.records)

        wait_until(lambda: attempts() >= 6, what="six failed attempts")
        assert len(warnings()) == 1, [r.getMessage() for r in warnings()]
        message = warnings()[0].getMessage()
        assert f"control service at {url} unreachable" in message and "logged once" in message
        # whichever loop meets the outage first says it: the watch (what calls do meanwhile) or
        # the registration heartbeat (when the registry drops the instance)
        assert "wait_for_control" in message or "the registry drops checkout" in message
        retries = [r for r in caplog.records if "still unreachable" in r.getMessage()]
        assert retries and all(r.levelno == logging.DEBUG for r in retries)
        assert not [
            r for r in caplog.records if r.levelno == logging.INFO and "unreachable" in r.getMessage()
        ]

        control = start_control(tmp_path / "control", port=int(address.rsplit(":", 1)[1]))
        assert mesh.wait_for_control(timeout=20) is True
        wait_until(lambda: "reachable again" in caplog.text, timeout=20, what="the back-again line")
        back = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(back) == 1 and back[0].levelno == logging.INFO
        assert mesh.link.outage.down is False
        wait_until(
            lambda: "registered checkout" in caplog.text, timeout=20, what="the registration after the outage"
        )
        assert len(warnings()) == 1, [r.getMessage() for r in warnings()]
    finally:
        mesh.close()
        if control is not None:
            control.kill()


def test_enrolling_against_a_dead_ca_logs_one_line_not_one_per_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from meshlib.security.identity import Enrollment, IdentityError

    caplog.set_level(logging.DEBUG, logger="meshlib")
    enrollment = Enrollment(f"http://{dead_address()}", "checkout", "mjt_x", timeout=0.5)
    with pytest.raises(IdentityError, match="unreachable"):
        asyncio.run(enrollment.obtain(time.monotonic() + 1.5))
    retries = [r.levelno for r in caplog.records if "unreachable (" in r.getMessage()]
    assert len(retries) >= 2  # it did retry (the pauses add up to well under the deadline)
    assert retries[0] == logging.INFO and set(retries[1:]) == {logging.DEBUG}


@pytest.mark.parametrize(
    ("host", "meshed"),
    [
        ("billing", True),
        ("ordrs", True),
        ("orders-v2", True),
        ("api.example.com", False),
        ("orders.", False),
        ("127.0.0.1", False),
        ("::1", False),  # httpx gives an IPv6 literal without its brackets
        ("2130706433", False),  # an IPv4 address written as one number
        ("localhost", False),
        ("", False),
    ],
)
def test_which_hosts_are_mesh_services_without_rules(host: str, meshed: bool) -> None:
    assert single_label(host) is meshed


class RefusingControl:
    """A control service that answers every watch and registration with 401 (a bad token)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        key = f"{scope['method']} {scope['path'].rsplit('/', 1)[0]}"
        self.hits[key] = self.hits.get(key, 0) + 1
        body = b'{"error": "unknown join token"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_a_refusing_control_service_is_one_warning_per_loop_not_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib")
    app = RefusingControl()
    with serve(app) as control:
        mesh = meshlib.Mesh("checkout", control=control.url, cache_dir=tmp_path / "cache")
        try:
            mesh.register("127.0.0.1:9")
            wait_until(
                lambda: app.hits.get("GET /v1", 0) >= 4 and app.hits.get("POST /v1/registry", 0) >= 4,
                what="several refused watches and registrations",
            )
        finally:
            mesh.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("refused the watch" in w and "401" in w for w in warnings)
    assert any("registry at" in w and "refused checkout" in w for w in warnings)
    assert not any("unreachable" in r.getMessage() for r in caplog.records)  # reachable, just refusing
