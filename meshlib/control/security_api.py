"""The control service's security endpoints (the CA and join tokens) and its caller checks.

With security on, the plane has a `CertificateAuthority` (`plane.ca`) and a `TokenStore`
(`plane.tokens`). A process proves which service it is with either

- a join token (`Authorization: Bearer mjt_...`), bound to one service when it was created, or
- its mesh certificate, presented in the TLS handshake: the handshake verified it against the
  trust bundle, and it is checked again here (chain to a current root, validity, SPIFFE id of
  this trust domain) before its service is believed.

`authenticate` runs before anything in the request is read (no token: 401, whatever the body);
`authorize` then compares the identity with the service the request acts for (another
service: 403). With security off every check here is a no-op and the CA endpoints answer 404.
Neither tokens nor keys are ever logged; a token is named by its id (a prefix of its hash).

Signing (`POST /v1/ca/sign`) is the exception: a certificate is not enough there, every
signing, the first and each renewal, needs a live join token of the service (`signer`). A
certificate only ever comes from a token, so revoking the token, or its expiry, ends the chain
of renewals it started, and no certificate outlives the token it was signed with: a stolen
certificate and key are worth what is left of the certificate, never more. A certificate
presented as well must be valid and of the same service (checked in addition, never instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from meshlib.control.etcd_client import EtcdError
from meshlib.control.handlers import _require_admin
from meshlib.control.parsing import (
    _NO_BODY,
    ApiError,
    _Body,
    _expect_object,
    _json_body,
    _service_param,
    _validated,
)
from meshlib.security import certificates as certs
from meshlib.security.ca import MIN_LIFETIME, CAError, CertificateAuthority
from meshlib.security.tokens import TokenInfo, TokenStore, valid_id

if TYPE_CHECKING:
    from meshlib.control.plane import ControlPlane

log = logging.getLogger("meshlib.control")

MAX_CSR = 64 * 1024
TEN_YEARS = 10 * 365 * 86400.0
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meshlib control"'}


@dataclass(frozen=True)
class Identity:
    """Who is calling: a service (by token or certificate) or the operator (admin token)."""

    service: str | None  # None for the admin
    via: str  # "token" | "certificate" | "admin"

    @property
    def admin(self) -> bool:
        return self.via == "admin"


# --------------------------------------------------------------------------------------------
# Authentication


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, given = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return given.strip() or None


def _unauthorized(reason: str) -> ApiError:
    return ApiError(401, reason, headers=_CHALLENGE)


def _peer_chain(request: Request) -> list[str]:
    tls = (request.scope.get("extensions") or {}).get("tls")
    if not isinstance(tls, dict):
        return []
    chain = tls.get("client_cert_chain")
    if not isinstance(chain, (list, tuple)):
        return []
    return [c for c in chain if isinstance(c, str)]


class _PeerCache:
    """Verified peer certificates (by DER digest and CA generation): a heartbeat every few
    seconds should not cost a signature check each time."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self._items: OrderedDict[tuple[bytes, int, bytes], tuple[str | None, float]] = OrderedDict()

    def get(self, key: tuple[bytes, int, bytes], now: float) -> tuple[bool, str | None]:
        hit = self._items.get(key)
        if hit is None or now >= hit[1]:
            return False, None
        self._items.move_to_end(key)
        return True, hit[0]

    def put(self, key: tuple[bytes, int, bytes], service: str | None, until: float) -> None:
        self._items[key] = (service, until)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


_cache = _PeerCache()


def certificate_service(plane: ControlPlane, chain_pem: list[str]) -> str | None:
    """The service of a verified client certificate chain, or None if it proves nothing.

    The TLS handshake already verified the chain against the bundle; this checks it again (so
    that a server wrongly configured not to verify cannot be fooled) and reads the SPIFFE id."""
    ca = plane.ca
    if ca is None or not chain_pem:
        return None
    bundle = ca.bundle
    digest = hashlib.sha256("".join(chain_pem).encode("utf-8", "replace")).digest()
    key = (digest, ca.generation, hashlib.sha256(bundle).digest())
    now = time.time()
    hit, service = _cache.get(key, now)
    if hit:
        return service
    try:
        chain = [c for pem in chain_pem for c in certs.load_pem_chain(pem)]
        roots = certs.load_pem_chain(bundle)
    except ValueError:
        return None
    service, until = _verify_chain(chain, roots, now, ca.trust_domain)
    _cache.put(key, service, until if service is not None else now + 60)
    return service


