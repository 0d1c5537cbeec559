"""`Mesh(...)` and `@mesh.call(...)` refuse wrong arguments at once, with an error that names the
argument and says what a valid value is, instead of failing later in a request, a header or a
background task; a service name is checked by the rules' own rule."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

import meshlib
from meshlib.names import check_service_name
from meshlib.rules import ServiceName
from tests.conftest import write_rules
from tests.discovery.fake import FakeProvider

BAD_NAMES: list[tuple[object, type[Exception]]] = [
    (123, TypeError),
    (b"orders", TypeError),
    ("Bad Name!\r\nx-evil: 1", ValueError),  # would reach the x-mesh-source header
    ("ünï", ValueError),
    ("Orders", ValueError),
    ("http://orders", ValueError),
    ("orders/x", ValueError),
    ("orders:8080", ValueError),
    ("-orders", ValueError),
    ("orders.", ValueError),
    ("orders\n", ValueError),
    ("a" * 254, ValueError),
]
GOOD_NAMES = ["checkout", "a", "orders-v2", "orders.shop", "9lives", "a" * 253]


@pytest.mark.parametrize(("name", "error"), BAD_NAMES, ids=repr)
def test_mesh_refuses_a_service_name_the_rules_would_refuse(name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"Mesh\(service=\.\.\.\)"):
        meshlib.Mesh(name)  # type: ignore[arg-type]


def test_an_empty_service_name_is_refused_and_none_is_a_mesh_without_one() -> None:
    with pytest.raises(ValueError, match=r"Mesh\(service=''\): leave the service out \(None\)"):
        meshlib.Mesh("")
    for mesh in (meshlib.Mesh(), meshlib.Mesh(None)):
        assert mesh.service is None
        mesh.close()


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_mesh_takes_every_name_the_rules_take(name: str) -> None:
    with meshlib.Mesh(name) as mesh:
        assert mesh.service == name


def test_the_mesh_and_the_rules_agree_on_service_names() -> None:
    """One rule: the Mesh checks it without pydantic, the rules models with it."""
    rules = TypeAdapter(ServiceName)
    names = [n for n, _ in BAD_NAMES if isinstance(n, str)] + GOOD_NAMES + ["", "a-", "a_b", "a..b", "A"]
    for name in names:
        try:
            rules.validate_python(name)
            by_rules = True
        except ValidationError:
            by_rules = False
        try:
            check_service_name(name, "service")
            by_mesh = True
        except ValueError:
            by_mesh = False
        assert by_mesh == by_rules, name


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        ({1: 2}, TypeError, "keys and values must be str"),
        ({"version": None}, TypeError, "keys and values must be str"),
        ([("version", "v1")], TypeError, "must be a mapping of str to str"),
        ({"bad key": "v1"}, ValueError, "label key 'bad key'"),
        ({"version": "v1\r\nx"}, ValueError, "must be printable"),
        ({f"k{i}": "v" for i in range(33)}, ValueError, "at most 32 labels"),
    ],
    ids=["int", "none-value", "list", "space-in-key", "newline-in-value", "too-many"],
)
def test_mesh_refuses_labels_the_registry_would_refuse(
    labels: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=rf"Mesh\(labels=\.\.\.\).*{match}"):
        meshlib.Mesh("checkout", labels=labels)  # type: ignore[arg-type]


def test_mesh_keeps_valid_labels() -> None:
    labels = {"version": "v1", "zone": "a", "example.com/team": "shop floor"}
    with meshlib.Mesh("checkout", labels=labels) as mesh:
        assert mesh.labels == labels


@pytest.mark.parametrize(
    ("discovery", "match"),
    [
        (123, r"Mesh\(discovery=\.\.\.\) must be a provider URL .* not int"),
        (b"dns://", r"Mesh\(discovery=\.\.\.\) must be a provider URL .* not bytes"),
        (["dns://", 123], r"Mesh\(discovery=\[\.\.\.\]\): each item .* not int"),
    ],
    ids=["int", "bytes", "list-with-int"],
)
def test_mesh_refuses_a_discovery_that_is_no_provider(discovery: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        meshlib.Mesh("checkout", discovery=discovery)  # type: ignore[arg-type]


def test_mesh_takes_providers_and_their_urls() -> None:
    fake = FakeProvider()
    for discovery in (fake, [fake]):
        with meshlib.Mesh("checkout", discovery=discovery) as mesh:  # type: ignore[arg-type]
            assert mesh.discovery.default == "fake"


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (0.001, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("a", TypeError),
        ("0.5", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
    ids=repr,
)
def test_mesh_refuses_a_watch_interval_that_would_spin_or_stop_the_watcher(
    tmp_path: Path, interval: object, error: type[Exception]
) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", [{"kind": "Endpoints", "service": "orders", "endpoints": []}])
    with pytest.raises(error, match=r"Mesh\(watch_interval=\.\.\.\) must be a number of seconds"):
        meshlib.Mesh("checkout", config=cfg, watch_interval=interval)  # type: ignore[arg-type]


def test_mesh_takes_a_watch_interval_in_whole_or_fractional_seconds(tmp_path: Path) -> None:
    cfg = write_rules(tmp_path / "mesh.yaml", [{"kind": "Endpoints", "service": "orders", "endpoints": []}])
    for interval in (1, 0.01, 0.25):
        with meshlib.Mesh("checkout", config=cfg, watch_interval=interval) as mesh:
            assert mesh.snapshot.rules.endpoints("orders") is not None


@pytest.mark.parametrize(("name", "error"), [(None, TypeError), ("", ValueError), *BAD_NAMES], ids=repr)
def test_call_refuses_a_service_name_when_decorating(name: object, error: type[Exception]) -> None:
    with meshlib.Mesh("checkout") as mesh:
        with pytest.raises(error, match=r"mesh\.call\(service\)"):

            @mesh.call(name)  # type: ignore[arg-type]
            def get(client: httpx.Client) -> httpx.Response:
                return client.get("/")

        assert not mesh.discovery.watches()  # nothing was asked for the bad name


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_call_takes_every_name_the_rules_take(name: str) -> None:
    with meshlib.Mesh("checkout") as mesh:

        @mesh.call(name)
        def base(client: httpx.Client) -> str:
            return str(client.base_url)

        assert base() == f"http://{name}"
