"""Authorization rules on end users: `from_users` (principal `<iss>/<sub>`, `*`) and `claims`
(a string claim by equality, a list claim by membership, dotted names for nested claims)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from meshlib.rules import AuthorizationDoc, parse_documents
from meshlib.security.authorization import Policy
from meshlib.security.users import User

ISS = "https://auth.example.com"


def policy(*rules: dict[str, Any]) -> Policy:
    doc = parse_documents([{"kind": "Authorization", "service": "orders", "allow": list(rules)}]).documents[0]
    assert isinstance(doc, AuthorizationDoc)
    return Policy(doc)


def user(sub: str = "alice", **claims: Any) -> User:
    return User(ISS, sub, MappingProxyType({"iss": ISS, "sub": sub, **claims}))


def test_from_users_names_principals_and_star_any_verified_user() -> None:
    named = policy({"from_users": [f"{ISS}/alice"]})
    assert named.allows(None, "GET", "/x", user("alice"))
    assert not named.allows(None, "GET", "/x", user("bob"))
    assert not named.allows("checkout", "GET", "/x", None)
    anyone = policy({"from_users": ["*"]})
    assert anyone.allows(None, "GET", "/x", user("bob"))
    assert not anyone.allows(None, "GET", "/x", None)


def test_claims_match_strings_by_equality_and_lists_by_membership() -> None:
    admins = policy({"claims": {"group": ["admins", "ops"]}})
    assert admins.allows(None, "GET", "/x", user(group="ops"))
    assert admins.allows(None, "GET", "/x", user(group=["dev", "admins"]))
    assert not admins.allows(None, "GET", "/x", user(group="dev"))
    assert not admins.allows(None, "GET", "/x", user(group=["dev"]))
    assert not admins.allows(None, "GET", "/x", user())  # no such claim
    assert not admins.allows(None, "GET", "/x", user(group={"admins": True}))


def test_every_claim_named_must_match_and_scalars_compare_as_json_text() -> None:
    both = policy({"claims": {"group": "admins", "email_verified": "true", "level": "3"}})
    assert both.allows(None, "GET", "/x", user(group="admins", email_verified=True, level=3))
    assert not both.allows(None, "GET", "/x", user(group="admins", email_verified=False, level=3))


def test_dotted_names_reach_nested_claims_unless_a_claim_has_the_whole_name() -> None:
    nested = policy({"claims": {"realm.roles": "ops"}})
    assert nested.allows(None, "GET", "/x", user(realm={"roles": ["ops", "dev"]}))
    assert not nested.allows(None, "GET", "/x", user(realm={"roles": ["dev"]}))
    assert not nested.allows(None, "GET", "/x", user(realm="ops"))
    url_claim = policy({"claims": {"https://example.com/roles": "ops"}})
    assert url_claim.allows(None, "GET", "/x", user(**{"https://example.com/roles": ["ops"]}))


def test_users_combine_with_sources_methods_and_paths() -> None:
    p = policy(
        {
            "from_users": [f"{ISS}/alice"],
            "claims": {"group": "admins"},
            "methods": ["POST"],
            "paths": ["/admin/*"],
        },
        {"paths": ["/public/*"]},
    )
    alice = user("alice", group="admins")
    assert p.allows(None, "POST", "/admin/x", alice)
    assert not p.allows(None, "GET", "/admin/x", alice)
    assert not p.allows(None, "POST", "/admin/x", user("alice", group="dev"))
    assert p.allows(None, "GET", "/public/a", None)  # a rule without users needs no token
    assert p.denial(None, "POST", "/admin/x", None) == (
        "RBAC: access denied: a caller without identity may not POST /admin/x; no end-user token"
    )
    assert p.denial("checkout", "POST", "/admin/x", user("bob")) == (
        f"RBAC: access denied: source checkout (user {ISS}/bob) may not POST /admin/x"
    )


def test_a_document_without_user_rules_keeps_its_reasons() -> None:
    p = policy({"from": ["checkout"]})
    assert (
        p.denial(None, "GET", "/x", None) == "RBAC: access denied: a caller without identity may not GET /x"
    )
