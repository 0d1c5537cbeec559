"""JWT verification of a compiled RequestAuthentication document (inline JWKS: no network),
on tokens signed by keys made here: what verifies, and the reason of everything that does not."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from meshlib.rules import parse_documents
from meshlib.security.authentication import Authenticator, Failure, Verified
from meshlib.security.jwk import parse_jwks
from meshlib.telemetry.tracing import WSGI_HEADERS
from tests.security.issuer import (
    ISSUER,
    SigningKey,
    ec_key,
    ed_key,
    jwks,
    request_authentication,
    rsa_key,
    token,
)

RSA = rsa_key("r1")
EC = ec_key("e1")
ED = ed_key("d1")
PS = rsa_key("p1", "PS256")
OTHER = rsa_key("r1")  # same kid, another key: a forgery


def authenticator(*keys: SigningKey, **rule: Any) -> Authenticator:
    rule.setdefault("jwks", jwks(*keys))
    (doc,) = parse_documents([request_authentication(**rule)]).documents
    return Authenticator(doc)  # type: ignore[arg-type]


def check(auth: Authenticator, value: str | None, header: str = "HTTP_AUTHORIZATION") -> Any:
    environ = {header: value} if value is not None else {}
    return auth.authenticate(WSGI_HEADERS, environ)


def bearer(tok: str) -> str:
    return f"Bearer {tok}"


@pytest.mark.parametrize("key", [RSA, EC, ED, PS], ids=["RS256", "ES256", "EdDSA", "PS256"])
def test_a_valid_token_names_its_user_with_all_its_claims(key: SigningKey) -> None:
    auth = authenticator(RSA, EC, ED, PS)
    outcome = check(auth, bearer(token(key, group=["admins"], realm={"roles": ["ops"]})))
    assert isinstance(outcome, Verified)
    user = outcome.user
    assert (user.issuer, user.subject, user.principal) == (ISSUER, "alice", f"{ISSUER}/alice")
    assert user.claims["group"] == ["admins"] and user.claims["realm"] == {"roles": ["ops"]}
    assert outcome.drop == ()


def test_no_token_passes_without_a_user() -> None:
    auth = authenticator(RSA)
    assert check(auth, None) is None
    assert check(auth, "Basic YWxpY2U6c2VjcmV0") is None  # another scheme: not a bearer token
    assert check(auth, "Bearer ") is None


def failure(auth: Authenticator, tok: str) -> str:
    outcome = check(auth, bearer(tok))
    assert isinstance(outcome, Failure), outcome
    assert tok not in outcome.reason
    return outcome.reason


def test_each_invalid_token_is_refused_with_its_reason() -> None:
    auth = authenticator(RSA, EC)
    now = int(time.time())
    assert failure(auth, token(RSA, exp=now - 120)) == "token has expired"
    assert failure(auth, token(RSA, nbf=now + 600)) == "token is not valid yet"
    assert failure(auth, token(RSA, iat=now + 600)) == "token is not valid yet"
    assert failure(auth, token(RSA, issuer="https://evil.example.com")) == "token issuer is not accepted"
    assert failure(auth, token(RSA, aud="billing")) == "token audience is not accepted"
    assert failure(auth, token(RSA, aud=None)) == "token lacks the aud claim"  # audiences are set
    assert failure(auth, token(RSA, kid="r9")) == "token key id is unknown"
    assert failure(auth, token(OTHER)) == "token signature is invalid"
    assert failure(auth, "not.a.token") == "malformed token"
    assert failure(auth, "x" * 20_000) == "token is too long"


def test_json_nested_past_the_parser_is_a_malformed_token() -> None:
    """Well under the length cap, a header or payload of nested JSON makes the parser give up
    (RecursionError): refused as any other malformed token, not raised into the server."""

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    auth = authenticator(RSA)
    deep_header = part(b"[" * 3000) + "." + part(b"{}") + ".sig"
    deep_payload = part(b'{"alg": "RS256"}') + "." + part(b'{"a":' * 1500) + ".sig"
    for tok in (deep_header, deep_payload):
        assert len(tok) < 16_000
        assert failure(auth, tok) == "malformed token"


def test_the_leeway_forgives_a_little_clock_skew_only() -> None:
    auth = authenticator(RSA)
    now = int(time.time())
    assert isinstance(check(auth, bearer(token(RSA, exp=now - 5))), Verified)
    assert isinstance(check(auth, bearer(token(RSA, nbf=now + 5))), Verified)


def test_alg_none_is_refused() -> None:
    auth = authenticator(RSA)
    unsigned = jwt.encode({"iss": ISSUER, "sub": "mallory", "aud": "orders"}, None, algorithm="none")
    assert failure(auth, unsigned) == "token algorithm is not allowed for the issuer's keys"
    forged = unsigned.split(".")
    header = {"alg": "none", "kid": "r1"}
    forged[0] = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    assert failure(auth, ".".join(forged)) == "token algorithm is not allowed for the issuer's keys"


def test_hs256_signed_with_the_public_key_as_secret_is_refused() -> None:
    auth = authenticator(RSA)
    pem = RSA.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "kid": "r1", "typ": "JWT"}).encode())
    now = int(time.time())
    body = b64(json.dumps({"iss": ISSUER, "sub": "mallory", "aud": "orders", "exp": now + 60}).encode())
    sig = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert failure(auth, f"{head}.{body}.{sig}") == "token algorithm is not allowed for the issuer's keys"


def test_a_key_verifies_only_the_algorithms_of_its_type() -> None:
    auth = authenticator(EC)
    rsa_signed_with_ec_kid = token(RSA, kid="e1")
    assert failure(auth, rsa_signed_with_ec_kid) == "token algorithm is not allowed for the issuer's keys"


def test_a_token_without_kid_is_tried_on_every_key_of_its_algorithm() -> None:
    auth = authenticator(OTHER, RSA)
    assert isinstance(check(auth, bearer(token(RSA, kid=None))), Verified)
    assert failure(auth, token(rsa_key("x"), kid=None)) == "token signature is invalid"


def test_tokens_are_read_from_the_headers_the_rule_names() -> None:
    auth = authenticator(RSA, from_headers=[{"name": "X-Jwt-Assertion"}], forward=False)
    tok = token(RSA)
    assert check(auth, bearer(tok)) is None  # authorization is not where this issuer's tokens go
    outcome = check(auth, tok, header="HTTP_X_JWT_ASSERTION")
    assert isinstance(outcome, Verified)
    assert outcome.drop == ("x-jwt-assertion",)


def test_the_bearer_prefix_is_case_insensitive() -> None:
    auth = authenticator(RSA)
    assert isinstance(check(auth, f"bearer {token(RSA)}"), Verified)


def test_several_issuers_each_verify_with_their_own_keys() -> None:
    doc = {
        "kind": "RequestAuthentication",
        "service": "orders",
        "jwt": [
            {"issuer": ISSUER, "jwks": jwks(RSA)},
            {"issuer": "https://partner.example.com", "jwks": jwks(EC), "audiences": ["orders"]},
        ],
    }
    auth = Authenticator(parse_documents([doc]).documents[0])  # type: ignore[arg-type]
    assert isinstance(check(auth, bearer(token(RSA, aud="anything"))), Verified)  # no audiences: any
    partner = token(EC, issuer="https://partner.example.com")
    assert isinstance(check(auth, bearer(partner)), Verified)
    wrong_keys = token(RSA, issuer="https://partner.example.com", kid="e1")
    assert failure(auth, wrong_keys) == "token algorithm is not allowed for the issuer's keys"


def test_a_verified_token_is_remembered_until_its_expiry_or_a_new_key_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meshlib.security import authentication

    auth = authenticator(RSA)
    verified: list[str] = []
    real = Authenticator._verify

    def counting(self: Authenticator, *args: Any) -> Any:
        verified.append("x")
        return real(self, *args)

    monkeypatch.setattr(Authenticator, "_verify", counting)
    now = time.time()
    tok = token(RSA, exp=int(now) + 100)
    assert isinstance(check(auth, bearer(tok)), Verified)
    assert isinstance(check(auth, bearer(tok)), Verified)
    assert len(verified) == 1  # the second time from memory
    monkeypatch.setattr(authentication.time, "time", lambda: now + 100 + authentication.LEEWAY + 1)
    check(auth, bearer(tok))
    assert len(verified) == 2  # past its exp: verified afresh (PyJWT then judges the real clock)
    monkeypatch.undo()
    issuer = next(iter(auth.issuers.values()))
    issuer.static = parse_jwks(json.dumps(jwks(RSA)))  # a new key set, as a refetch makes
    monkeypatch.setattr(Authenticator, "_verify", counting)
    assert isinstance(check(auth, bearer(tok)), Verified)
    assert len(verified) == 3
