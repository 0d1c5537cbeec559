"""JSON Web Key Sets: the public keys an issuer signs its tokens with, read once into key objects.

Only public signature keys are accepted (RSA, EC, OKP); each key gets the algorithms its type
allows (its own `alg` if it names one). Verification then asks for exactly those algorithms,
so a token cannot pick `none`, nor HMAC with a public key as the secret: there is no
symmetric key here to pick. PyJWT is imported on first use: a process that never verifies a
token never loads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_KEYS = 64
_RSA_ALGS = frozenset(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"))
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_OKP_CURVES = frozenset(("Ed25519", "Ed448"))
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key: its id (None if the JWKS gave none), the algorithms it may verify,
    and the key object PyJWT takes."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys of one JWKS, by id; `anonymous` are those without a `kid`."""

    by_kid: Mapping[str, tuple[Key, ...]]
    anonymous: tuple[Key, ...]

    def candidates(self, kid: str | None, alg: str) -> tuple[Key, ...] | None:
        """The keys that may verify a token with this `kid` and `alg`; None: the kid is unknown."""
        if kid is not None and kid in self.by_kid:
            keys = self.by_kid[kid]
        elif kid is not None and self.by_kid:
            return None
        else:  # no kid in the token, or none in the set: every key is a candidate (as Istio)
            keys = self.anonymous + tuple(k for ks in self.by_kid.values() for k in ks)
        return tuple(k for k in keys if alg in k.algorithms)


def parse_jwks(text: str | bytes) -> KeySet:
    """The key set of a JWKS document; ValueError with the reason if it is not one."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError('a JWKS is a JSON object with a "keys" list')
    raw_keys = data["keys"]
    if not raw_keys:
        raise ValueError("the JWKS has no key")
    if len(raw_keys) > MAX_KEYS:
        raise ValueError(f"more than {MAX_KEYS} keys")
    by_kid: dict[str, list[Key]] = {}
    anonymous: list[Key] = []
    for i, raw in enumerate(raw_keys):
        try:
            key = _key(raw)
        except ValueError as exc:
            raise ValueError(f"keys[{i}]: {exc}") from None
        if key.kid is None:
            anonymous.append(key)
        else:
            by_kid.setdefault(key.kid, []).append(key)
    return KeySet({k: tuple(v) for k, v in by_kid.items()}, tuple(anonymous))


def _key(raw: object) -> Key:
    if not isinstance(raw, Mapping):
        raise ValueError("a key is a JSON object")
    kty = raw.get("kty")
    if kty == "oct":
        raise ValueError("a symmetric key (kty oct) is not a public key")
    if any(member in raw for member in _PRIVATE_MEMBERS):
        raise ValueError("a private key: publish only the public part")
    use = raw.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use {str(use)[:20]!r}: only signature keys (use sig) verify tokens")
    kid = raw.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    algorithms = _algorithms(kty, raw.get("crv"))
    alg = raw.get("alg")
    if alg is not None:
        if alg not in algorithms:
            raise ValueError(f"alg {str(alg)[:20]!r} does not fit a {kty} key")
        algorithms = frozenset((alg,))
    from jwt import PyJWK  # lazily: PyJWT loads cryptography
    from jwt.exceptions import PyJWTError

    try:
        jwk = PyJWK(dict(raw), algorithm=next(iter(sorted(algorithms))))
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a usable {kty} key ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not _is_public(jwk.key):
        raise ValueError("not a public key")
    return Key(kid, algorithms, jwk.key)


def _algorithms(kty: object, crv: object) -> frozenset[str]:
    if kty == "RSA":
        return _RSA_ALGS
    if kty == "EC":
        if crv not in _EC_ALGS:
            raise ValueError(f"EC curve {str(crv)[:20]!r} is not supported")
        return frozenset((_EC_ALGS[str(crv)],))
    if kty == "OKP":
        if crv not in _OKP_CURVES:
            raise ValueError(f"OKP curve {str(crv)[:20]!r} is not supported")
        return frozenset(("EdDSA",))
    raise ValueError(f"key type {str(kty)[:20]!r} is not supported (RSA, EC or OKP)")


def _is_public(key: object) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    return isinstance(
        key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    )
