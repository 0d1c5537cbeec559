"""End users at the edge: a RequestAuthentication and an Authorization document under the
gateway's own name are enforced by the gateway, before any service is called."""

from __future__ import annotations

import time

from tests.gateway.conftest import Edge
from tests.security.issuer import ISSUER, jwks, request_authentication, rsa_key, token

KEY, OTHER = rsa_key("k1"), rsa_key("k1")  # OTHER: same key id, another key (a forged signature)


def users_only(docs: list[dict]) -> None:
    docs.append(request_authentication("edge", jwks=jwks(KEY), audiences=["shop"]))
    docs.append(
        {
            "kind": "Authorization",
            "service": "edge",
            "allow": [{"from_users": [f"{ISSUER}/alice"], "paths": ["/orders/*"]}],
        }
    )


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def test_the_gateway_verifies_end_users_before_calling_a_service(edge: Edge) -> None:
    edge.change(users_only, lambda r: r.request_authentication("edge") is not None, "end-user rules")
    served = edge.v1.hits + edge.v2.hits
    now = int(time.time())
    alice = token(KEY, kid="k1", sub="alice", aud="shop", exp=now + 60)

    ok = edge.get("/orders/1", headers=bearer(alice))
    assert ok.status_code == 200, ok.text
    assert ok.json()["headers"]["authorization"] == f"Bearer {alice}"  # forwarded inward by default

    refused = {
        "expired": token(KEY, kid="k1", sub="alice", aud="shop", exp=now - 120),
        "wrong audience": token(KEY, kid="k1", sub="alice", aud="billing", exp=now + 60),
        "wrong issuer": token(KEY, kid="k1", sub="alice", aud="shop", exp=now + 60, issuer="https://evil"),
        "bad signature": token(OTHER, kid="k1", sub="alice", aud="shop", exp=now + 60),
        "unknown key": token(KEY, kid="k9", sub="alice", aud="shop", exp=now + 60),
    }
    for what, value in refused.items():
        r = edge.get("/orders/1", headers=bearer(value))
        assert r.status_code == 401, (what, r.status_code, r.text)
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"'), what

    assert edge.get("/orders/1").status_code == 403  # no token: no user, and the rule wants alice
    bob = token(KEY, kid="k1", sub="bob", aud="shop", exp=now + 60)
    assert edge.get("/orders/1", headers=bearer(bob)).status_code == 403  # a user, not the one allowed
    assert edge.v1.hits + edge.v2.hits == served + 1  # only alice's request reached a service