def _verify_chain(
    chain: list[x509.Certificate], roots: list[x509.Certificate], now: float, trust_domain: str
) -> tuple[str | None, float]:
    """(service, valid until) when chain[0] chains to one of `roots` within its validity."""
    if not chain:
        return None, now
    leaf = chain[0]
    spiffe = certs.spiffe_ids_of(leaf)
    service = certs.service_of(spiffe[0], trust_domain) if len(spiffe) == 1 else None
    if service is None:
        return None, now
    until = leaf.not_valid_after_utc.timestamp()
    current = leaf
    for depth in range(6):
        if not current.not_valid_before_utc.timestamp() <= now < current.not_valid_after_utc.timestamp():
            return None, now
        until = min(until, current.not_valid_after_utc.timestamp())
        if depth > 0 and not _is_ca(current):
            return None, now
        for root in roots:
            if certs.issued_by(current, root) and root.not_valid_after_utc.timestamp() > now:
                return service, min(until, root.not_valid_after_utc.timestamp())
        parent = next((c for c in chain[1:] if c is not current and certs.issued_by(current, c)), None)
        if parent is None:
            return None, now
        current = parent
    return None, now


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError):
        return False


def authenticate(plane: ControlPlane, request: Request, *, admin: bool = True) -> Identity | None:
    """The caller's identity when security is on (None when it is off); 401 if it has none.

    A verified client certificate wins; then the admin token (if `admin`), then a join token."""
    if plane.ca is None or plane.tokens is None:
        return None
    service = certificate_service(plane, _peer_chain(request))
    if service is not None:
        return Identity(service, "certificate")
    token = _bearer(request)
    if token is None:
        raise _unauthorized("a join token (Authorization: Bearer ...) or a mesh certificate is required")
    if admin and plane.auth.check(request.headers.get("authorization")):
        return Identity(None, "admin")
    info, result = plane.tokens.identify(token)
    if info is None:
        raise _unauthorized(f"join token refused: {result.reason}")
    return Identity(info.service, "token")


def authorize(identity: Identity | None, service: str | None) -> None:
    """403 unless the identity may act as `service` (anyone authenticated, if None)."""
    if identity is None or identity.admin or service is None:
        return
    if identity.service != service:
        raise ApiError(
            403,
            f"this {'token' if identity.via == 'token' else identity.via} is for service "
            f"{identity.service!r}, not {service[:100]!r}",
        )


def require(plane: ControlPlane, request: Request, service: str | None) -> Identity | None:
    """`authenticate`, then `authorize` for `service`."""
    identity = authenticate(plane, request)
    authorize(identity, service)
    return identity


# --------------------------------------------------------------------------------------------
# The CA


class SignBody(_Body):
    csr: str = Field(max_length=MAX_CSR)
    service: str = Field(max_length=253)
    lifetime: float | None = Field(None, ge=1, le=TEN_YEARS)


class TokenBody(_Body):
    service: str = Field(max_length=253)
    ttl: float | None = Field(None, ge=1, le=TEN_YEARS)


class RotateBody(_Body):
    overlap: float = Field(3600.0, ge=0, le=TEN_YEARS)


def _security_on(plane: ControlPlane) -> None:
    if plane.ca is None or plane.tokens is None:
        raise ApiError(404, "security is off: start the control service with --secure")


def _body_service(value: str) -> str:
    try:
        return _service_param(value, status=422)
    except ApiError as exc:
        raise ApiError(422, "invalid request", problems=[{"field": "service", "reason": exc.error}]) from None


