"""Authorization: who may call this service (Istio's AuthorizationPolicy), enforced in-process.

Two jobs, both done by the server middleware before the app runs:

- *who is calling*: on a TLS connection only the verified peer certificate names the caller
  (its SPIFFE id mapped to a service name); the `x-mesh-source` header is ignored there, so it
  can never override or stand in for a certificate. On a plaintext connection to a mesh
  without mTLS the header is the only clue, and is advisory: anyone can set it. With mTLS on
  (STRICT or PERMISSIVE) a plaintext caller has no identity at all.
- *may they*: the service's `Authorization` document, compiled once per document object into
  a matcher (`Policy`), so a rules update applies to the next request without a restart.

Semantics (those of Istio's ALLOW policies): no document for the service allows everything;
once a document exists a request passes only if some `allow` rule matches it, so an empty
`allow` list refuses everything. Within a rule every non-empty field must match: `from` (a
service name, or `*` for any *identified* caller; a caller with no identity matches only rules
without `from`), `methods` (case-insensitive), `paths` (exact, `prefix*`, `*suffix`, `*`;
a `*` elsewhere matches any run of characters), and the end user a verified JWT names
(`from_users`: `<iss>/<sub>` or `*`; `claims`): a rule naming users never matches a request
without a valid token (`meshlib.security.authentication`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from meshlib.names import is_service_name
from meshlib.rules import AllowRule, AuthorizationDoc
from meshlib.security.peer import peer_identity
from meshlib.security.users import User

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.security")

PEER_KEY = "meshlib.peer"
"""Key of the verified peer SPIFFE id (or None) in the ASGI scope and the WSGI environ."""
ASGI_SCOPE = "asgi.scope"
"""Where a2wsgi's WSGIMiddleware keeps the ASGI scope in the environ."""

peer_var: ContextVar[str | None] = ContextVar("meshlib_peer", default=None)

_MAX_SHOWN_PATH = 200  # a denial echoes the path; keep a hostile one from bloating the body


def current_peer() -> str | None:
    """The verified SPIFFE id of the caller of the request this code runs for.

    None outside a request, on plaintext connections and for TLS callers without a (SPIFFE)
    client certificate. Unlike `meshlib.context.current().source`, never taken from a header.
    """
    return peer_var.get()


# --------------------------------------------------------------------------------------------
# Compiled documents


