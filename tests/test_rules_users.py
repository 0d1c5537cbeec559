"""The rules of end users: RequestAuthentication documents, and `from_users`/`claims` in
Authorization rules, validated with the document, the field and the reason."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.rules import RequestAuthenticationDoc, RulesError, parse_documents
from tests.security.issuer import ISSUER, jwks, rsa_key

KEY = rsa_key("r1")


def problems(*docs: dict[str, Any]) -> list[tuple[str, str, str]]:
    with pytest.raises(RulesError) as exc:
        parse_documents(list(docs), source="x")
    return [(p.document, p.field, p.reason) for p in exc.value.problems]


def auth(**rule: Any) -> dict[str, Any]:
    return {"kind": "RequestAuthentication", "service": "orders", "jwt": [{"issuer": ISSUER, **rule}]}


def test_a_document_with_inline_keys_written_as_yaml_or_json() -> None:
    as_mapping = parse_documents([auth(jwks=jwks(KEY), audiences="orders")])
    doc = as_mapping.request_authentication("orders")
    assert isinstance(doc, RequestAuthenticationDoc)
    rule = doc.jwt[0]
    assert rule.audiences == ("orders",)
    assert [(h.name, h.prefix) for h in rule.from_headers] == [("authorization", "Bearer ")]
    assert rule.forward is True
    import json

    as_text = parse_documents([auth(jwks=json.dumps(jwks(KEY)))])
    kept = as_text.request_authentication("orders").jwt[0].jwks  # type: ignore[union-attr]
    assert kept is not None and rule.jwks is not None
    assert json.loads(kept) == json.loads(rule.jwks) == jwks(KEY)
    # the dump parses back to the same set
    assert parse_documents(as_mapping.to_dicts()) == as_mapping


def test_jwks_uri_is_https_but_on_loopback() -> None:
    for uri in ("https://auth.example.com/jwks.json", "http://127.0.0.1:8080/jwks", "http://localhost/j"):
        assert parse_documents([auth(jwks_uri=uri)]).request_authentication("orders") is not None
    where = "RequestAuthentication/orders (document 1 of x)"
    assert problems(auth(jwks_uri="http://auth.example.com/jwks.json")) == [
        (
            where,
            "jwt[0].jwks_uri",
            "must be https (plain http only to a loopback address): the keys decide who is who",
        )
    ]
    assert problems(auth(jwks_uri="ftp://x/y")) == [(where, "jwt[0].jwks_uri", "write an https:// URL")]


def test_keys_given_once_and_only_public_ones() -> None:
    where = "RequestAuthentication/orders (document 1 of x)"
    both = "give the keys once: jwks (inline) or jwks_uri, not both and not neither"
    assert problems(auth()) == [(where, "jwt[0]", both)]
    assert problems(auth(jwks=jwks(KEY), jwks_uri="https://a/j")) == [(where, "jwt[0]", both)]
    assert problems(auth(jwks="{bad")) == [
        (
            where,
            "jwt[0].jwks",
            "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        )
    ]
    assert problems(auth(jwks={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})) == [
        (where, "jwt[0].jwks", "keys[0]: a symmetric key (kty oct) is not a public key")
    ]


def test_bounds_and_shapes() -> None:
    where = "RequestAuthentication/orders (document 1 of x)"
    ok = {"issuer": ISSUER, "jwks": jwks(KEY)}
    many = {"kind": "RequestAuthentication", "service": "orders", "jwt": [ok, ok]}
    assert problems(many) == [(where, "jwt", f"issuer {ISSUER!r} has more than one rule")]
    found = problems(
        auth(jwks=jwks(KEY), audiences=[f"a{i}" for i in range(65)], from_headers=[{"name": "bad header"}])
    )
    assert [(f, r.split(" ")[0]) for _, f, r in found] == [
        ("jwt[0].audiences", "Tuple"),
        ("jwt[0].from_headers[0].name", "invalid"),
    ]
    empty = {"kind": "RequestAuthentication", "service": "orders", "jwt": []}
    assert problems(empty) == [(where, "jwt", "needs at least 1 entry")]


def allow(**rule: Any) -> dict[str, Any]:
    return {"kind": "Authorization", "service": "orders", "allow": [rule]}


def test_allow_rules_name_users_and_claims() -> None:
    rs = parse_documents(
        [allow(from_users=f"{ISSUER}/alice", claims={"group": "admins", "scope": ["a", "b"]})]
    )
    rule = rs.authorization("orders").allow[0]  # type: ignore[union-attr]
    assert rule.from_users == (f"{ISSUER}/alice",)
    assert rule.claims == {"group": ("admins",), "scope": ("a", "b")}
    assert rule.needs_user


def test_users_and_claims_are_checked() -> None:
    where = "Authorization/orders (document 1 of x)"
    assert problems(allow(from_users=["alice"])) == [
        (
            where,
            "allow[0].from_users[0]",
            "'alice' is not a principal: write <issuer>/<subject>, or * for any user",
        )
    ]
    found = problems(allow(claims={"group": []}))
    assert [(f, r) for _, f, r in found] == [("allow[0].claims.group", "needs at least 1 entry")]
    found = problems(allow(claims={f"c{i}": "x" for i in range(17)}))
    assert [f for _, f, _ in found] == ["allow[0].claims"]
    found = problems(allow(claims={"group": {"nested": "x"}}))
    assert [f for _, f, _ in found] == ["allow[0].claims.group"]
