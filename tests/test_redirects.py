"""`meshlib.redirects.location` (pure), and what the rules refuse in a redirect."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.redirects import location
from meshlib.rules import RedirectSpec, RulesError, RuleSet


def where(spec: dict[str, Any], path: str = "/v1/items", query: str = "", prefix: str | None = "/v1/") -> str:
    return location(
        RedirectSpec.model_validate(spec),
        scheme="http",
        authority="orders",
        path=path,
        query=query,
        matched_prefix=prefix,
    )


def test_prefix_replaces_the_matched_prefix_and_keeps_the_query() -> None:
    assert where({"prefix": "/v2/"}, query="id=7") == "http://orders/v2/items?id=7"
    assert where({"prefix": "/v2"}, path="/v1/items", prefix="/v1") == "http://orders/v2/items"
    assert where({"prefix": "/"}, path="/v1/", prefix="/v1/") == "http://orders/"
    assert where({"prefix": "/new/"}, path="/v1", prefix="/v1") == "http://orders/new/"


def test_uri_replaces_the_whole_path_and_its_own_query_wins() -> None:
    assert where({"uri": "/moved"}, query="a=1") == "http://orders/moved?a=1"
    assert where({"uri": "/moved?b=2"}, query="a=1") == "http://orders/moved?b=2"


def test_authority_and_scheme_replace_theirs_alone() -> None:
    assert where({"authority": "shop.example.com"}) == "http://shop.example.com/v1/items"
    assert where({"scheme": "https"}, query="q") == "https://orders/v1/items?q"
    spec = {"authority": "[::1]:8443", "scheme": "https", "uri": "/"}
    assert where(spec) == "https://[::1]:8443/"


def test_prefix_without_the_matched_prefix_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="matched path prefix"):
        where({"prefix": "/v2/"}, prefix=None)


def test_a_valid_rule_round_trips() -> None:
    doc = {
        "kind": "Route",
        "service": "orders",
        "routes": [{"match": {"path": {"prefix": "/v1/"}}, "redirect": {"prefix": "/v2/", "code": 308}}],
    }
    rs = RuleSet([doc])
    assert rs.to_dicts() == [doc]
    assert RuleSet(rs.to_dicts()) == rs


@pytest.mark.parametrize(
    ("rule", "field", "reason"),
    [
        ({"redirect": {"uri": "/a", "prefix": "/b"}, "match": {"path": {"prefix": "/"}}},
         "routes[0].redirect", "set uri or prefix, not both"),
        ({"redirect": {"code": 301}}, "routes[0].redirect",
         "set at least one of uri, prefix, authority, scheme (else it redirects to itself)"),
        ({"redirect": {"prefix": "/v2/"}, "match": {"path": {"exact": "/v1"}}}, "routes[0].redirect",
         "redirect.prefix needs a prefix path match (match: {path: {prefix: ...}})"),
        ({"redirect": {"uri": "/a"}, "timeout": "1s", "retries": {"attempts": 2}}, "routes[0].redirect",
         "a rule with redirect calls no service, so it takes no timeout, retries; put those on another rule"),
        ({"redirect": {"uri": "/a"}, "to": [{"subset": "v1"}]}, "routes[0].redirect",
         "a rule with redirect calls no service, so it takes no to; put those on another rule"),
        ({"redirect": {"uri": "/a", "code": 300}}, "routes[0].redirect.code",
         "Input should be 301, 302, 303, 307 or 308"),
        ({"redirect": {"uri": "a"}}, "routes[0].redirect.uri", "'a' must start with '/'"),
        ({"redirect": {"uri": "/a b"}}, "routes[0].redirect.uri",
         "'/a b' must be an encoded URL path (no spaces, '#' or non-ASCII)"),
        ({"redirect": {"scheme": "ftp"}}, "routes[0].redirect.scheme", "Input should be 'http' or 'https'"),
        ({"redirect": {"authority": "bad host"}}, "routes[0].redirect.authority",
         "address 'bad host': 'bad host' is not a valid host name"),
        ({"redirect": {"authority": "h.example:99999"}}, "routes[0].redirect.authority",
         "address 'h.example:99999': port must be a number from 1 to 65535"),
    ],
)  # fmt: skip
def test_refusals_name_the_document_the_field_and_the_reason(rule: dict, field: str, reason: str) -> None:
    with pytest.raises(RulesError) as exc:
        RuleSet([{"kind": "Route", "service": "orders", "routes": [rule]}])
    assert [(p.document, p.field, p.reason) for p in exc.value.problems] == [
        ("Route/orders (document 1)", field, reason)
    ]
