"""JWKS parsing: public signature keys only, each with the algorithms its type allows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from meshlib.security.jwk import MAX_KEYS, parse_jwks
from tests.security.issuer import ec_key, ed_key, rsa_key


def text(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


def test_keys_by_kid_with_the_algorithms_of_their_type() -> None:
    r, e, d = rsa_key("r"), ec_key("e"), ed_key("d")
    anonymous = dict(r.public_jwk)
    del anonymous["kid"]
    keys = parse_jwks(text(r.public_jwk, e.public_jwk, d.public_jwk, anonymous))
    assert set(keys.by_kid) == {"r", "e", "d"}
    assert keys.by_kid["r"][0].algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert keys.by_kid["e"][0].algorithms == {"ES256"}
    assert keys.by_kid["d"][0].algorithms == {"EdDSA"}
    assert len(keys.anonymous) == 1
    assert keys.candidates("r", "HS256") == ()
    assert keys.candidates("zz", "RS256") is None  # an unknown kid, told apart from no match


def test_an_alg_member_narrows_the_key_to_it() -> None:
    jwk = {**rsa_key("r").public_jwk, "alg": "PS256"}
    assert parse_jwks(text(jwk)).by_kid["r"][0].algorithms == {"PS256"}
    with pytest.raises(ValueError, match=r"keys\[0\]: alg 'ES256' does not fit a RSA key"):
        parse_jwks(text({**jwk, "alg": "ES256"}))


def private_rsa_jwk() -> dict[str, Any]:
    return json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048)))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "not JSON"),
        ("[]", 'a JWKS is a JSON object with a "keys" list'),
        ('{"keys": []}', "the JWKS has no key"),
        (
            text({"kty": "oct", "k": "c2VjcmV0"}),
            r"keys\[0\]: a symmetric key \(kty oct\) is not a public key",
        ),
        (text(private_rsa_jwk()), r"keys\[0\]: a private key: publish only the public part"),
        (text({"kty": "RSA", "n": "AQAB"}), r"keys\[0\]: not a usable RSA key"),
        (text({**ec_key("e").public_jwk, "crv": "P-192"}), r"keys\[0\]: EC curve 'P-192' is not supported"),
        (text({**rsa_key("r").public_jwk, "use": "enc"}), r"keys\[0\]: use 'enc': only signature keys"),
        (text({"kty": "DSA"}), r"keys\[0\]: key type 'DSA' is not supported"),
        (text(*[{"kty": "oct"}] * (MAX_KEYS + 1)), f"more than {MAX_KEYS} keys"),
    ],
    ids=["json", "shape", "empty", "oct", "private", "broken", "curve", "use", "kty", "count"],
)
def test_what_is_not_a_set_of_public_keys_is_refused_with_the_reason(raw: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_jwks(raw)
