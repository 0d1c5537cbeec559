"""End-user authentication: a service's `RequestAuthentication` document compiled into a
verifier of the request's JWT (Istio's RequestAuthentication semantics).

- A request without a token passes: it has no user (an Authorization rule that names users or
  claims then refuses it).
- A request with a token must be verified by the rule of the token's issuer: signature with
  the key its `kid` names (algorithms from the key's type, never `none` nor HMAC), `exp`,
  `nbf` and `iat` with `LEEWAY`, the issuer, and one of the rule's audiences. Anything else
  is `Failure` (a 401 with the reason); no reason quotes the token.
- Keys from a URL that are not there yet (the first fetch is under way), or a `kid` the cached
  set lacks (a rotation), give `Wait`: the caller waits for the fetch off the event loop and
  asks again with `may_wait=False`.

PyJWT is imported on the first token, so a process with no such document never loads it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from meshlib.security.jwk import Key, KeySet, parse_jwks
from meshlib.security.jwks import JwksSource, source_for
from meshlib.security.users import User

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.rules import RequestAuthenticationDoc
    from meshlib.snapshot import Snapshot

log = logging.getLogger("meshlib.security")

LEEWAY = 30.0
"""Seconds of clock skew allowed on exp, nbf and iat."""
MAX_TOKEN = 16 * 1024
CACHE_FOR = 300.0
"""The longest a verified token is remembered (then verified again, if still in use)."""
MAX_CACHED = 1024
"""Verified tokens remembered per compiled document."""
WAIT_FOR_KEYS = 5.0
"""How long a request waits for a JWKS fetch under way before it is refused."""


@dataclass(frozen=True, slots=True)
class Failure:
    """The token is invalid; `reason` is the 401's (fixed texts: no token content)."""

    reason: str


class Verified(NamedTuple):
    """A valid token: its user, and the headers to take off the request (`forward: false`)."""

    user: User
    drop: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    """The keys are being fetched: wait for `source`'s fetch after `generation`, then ask again."""

    source: JwksSource
    generation: int


Outcome = Verified | Failure | Wait | None