class _Paths:
    """Path patterns of one rule, split by kind so the common ones cost a set or str method."""

    __slots__ = ("any", "exact", "prefixes", "regex", "suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        globs: list[str] = []
        self.any = False
        for p in patterns:
            stars = p.count("*")
            if p == "*":
                self.any = True
            elif stars == 0:
                exact.add(p)
            elif stars == 1 and p.endswith("*"):
                prefixes.append(p[:-1])
            elif stars == 1 and p.startswith("*"):
                suffixes.append(p[1:])
            else:
                globs.append(".*".join(re.escape(part) for part in p.split("*")))
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.regex = re.compile("|".join(f"(?:{g})" for g in globs), re.DOTALL) if globs else None

    def match(self, path: str) -> bool:
        if self.any or path in self.exact:
            return True
        if self.prefixes and path.startswith(self.prefixes):
            return True
        if self.suffixes and path.endswith(self.suffixes):
            return True
        return self.regex is not None and self.regex.fullmatch(path) is not None


_MISSING = object()


def claim_of(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name reaches into nested objects (`realm.roles`) when no claim
    has the whole name (URL-like claim names have dots of their own)."""
    value = claims.get(name, _MISSING)
    if value is _MISSING and "." in name:
        value = claims
        for part in name.split("."):
            if not isinstance(value, Mapping):
                return _MISSING
            value = value.get(part, _MISSING)
    return value


def _text(value: Any) -> str | None:
    """A scalar claim as the text rules compare (JSON's spelling of booleans and numbers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return None


def claim_matches(value: Any, wanted: frozenset[str]) -> bool:
    """A string claim by equality, a list claim by membership: any wanted value will do."""
    if isinstance(value, list):
        return any(_text(v) in wanted for v in value)
    return _text(value) in wanted


class _Rule:
    """One `allow` entry; None in a field means the rule does not restrict it."""

    __slots__ = ("any_source", "any_user", "claims", "methods", "needs_user", "paths", "sources", "users")

    def __init__(self, rule: AllowRule) -> None:
        self.any_source = "*" in rule.sources
        self.sources = frozenset(rule.sources) if rule.sources else None
        self.methods = frozenset(m.upper() for m in rule.methods) if rule.methods else None
        self.paths = _Paths(rule.paths) if rule.paths else None
        self.needs_user = rule.needs_user
        self.any_user = "*" in rule.from_users
        self.users = frozenset(rule.from_users) if rule.from_users else None
        self.claims = tuple((name, frozenset(values)) for name, values in rule.claims.items())

    def match(self, source: str | None, method: str, path: str, user: User | None = None) -> bool:
        sources = self.sources
        if sources is not None and (source is None or not (self.any_source or source in sources)):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.paths is not None and not self.paths.match(path):
            return False
        return not self.needs_user or self._user_matches(user)

    def _user_matches(self, user: User | None) -> bool:
        if user is None:
            return False
        if self.users is not None and not (self.any_user or user.principal in self.users):
            return False
        return all(claim_matches(claim_of(user.claims, name), wanted) for name, wanted in self.claims)


class Policy:
    """A compiled Authorization document: `denial(...)` is None when the request may proceed."""

    __slots__ = ("_rules", "doc", "names_users", "service")

    def __init__(self, doc: AuthorizationDoc) -> None:
        self.doc = doc
        self.service = doc.service
        self._rules = tuple(_Rule(r) for r in doc.allow)
        self.names_users = any(r.needs_user for r in self._rules)

    def allows(self, source: str | None, method: str, path: str, user: User | None = None) -> bool:
        method = method.upper()
        if "/." in path:  # dot-segments: every reading the app might take must be allowed
            return all(self._any(source, method, p, user) for p in _readings(path))
        return self._any(source, method, path, user)

    def denial(self, source: str | None, method: str, path: str, user: User | None = None) -> str | None:
        """None if allowed, else the reason for the 403 body."""
        if self.allows(source, method, path, user):
            return None
        who = f"source {source}" if source else "a caller without identity"
        if user is not None:
            principal = user.principal
            if len(principal) > _MAX_SHOWN_PATH:
                principal = principal[:_MAX_SHOWN_PATH] + "..."
            who += f" (user {principal})"
        shown = path if len(path) <= _MAX_SHOWN_PATH else path[:_MAX_SHOWN_PATH] + "..."
        reason = f"RBAC: access denied: {who} may not {method.upper()} {shown}"
        return f"{reason}; no end-user token" if user is None and self.names_users else reason

    def _any(self, source: str | None, method: str, path: str, user: User | None) -> bool:
        for rule in self._rules:  # noqa: SIM110 - a plain loop skips any()'s generator: hot path
            if rule.match(source, method, path, user):
                return True
        return False


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path: `/a/./b/../c` -> `/a/c`."""
    parts = path.split("/")
    out: list[str] = []
    last = len(parts) - 1
    for i, seg in enumerate(parts):
        if seg in (".", ".."):
            if seg == ".." and len(out) > 1:
                out.pop()
            if i == last:
                out.append("")
            continue
        out.append(seg)
    return "/".join(out)


def _readings(path: str) -> tuple[str, ...]:
    """The path as sent, with dot-segments resolved, and with slashes merged first.

    Apps differ in which of these they route on; allowing only what all of them allow means
    `/public/../admin` cannot reach `/admin` through a rule for `/public/*`, nor the reverse.
    """
    merged = re.sub("/{2,}", "/", path)
    return (path, _remove_dot_segments(path), _remove_dot_segments(merged))


_policies: dict[int, Policy] = {}
_MAX_POLICIES = 256


def policy_for(doc: AuthorizationDoc) -> Policy:
    """The compiled Policy of a document, cached by the document object's identity.

    A rules update brings new document objects (and an unchanged document keeps its object),
    so a cached Policy is never stale. The Policy holds its document, so an id is not reused
    while its entry lives.
    """
    policy = _policies.get(id(doc))
    if policy is None or policy.doc is not doc:
        if len(_policies) >= _MAX_POLICIES:
            _policies.clear()
        policy = _policies[id(doc)] = Policy(doc)
    return policy


class Authorizer:
    """The check a server middleware makes per request, on the live snapshot's rules.

    Looks the document up once per snapshot, so a service without one pays an identity check.
    """

    __slots__ = ("_cached", "_mesh")

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._cached: tuple[object, Policy | None] = (None, None)  # (snapshot, its policy), swapped whole

    def denial(self, source: str | None, method: str, path: str, user: User | None = None) -> str | None:
        """None if the request may proceed; else the reason (counted as `denied`)."""
        mesh = self._mesh
        snapshot = mesh.snapshot
        cached = self._cached
        if cached[0] is snapshot:
            policy = cached[1]
        else:
            doc = snapshot.rules.authorization(mesh.service) if mesh.service else None
            policy = policy_for(doc) if doc is not None else None
            self._cached = (snapshot, policy)
        return None if policy is None else counted_denial(mesh, policy, source, method, path, user)


def counted_denial(
    mesh: Mesh, policy: Policy, source: str | None, method: str, path: str, user: User | None = None
) -> str | None:
    """`policy.denial`, counted as `denied` (and logged at debug) when it refuses."""
    reason = policy.denial(source, method, path, user)
    if reason is not None:
        mesh.stats.count("denied", policy.service)
        log.debug("%s: %s", policy.service, reason)
    return reason


# --------------------------------------------------------------------------------------------
# Who is calling


@functools.cache
def _certificates() -> Any:
    """`meshlib.security.certificates`, imported on first TLS request (it loads `cryptography`)."""
    from meshlib.security import certificates

    return certificates


def _service_of(peer: str, mesh: Mesh) -> str | None:
    """The service a verified SPIFFE id names in this mesh's trust domain (None: another one)."""
    certs = _certificates()
    return certs.service_of(peer, mesh.trust_domain or certs.DEFAULT_TRUST_DOMAIN)


MTLS_ON = frozenset(("STRICT", "PERMISSIVE"))


@functools.lru_cache(maxsize=256)
def _spiffe_of_pem(pem: str) -> str | None:
    """Parsing a certificate costs tens of microseconds: once per certificate, not per request."""
    return _certificates().spiffe_id_of_pem(pem)


SECURE_SCHEMES = frozenset(("https", "wss"))
"""The ASGI schemes of a TLS connection."""


def source_of(peer: str | None, secure: bool, claim: str | None, mesh: Mesh) -> str | None:
    """The calling service: the one a verified certificate names, none on any other TLS
    connection, else the `x-mesh-source` header (`claim`), if it could name a service. With
    mTLS on (PERMISSIVE too) only certificates name callers, as in Istio: a plaintext caller
    then has no identity."""
    if peer is not None:
        return _service_of(peer, mesh)
    return None if secure or mesh.mtls in MTLS_ON or not claim else CLAIMED.get(claim) or claimed(claim)


CLAIMED: dict[str, str] = {}
"""Claimed names found to be service names, each mapped to itself: a lookup per request, the
name checked once (`CLAIMED.get(claim) or claimed(claim)`)."""
_MAX_CLAIMED = 4096


def claimed(claim: str) -> str | None:
    """A plaintext caller's `x-mesh-source`, if it could name a service; else none: a name no
    rule could name, and which would only swell counters, /metrics and logs (8 KB each, one edge
    per name up to the stats' cap), is no name."""
    if not is_service_name(claim):
        return None
    if len(CLAIMED) < _MAX_CLAIMED:
        CLAIMED[claim] = claim
    return claim


def asgi_peer(scope: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(verified peer SPIFFE id, whether the connection is TLS) of an ASGI request; the peer is
    what the TLS layer verified (`meshlib.security.peer`)."""
    ext = scope.get("extensions")
    if not ext:
        return None, scope.get("scheme") in SECURE_SCHEMES
    return peer_identity(scope), "tls" in ext or scope.get("scheme") in SECURE_SCHEMES


def wsgi_peer(environ: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(verified peer SPIFFE id, whether the connection is TLS) of a WSGI request.

    The identity comes from `environ["meshlib.peer"]` if a server adapter put it there, else
    from the ASGI scope an ASGI-to-WSGI adapter (a2wsgi, as `Mesh.serve` uses) keeps in
    `environ["asgi.scope"]`, else from `SSL_CLIENT_CERT` (werkzeug's server with a
    client-verifying TLS context). None of these can be set by a request's headers.
    """
    peer = environ.get(PEER_KEY)
    scope = environ.get(ASGI_SCOPE) if peer is None else None
    if isinstance(scope, Mapping):  # served over ASGI: the same policy as an ASGI app
        return asgi_peer(scope)
    if peer is None:
        pem = environ.get("SSL_CLIENT_CERT")
        if pem:
            peer = _spiffe_of_pem(pem)
    return peer, environ.get("wsgi.url_scheme") == "https"


def asgi_caller(scope: Mapping[str, Any], claimed: str | None, mesh: Mesh) -> tuple[str | None, str | None]:
    """(verified peer SPIFFE id, effective source service) of an ASGI request."""
    peer, secure = asgi_peer(scope)
    return peer, source_of(peer, secure, claimed, mesh)


def wsgi_caller(environ: Mapping[str, Any], mesh: Mesh) -> tuple[str | None, str | None]:
    """(verified peer SPIFFE id, effective source service) of a WSGI request."""
    peer, secure = wsgi_peer(environ)
    return peer, source_of(peer, secure, environ.get("HTTP_X_MESH_SOURCE"), mesh)
