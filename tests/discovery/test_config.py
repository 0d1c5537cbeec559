"""Where a service's endpoints come from, as configuration: the `discovery:` block of an
`Endpoints` document (validated with the rules, options by the provider's `Options` model) and
the process default (`Mesh(discovery=...)`, `MESH_DISCOVERY`)."""

from __future__ import annotations

import pytest

import meshlib
from meshlib.discovery.registry import DiscoveryUnavailable
from meshlib.rules import RulesError, RuleSet, load_yaml, parse_documents
from tests.discovery.fake import FakeProvider

pytestmark = pytest.mark.usefixtures("provider_kinds")


def problems(*docs: dict) -> list[tuple[str, str, str]]:
    with pytest.raises(RulesError) as info:
        parse_documents(docs, source="mesh.yaml")
    return [(p.document, p.field, p.reason) for p in info.value.problems]


def test_a_discovery_block_is_read_with_its_defaults() -> None:
    rules = load_yaml(
        """
kind: Endpoints
service: orders
discovery: {provider: consul, name: orders-svc, options: {tag: blue}}
"""
    )
    doc = rules.endpoints("orders")
    assert doc is not None and doc.discovery is not None
    assert (doc.discovery.provider, doc.discovery.name, doc.discovery.options) == (
        "consul",
        "orders-svc",
        {"tag": "blue"},
    )
    assert doc.listed == ()
    assert parse_documents(rules.to_dicts()) == rules  # round trip, as the control service stores it


def test_an_empty_endpoint_list_still_means_none_on_purpose() -> None:
    rules = parse_documents([{"kind": "Endpoints", "service": "orders", "endpoints": []}])
    assert parse_documents(rules.to_dicts()) == rules


def test_options_are_validated_by_the_provider_options_model() -> None:
    doc = {
        "kind": "Endpoints",
        "service": "orders",
        "discovery": {"provider": "consul", "options": {"tag": 7, "dc": "x"}},
    }
    found = problems(doc)
    label = "Endpoints/orders (document 1 of mesh.yaml)"
    assert (label, "discovery.options.tag", "Input should be a valid string") in found
    assert (label, "discovery.options.dc", "unknown field; allowed: tag, passing_only, datacenter") in found


@pytest.mark.parametrize(
    ("provider", "options", "field", "number"),
    [
        ("fake", {"port": True, "tag": "blue"}, "port", 8080),
        ("dns", {"port": True}, "port", 8080),  # lax pydantic made it port 1
        ("dns", {"port": False, "min_refresh": "1s"}, "port", 53),
        ("kubernetes", {"watch_timeout": True}, "watch_timeout", 60),
    ],
)
def test_booleans_are_not_numbers_in_options_either(
    provider: str, options: dict, field: str, number: int
) -> None:
    doc = {"kind": "Endpoints", "service": "orders", "discovery": {"provider": provider, "options": options}}
    value = str(options[field]).lower()
    assert problems(doc) == [
        (
            "Endpoints/orders (document 1 of mesh.yaml)",
            f"discovery.options.{field}",
            f"expected a number, got {value}",
        )
    ]
    parse_documents([{**doc, "discovery": {"provider": provider, "options": {**options, field: number}}}])


def test_an_unknown_provider_names_the_known_ones() -> None:
    [(document, field, reason)] = problems(
        {"kind": "Endpoints", "service": "orders", "discovery": {"provider": "etcd"}}
    )
    assert (document, field) == ("Endpoints/orders (document 1 of mesh.yaml)", "discovery.provider")
    assert reason.startswith("unknown discovery provider 'etcd'; one of: ") and "consul" in reason


def test_a_provider_whose_module_is_missing_is_refused() -> None:
    [(_, field, reason)] = problems(
        {"kind": "Endpoints", "service": "orders", "discovery": {"provider": "gone"}}
    )
    assert field == "discovery.provider"
    assert "not part of this meshlib" in reason


def test_an_endpoints_document_needs_a_list_or_a_block() -> None:
    [(_, field, reason)] = problems({"kind": "Endpoints", "service": "orders"})
    assert (field, reason) == ("endpoints", "required field is missing (or a discovery: block)")


def test_a_block_holds_no_address_or_credentials() -> None:
    found = problems(
        {"kind": "Endpoints", "service": "orders", "discovery": {"provider": "consul", "token": "s3cret"}}
    )
    assert [(f, r.split(";")[0]) for _, f, r in found] == [("discovery.token", "unknown field")]


def test_mesh_discovery_sets_the_process_default_and_never_shows_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_DISCOVERY", "fake://agent.local:8500?token=s3cret")
    FakeProvider.made.clear()
    mesh = meshlib.Mesh("checkout")
    try:
        assert mesh.discovery.default == "fake"
        assert [p.url for p in FakeProvider.made] == ["fake://agent.local:8500?token=s3cret"]
        assert mesh.discovery.where("fake") == "fake://agent.local:8500"
        assert "s3cret" not in repr(mesh.settings)
    finally:
        FakeProvider.made.clear()
        mesh.close()


def test_an_explicit_argument_wins_over_mesh_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_DISCOVERY", "consul://")
    with meshlib.Mesh("checkout", discovery="fake://") as mesh:
        assert mesh.discovery.default == "fake"


def test_one_provider_per_kind() -> None:
    with pytest.raises(ValueError, match="one provider per kind"):
        meshlib.Mesh("checkout", discovery="fake://a, fake://b")


def test_a_missing_client_library_names_the_extra_to_install() -> None:
    with pytest.raises(DiscoveryUnavailable, match=r"pip install meshlib\[consul\]"):
        meshlib.Mesh("checkout", discovery="consul://127.0.0.1:8500")


def test_an_unknown_scheme_is_an_error_at_once() -> None:
    with pytest.raises(ValueError, match="unknown discovery provider 'etcd'"):
        meshlib.Mesh("checkout", discovery="etcd://127.0.0.1:2379")


def test_without_discovery_nothing_is_watched_or_started() -> None:
    mesh = meshlib.Mesh("checkout")
    try:
        mesh.apply_rules(RuleSet(), "empty")
        assert mesh.discovery.default is None and mesh.discovery.watches() == {}
        assert mesh._runtime is None  # no thread for a process that uses no discovery
    finally:
        mesh.close()
