"""External documents: defaults, and refusals that name the document, the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.rules import ExternalDoc, RulesError, RuleSet
from meshlib.snapshot import Snapshot


def test_defaults_declare_http_and_https_and_round_trip() -> None:
    rules = RuleSet([{"kind": "External", "service": "api.example.com"}])
    doc = rules.external("api.example.com")
    assert isinstance(doc, ExternalDoc)
    assert [(p.port, p.tls, p.upstream) for p in doc.ports] == [(80, None, 80), (443, None, 443)]
    assert doc.endpoints is None
    assert RuleSet(rules.to_dicts()) == rules


def test_the_snapshot_plans_each_port_with_its_upstream_addresses() -> None:
    doc = {
        "kind": "External",
        "service": "pay.example",
        "ports": [{"port": 80, "tls": {"port": 8443, "sni": "api.pay.example"}}, {"port": 8080}],
        "endpoints": ["10.0.0.1", "10.0.0.2:9000", "[::1]"],
    }
    snapshot = Snapshot(
        RuleSet([doc, {"kind": "Route", "service": "pay.example", "routes": [{"timeout": "1s"}]}])
    )
    assert "pay.example" not in snapshot.plans  # not a mesh service: a mesh call never finds it
    tls, plain = snapshot.externals["pay.example"][80], snapshot.externals["pay.example"][8080]
    assert [e.address for e in tls.endpoints] == ["10.0.0.1:8443", "10.0.0.2:9000", "[::1]:8443"]
    assert [e.address for e in plain.endpoints] == ["10.0.0.1:8080", "10.0.0.2:9000", "[::1]:8080"]
    assert tls.external is not None and tls.external.origination is not None
    assert (tls.external.upstream, tls.external.origination.sni) == (8443, "api.pay.example")
    assert plain.external is not None and plain.external.origination is None
    assert tls.routes.routes[0].timeout == 1.0  # the host's Route applies


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"ports": []}, "ports", "needs at least 1 entry"),
        ({"ports": [{"port": 80}, {"port": 80}]}, "ports", "port 80 is declared twice"),
        ({"ports": [{"port": 0}]}, "ports[0].port", "Input should be greater than or equal to 1"),
        ({"ports": [{"port": 80, "tls": {"origination": False}}]}, "ports[0].tls.origination",
         "tls is for origination only; leave tls out for a port the app calls over https itself"),
        ({"ports": [{"port": 80, "tls": {"sni": "not a name"}}]}, "ports[0].tls.sni",
         "'not a name' is not a host name"),
        ({"ports": [{"port": 80, "tls": {"ca": "line one\nline two"}}]}, "ports[0].tls.ca",
         "ca is a PEM file's path, or PEM text starting with -----BEGIN CERTIFICATE-----"),
        ({"ports": [{"port": 80, "tls": {"port": 70000}}]}, "ports[0].tls.port",
         "Input should be less than or equal to 65535"),
        ({"endpoints": []}, "endpoints", "needs at least 1 entry"),
        ({"endpoints": ["a.example", "a.example"]}, "endpoints", "endpoint 'a.example' is listed twice"),
        ({"endpoints": ["10.0.0.1:99999"]}, "endpoints[0]",
         "address '10.0.0.1:99999': port must be a number from 1 to 65535"),
        ({"service": "Payments.Example"}, "service",
         "invalid service name 'Payments.Example': use lowercase letters, digits, '-' and '.', "
         "starting and ending with a letter or digit"),
        ({"resolution": "DNS"}, "resolution", "unknown field; allowed: kind, service, ports, endpoints"),
    ],
)  # fmt: skip
def test_refusals_name_the_document_the_field_and_the_reason(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    doc = {"kind": "External", "service": "pay.example", **fields}
    with pytest.raises(RulesError) as exc:
        RuleSet([doc])
    [problem] = exc.value.problems
    assert (problem.field, problem.reason) == (field, reason)
    assert problem.document == f"External/{doc['service']} (document 1)"


def test_a_route_of_an_external_may_not_mirror() -> None:
    external = {"kind": "External", "service": "pay.example"}
    route = {
        "kind": "Route",
        "service": "pay.example",
        "routes": [{"timeout": "1s"}, {"mirror": {"percent": 5}}],
    }
    with pytest.raises(RulesError) as exc:
        RuleSet([external, route])
    [problem] = exc.value.problems
    assert (problem.document, problem.field) == ("Route/pay.example (document 2)", "routes[1].mirror")
    assert problem.reason == (
        "pay.example is an External host: copies of its calls are not sent outside the mesh (remove mirror)"
    )