def _unverified(token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """(header, payload) of a compact JWS, unverified: only to choose the rule and the key,
    before PyJWT checks everything. None if it is not three base64url parts of JSON objects."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError, RecursionError):  # binascii.Error and JSONDecodeError are
        return None  # ValueErrors; RecursionError: JSON nested deeper than the parser goes
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return header, payload


@functools.cache
def _jwt() -> Any:
    import jwt  # lazily: PyJWT loads cryptography

    return jwt


class _Issuer:
    """One `jwt` rule of the document."""

    __slots__ = ("audiences", "drop", "issuer", "locations", "source", "static")

    def __init__(self, rule: Any) -> None:
        self.issuer: str = rule.issuer
        self.audiences: tuple[str, ...] | None = tuple(rule.audiences) or None
        self.locations = frozenset((h.name, h.prefix) for h in rule.from_headers)
        self.drop: tuple[str, ...] = (
            () if rule.forward else tuple(sorted({h.name for h in rule.from_headers}))
        )
        self.static: KeySet | None = parse_jwks(rule.jwks) if rule.jwks is not None else None
        self.source: JwksSource | None = source_for(rule.jwks_uri) if rule.jwks_uri is not None else None

    def keys(self) -> KeySet | None:
        return self.static if self.source is None else self.source.keys


class Authenticator:
    """A compiled RequestAuthentication document: `authenticate` per request."""

    __slots__ = ("__weakref__", "_cache", "doc", "issuers", "locations")

    def __init__(self, doc: RequestAuthenticationDoc) -> None:
        self.doc = doc
        self._cache: dict[str, tuple[Verified, float, _Issuer, KeySet]] = {}
        self.issuers = {rule.issuer: _Issuer(rule) for rule in doc.jwt}
        locations: list[tuple[str, str]] = []
        for issuer in self.issuers.values():
            for location in sorted(issuer.locations):
                if location not in locations:
                    locations.append(location)
        self.locations = tuple(locations)

    def token(self, getter: Any, carrier: Any) -> tuple[str, tuple[str, str]] | None:
        """(token, where it was found) from the request's headers; None without one."""
        for name, prefix in self.locations:
            values = getter.get(carrier, name)
            if not values:
                continue
            n = len(prefix)
            for value in values:
                if value[:n].lower() == prefix.lower():
                    token = value[n:].strip()
                    if token:
                        return token, (name, prefix)
        return None

    def authenticate(self, getter: Any, carrier: Any, may_wait: bool = True) -> Outcome:
        found = self.token(getter, carrier)
        if found is None:
            return None
        token, location = found
        if len(token) > MAX_TOKEN:
            return Failure("token is too long")
        cached = self._cache.get(token)
        if cached is not None:
            verified, until, by, keyset = cached
            if location in by.locations and by.keys() is keyset and time.time() < until:
                return verified
            self._cache.pop(token, None)
        parts = _unverified(token)
        if parts is None:
            return Failure("malformed token")
        header, payload = parts
        issuer_name = payload.get("iss")
        issuer = self.issuers.get(issuer_name) if isinstance(issuer_name, str) else None
        if issuer is None:
            return Failure("token issuer is not accepted")
        if location not in issuer.locations:
            return Failure("token is not where its issuer's tokens are read")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            return Failure("malformed token header")
        source = issuer.source
        keys = issuer.keys()
        if keys is None:  # the URL's first fetch has not worked (yet)
            if may_wait and source is not None and source.generation == 0:
                return Wait(source, 0)
            return Failure("keys of the token issuer are unavailable")
        candidates = keys.candidates(kid, alg)
        if candidates is None:  # a key id the set lacks: perhaps rotated in since the last fetch
            if may_wait and source is not None:
                generation = source.generation
                if source.refetch():
                    return Wait(source, generation)
            return Failure("token key id is unknown")
        if not candidates:
            return Failure("token algorithm is not allowed for the issuer's keys")
        outcome = self._verify(_jwt(), token, issuer, alg, candidates)
        if isinstance(outcome, Verified):
            self._remember(token, outcome, issuer, keys)
        return outcome

    def _remember(self, token: str, verified: Verified, issuer: _Issuer, keys: KeySet) -> None:
        """Keep a verified token until its `exp` (at most `CACHE_FOR`), for this key set only:
        a rotation (a new set) verifies it afresh. A signature check costs tens of µs to ms."""
        exp = verified.user.claims.get("exp")
        now = time.time()
        until = now + CACHE_FOR
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            until = min(until, exp + LEEWAY)
        cache = self._cache
        if len(cache) >= MAX_CACHED:
            with contextlib.suppress(RuntimeError, StopIteration):  # another thread changed it
                cache.pop(next(iter(cache)), None)  # the oldest entry
        cache[token] = (verified, until, issuer, keys)

    def _verify(
        self, jwt: Any, token: str, issuer: _Issuer, alg: str, candidates: tuple[Key, ...]
    ) -> Outcome:
        reason = "token signature is invalid"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=issuer.audiences,
                    issuer=issuer.issuer,
                    leeway=LEEWAY,
                    options={"verify_aud": issuer.audiences is not None},
                )
            except jwt.InvalidSignatureError:
                continue  # another key of the same id and type may have signed it
            except jwt.PyJWTError as exc:
                return Failure(_reason(jwt, exc))
            subject = claims.get("sub", "")
            user = User(issuer.issuer, subject if isinstance(subject, str) else "", MappingProxyType(claims))
            return Verified(user, issuer.drop)
        return Failure(reason)


def _reason(jwt: Any, exc: Exception) -> str:
    """A fixed text per failure: PyJWT's own messages may quote the token's values."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token is not valid yet"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer is not accepted"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "token iat is not a number"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token algorithm is not allowed"
    if isinstance(exc, jwt.MissingRequiredClaimError):  # the claim is named by the check, not the token
        return f"token lacks the {exc.claim} claim"
    return "invalid token"


# --------------------------------------------------------------------------------------------
# One compiled document per Mesh and document: made when the rules come into force


_compiled: weakref.WeakKeyDictionary[Mesh, Authenticator] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def authenticator_for(mesh: Mesh, doc: RequestAuthenticationDoc) -> Authenticator:
    """The mesh's compiled document (its JWKS URLs being fetched); a new document object, a
    new one (the old one's URLs stop being refreshed once nothing holds it)."""
    compiled = _compiled.get(mesh)
    if compiled is None or compiled.doc is not doc:
        with _lock:
            compiled = _compiled.get(mesh)
            if compiled is None or compiled.doc is not doc:
                compiled = _compiled[mesh] = Authenticator(doc)
    return compiled


def forget(mesh: Mesh) -> None:
    """The mesh is closed: drop its compiled document, so its JWKS URLs stop being fetched
    once no request holds it."""
    _compiled.pop(mesh, None)


def prepare(mesh: Mesh, snapshot: Snapshot) -> None:
    """A snapshot listener: compile the service's document when the rules bring it in, so its
    JWKS URLs are fetched at apply time rather than on the first request."""
    if not mesh.service or getattr(mesh, "_closed", False):
        return
    doc = snapshot.rules.request_authentication(mesh.service)
    if doc is None:
        _compiled.pop(mesh, None)
        return
    try:
        authenticator_for(mesh, doc)
    except Exception:  # validated already; a failure here must not stop the other listeners
        log.exception("cannot prepare the RequestAuthentication of %s", mesh.service)