def signer(plane: ControlPlane, request: Request) -> TokenInfo:
    """The join token a signing request is made with, checked before anything in the request
    is read: 401 without one (a certificate alone is not enough), for one revoked, expired or
    about to expire, and for the admin token (which never signs)."""
    assert plane.tokens is not None
    token = _bearer(request)
    if token is None:
        reason = "signing needs the service's join token (Authorization: Bearer mjt_...)"
        if _peer_chain(request):
            reason += ": a certificate alone cannot renew itself"
        raise _unauthorized(reason)
    info, result = plane.tokens.identify(token)
    if info is None:
        raise _unauthorized(f"join token refused: {result.reason}")
    if info.expires is not None and _left(info) < MIN_LIFETIME.total_seconds():
        raise _unauthorized("join token refused: it is about to expire")
    return info


def _left(token: TokenInfo) -> float:
    """How long a certificate signed now with `token` may live (inf: the token does not expire):
    up to a second before the token's expiry, as the CA counts from the start of the second."""
    return math.inf if token.expires is None else token.expires - time.time() - 1.0


def _presented(plane: ControlPlane, request: Request) -> str | None:
    """The service of the client certificate presented with a signing request, if any (401 for
    one that does not verify against the current bundle)."""
    chain = _peer_chain(request)
    if not chain:
        return None
    service = certificate_service(plane, chain)
    if service is None:
        raise _unauthorized(
            "the client certificate does not verify against the current trust bundle: "
            "sign with the join token alone"
        )
    return service


def _lifetime(ca: CertificateAuthority, requested: float | None, token: TokenInfo) -> float:
    """The lifetime to sign for: the one asked (or the CA's default) within the CA's bounds,
    and never past the expiry of the join token."""
    return min(ca.lifetime(requested).total_seconds(), _left(token))


async def post_sign(plane: ControlPlane, request: Request) -> Response:
    """`POST /v1/ca/sign`: a CSR and a live join token (and optionally the current certificate,
    as well) -> a leaf that expires no later than the token."""
    _security_on(plane)
    assert plane.ca is not None
    token = signer(plane, request)
    presented = _presented(plane, request)
    data = _expect_object(await _json_body(request, plane.max_body))
    body = _validated(SignBody, data)
    service = _body_service(body.service)
    authorize(Identity(token.service, "token"), service)
    if presented is not None:
        authorize(Identity(presented, "certificate"), service)
    try:
        lifetime = _lifetime(plane.ca, body.lifetime, token)
        if lifetime < MIN_LIFETIME.total_seconds():  # the token ran out meanwhile
            raise _unauthorized("join token refused: it is about to expire")
        chain = await asyncio.to_thread(plane.ca.sign, body.csr, service, lifetime)
        leaf = certs.load_pem_chain(chain)[0]
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        problem = {"field": "csr", "reason": str(exc)[:300]}
        raise ApiError(422, "invalid request", problems=[problem]) from None
    expires = leaf.not_valid_after_utc.timestamp()
    log.info(
        "CA: signed a certificate for %s (join token %s%s), serial %x, until %s",
        service,
        token.id,
        ", and its certificate" if presented is not None else "",
        leaf.serial_number,
        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(expires)),
    )
    return JSONResponse(
        {
            "certificate": chain.decode("ascii"),
            "bundle": plane.ca.bundle.decode("ascii"),
            "spiffe_id": plane.ca.spiffe_id(service),
            "expires": int(expires),
        }
    )


async def get_bundle(plane: ControlPlane, request: Request) -> Response:
    """`GET /v1/ca/bundle`: the roots to trust (public: roots are not secrets)."""
    _security_on(plane)
    assert plane.ca is not None
    return JSONResponse({"trust_domain": plane.ca.trust_domain, "bundle": plane.ca.bundle.decode("ascii")})


async def post_rotate(plane: ControlPlane, request: Request) -> Response:
    """`POST /v1/ca/rotate` (admin): a new root; the old one stays trusted for `overlap` s."""
    _security_on(plane)
    _require_admin(plane, request)
    assert plane.ca is not None
    data = await _json_body(request, plane.max_body, optional=True)
    body = _validated(RotateBody, {} if data is _NO_BODY else _expect_object(data))
    rotate = plane.shared_ca.rotate if plane.shared_ca is not None else plane.ca.rotate
    try:
        await asyncio.to_thread(rotate, body.overlap)
    except CAError as exc:
        raise ApiError(409, str(exc)) from None
    except EtcdError as exc:  # replicas: the CA is in etcd, which did not answer
        raise ApiError(503, f"the CA could not be rotated: {exc}") from None
    publish_bundle(plane)
    return JSONResponse({"bundle": plane.ca.bundle.decode("ascii"), "overlap": body.overlap})


def publish_bundle(plane: ControlPlane) -> None:
    """Push the current bundle to every watcher (a `bundle` event), and wake the overlap timer."""
    assert plane.ca is not None
    plane.ca.write_bundle()
    plane.hub.publish("bundle", {"bundle": plane.ca.bundle.decode("ascii")})
    wake = getattr(plane, "_bundle_wake", None)
    if wake is not None:
        wake.set()


async def run_bundle_watch(plane: ControlPlane, *, idle: float = 3600.0) -> None:
    """Publish the bundle when a previous root's overlap ends (on time, after restarts too)."""
    ca = plane.ca
    if ca is None:
        return
    wake = asyncio.Event()
    plane._bundle_wake = wake  # type: ignore[attr-defined]
    while True:
        nxt = ca.next_change()
        delay = idle if nxt is None else min(idle, max(0.0, nxt - time.time()) + 0.01)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
        wake.clear()
        try:
            if await asyncio.to_thread(ca.write_bundle):
                log.info("CA: a previous root's overlap ended; pushing the new bundle")
                plane.hub.publish("bundle", {"bundle": ca.bundle.decode("ascii")})
        except Exception:
            log.exception("CA: cannot update the bundle; retrying later")


async def run_shared(plane: ControlPlane) -> None:
    """On etcd: follow the other replicas' tokens, admin token, CA and client bindings (the
    security watch), push the bundle when another replica rotated the CA, and write this
    replica's new client bindings. A task of the app's lifespan; returns at once off etcd."""
    shared = plane.shared_security
    if shared is None:
        return
    if plane.shared_ca is not None:
        plane.shared_ca.on_change = lambda: publish_bundle(plane)
    from meshlib.control.etcd_bindings import SharedClientBindings

    tasks = [shared.run()]
    if isinstance(plane.clients, SharedClientBindings):
        tasks.append(plane.clients.run())
    await asyncio.gather(*tasks)


# --------------------------------------------------------------------------------------------
# Join tokens (admin)


def _tokens(plane: ControlPlane) -> TokenStore:
    _security_on(plane)
    assert plane.tokens is not None
    return plane.tokens


async def post_token(plane: ControlPlane, request: Request) -> Response:
    """`POST /v1/tokens` (admin) `{"service", "ttl"}` -> 201 `{"token", "id", "service", "expires"}`."""
    tokens = _tokens(plane)
    _require_admin(plane, request)
    data = _expect_object(await _json_body(request, plane.max_body))
    body = _validated(TokenBody, data)
    service = _body_service(body.service)
    try:
        token = await asyncio.to_thread(tokens.create, service, body.ttl)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    except EtcdError as exc:  # replicas: the tokens are in etcd, which did not answer
        raise ApiError(503, f"the token could not be stored: {exc}") from None
    info, _ = tokens.identify(token)
    assert info is not None
    return JSONResponse({"token": token, **info.public()}, 201, headers={"Cache-Control": "no-store"})


async def get_tokens(plane: ControlPlane, request: Request) -> Response:
    """`GET /v1/tokens` (admin): every live token, without secrets."""
    tokens = _tokens(plane)
    _require_admin(plane, request)
    return JSONResponse([t.public() for t in tokens.list()])


async def delete_token(plane: ControlPlane, request: Request) -> Response:
    """`DELETE /v1/tokens/{id}` (admin): 204, or 404 if there is no such token."""
    tokens = _tokens(plane)
    _require_admin(plane, request)
    token_id = request.path_params["id"]
    if not valid_id(token_id):
        raise ApiError(400, "a token id is 16 lowercase hex digits (see GET /v1/tokens)")
    try:
        revoked = await asyncio.to_thread(tokens.revoke, token_id)
    except EtcdError as exc:
        raise ApiError(503, f"the token could not be revoked: {exc}") from None
    if not revoked:
        raise ApiError(404, f"no token {token_id}")
    return Response(status_code=204)
