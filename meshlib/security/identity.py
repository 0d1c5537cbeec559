"""This process's workload identity: its key, its certificate, the trust bundle, and the TLS
contexts built from them; and the enrolment that obtains and renews it from the control CA.

The private key is generated here and never leaves the process: it is never written to disk
(`tls.load_chain` hands it to OpenSSL through an anonymous memory file) nor logged, and each
renewal makes a new one. Certificates are renewed at half-life on the Mesh's runtime loop,
with jittered retries; each change (a renewal, a new bundle) builds fresh contexts and swaps
them in, and every new connection switches to the newest ones at its handshake, so neither a
renewal nor a CA rotation drops a request or needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlib.control.endpoints import ControlEndpoints
from meshlib.control.outage import _brief
from meshlib.control.tls_probe import atls_hint
from meshlib.resilience.classify import refused_by_tls
from meshlib.security import tls
from meshlib.security.certificates import (
    DEFAULT_TRUST_DOMAIN,
    generate_key,
    key_pem,
    load_key_pem,
    load_pem_chain,
    make_csr,
    service_of,
    spiffe_id,
    spiffe_ids_of,
)

log = logging.getLogger("meshlib.security")

SIGN_PATH = "/v1/ca/sign"
COPY_TIMEOUT = 10.0
_GENERATIONS = itertools.count(1)  # one number per installed material, process-wide


class IdentityError(Exception):
    """No certificate could be obtained, or what was obtained is unusable (the message says why)."""


@dataclass(frozen=True)
class _Material:
    key: Any = field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes
    spiffe_id: str
    not_before: float
    not_after: float
    generation: int


@dataclass(frozen=True)
class WorkloadPem:
    """One consistent view of the identity as PEM, for TLS stacks that take bytes (grpcio).
    `generation` changes whenever the certificate, its key or the bundle does."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes
    generation: int


def _material(key: Any, chain_pem: bytes, bundle_pem: bytes) -> _Material:
    try:
        chain = load_pem_chain(chain_pem)
    except ValueError as exc:
        raise IdentityError(f"the certificate is not PEM: {exc}") from None
    try:
        roots = load_pem_chain(bundle_pem)
    except ValueError as exc:
        raise IdentityError(f"the trust bundle is not PEM: {exc}") from None
    leaf = chain[0]
    if _public(leaf.public_key()) != _public(key.public_key()):
        raise IdentityError("the certificate does not belong to this process's key")
    ids = spiffe_ids_of(leaf)
    if len(ids) != 1:
        raise IdentityError(f"the certificate must carry exactly one SPIFFE id, it has {len(ids)}")
    if leaf.not_valid_after_utc.timestamp() <= time.time():
        log.warning("the certificate of %s has expired: peers will refuse it", ids[0])
    return _Material(
        key=key,
        chain_pem=b"".join(_pem(c) for c in chain),
        bundle_pem=b"".join(_pem(c) for c in roots),
        spiffe_id=ids[0],
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        generation=next(_GENERATIONS),
    )


def _public(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _roots(bundle_pem: bytes) -> frozenset[bytes]:
    return frozenset(c.public_bytes(serialization.Encoding.DER) for c in load_pem_chain(bundle_pem))


class Identity:
    """A workload identity and its TLS contexts.

    `client_context` verifies mesh peers (chain and SPIFFE id), `server_context(...)` serves
    mTLS, `control_context` verifies the control service by hostname; contexts already handed
    out follow every later change. Build one with `from_pem`/`from_files` (an operator's own
    certificate files), or let `Enrollment` obtain one from the control service's CA.
    """

    def __init__(
        self,
        key: Any,
        chain_pem: bytes,
        bundle_pem: bytes,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        anchors_pem: bytes = b"",
    ) -> None:
        self.trust_domain = trust_domain
        self._anchors = anchors_pem  # extra roots for the control service only ($MESH_CA)
        self._lock = threading.Lock()
        self._client = tls.ContextSlot()
        self._control = tls.ContextSlot()
        self._servers = {True: tls.ContextSlot(), False: tls.ContextSlot()}
        self._copies: dict[str, httpx.AsyncClient] = {}  # per destination service, as the clients' pools
        self._material = _material(key, chain_pem, bundle_pem)
        self._build(self._material)

    @classmethod
    def from_pem(
        cls,
        cert_pem: bytes | str,
        key_pem: bytes | str,
        bundle_pem: bytes | str,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> Identity:
        """From PEM: the certificate (leaf first, then any intermediates), its key, the roots."""
        try:
            key = load_key_pem(key_pem)
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        return cls(key, _bytes(cert_pem), _bytes(bundle_pem), trust_domain=trust_domain)

    @classmethod
    def from_files(
        cls,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        bundle_file: str | os.PathLike[str],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> Identity:
        """From an operator's PEM files, read once (`update` installs renewed ones)."""
        try:
            cert, key, bundle = (Path(p).read_bytes() for p in (cert_file, key_file, bundle_file))
        except OSError as exc:
            raise IdentityError(f"cannot read {exc.filename}: {exc.strerror}") from None
        return cls.from_pem(cert, key, bundle, trust_domain=trust_domain)

    # -- what it is ----------------------------------------------------------------------------

    @property
    def spiffe_id(self) -> str:
        return self._material.spiffe_id

    @property
    def service(self) -> str | None:
        return service_of(self._material.spiffe_id, self.trust_domain)

    @property
    def not_after(self) -> float:
        """When the current certificate expires (unix seconds)."""
        return self._material.not_after

    @property
    def chain_pem(self) -> bytes:
        return self._material.chain_pem

    @property
    def bundle_pem(self) -> bytes:
        return self._material.bundle_pem

    @property
    def generation(self) -> int:
        """Changes with every renewal and every bundle change (cheap to poll)."""
        return self._material.generation

    def pem(self) -> WorkloadPem:
        """Key, chain, bundle and generation of one and the same material (never mixed across
        a concurrent renewal)."""
        m = self._material
        return WorkloadPem(_key_pem(m), m.chain_pem, m.bundle_pem, m.generation)

    def __repr__(self) -> str:  # never the key
        return f"Identity({self.spiffe_id!r}, expires={self.not_after:.0f})"

    # -- contexts ------------------------------------------------------------------------------

    @property
    def client_context(self) -> ssl.SSLContext:
        """For httpx (`verify=`): our certificate, the bundle, the peer's SPIFFE id checked
        against the `sni_hostname` of each request (the destination service)."""
        assert self._client.current is not None
        return self._client.current

    @property
    def control_context(self) -> ssl.SSLContext:
        """For the control service: hostname verification against the bundle and the anchors."""
        assert self._control.current is not None
        return self._control.current

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """The server context in force (STRICT: client certificate required; PERMISSIVE: not)."""
        slot = self._servers[require_client_cert]
        current = slot.current
        if current is None:
            with self._lock:
                if slot.current is None:
                    m = self._material
                    slot.current = tls.server_context(
                        m.chain_pem, _key_pem(m), m.bundle_pem, require_client_cert=require_client_cert
                    )
                current = slot.current
        return current

    def _build(self, m: _Material) -> None:
        """Fresh contexts for `m`, swapped in whole (see `tls.ContextSlot` for why not edited)."""
        pem = _key_pem(m)
        client = tls.client_context(
            m.chain_pem, pem, m.bundle_pem, trust_domain=self.trust_domain, slot=self._client
        )
        control = tls.control_context(m.bundle_pem + self._anchors, m.chain_pem, pem, slot=self._control)
        servers = {
            strict: tls.server_context(m.chain_pem, pem, m.bundle_pem, require_client_cert=strict)
            for strict, slot in self._servers.items()
            if slot.current is not None
        }
        self._client.current = client
        self._control.current = control
        for strict, ctx in servers.items():
            self._servers[strict].current = ctx

    # -- changes -------------------------------------------------------------------------------

    def update(self, key: Any, chain_pem: bytes, bundle_pem: bytes | None = None) -> None:
        """Install a renewed certificate (and its key; optionally a new bundle)."""
        with self._lock:
            m = _material(key, chain_pem, bundle_pem if bundle_pem is not None else self._material.bundle_pem)
            self._build(m)
            self._material = m
        log.info("certificate for %s renewed; valid until %s", m.spiffe_id, _when(m.not_after))

    def update_bundle(self, bundle_pem: bytes | str) -> bool:
        """Trust these roots from now on (a CA rotation adds one, its end removes the old one);
        True if the bundle changed."""
        data = _bytes(bundle_pem)
        try:
            new = _roots(data)
        except ValueError as exc:
            log.warning("ignoring a trust bundle that is not PEM: %s", exc)
            return False
        with self._lock:
            old = self._material
            if _roots(old.bundle_pem) == new:
                return False
            m = _material(old.key, old.chain_pem, data)
            self._build(m)
            self._material = m
        log.info("trust bundle updated: %d root(s)", len(new))
        return True

    # -- requests --------------------------------------------------------------------------------

    @staticmethod
    def secure(request: httpx.Request, service: str) -> None:
        """Send a request to a mesh endpoint over mTLS: https, and `sni_hostname` names the
        destination service, whose SPIFFE id the client context checks."""
        if request.url.scheme != "https":  # the mesh transport already sends it as https
            request.url = request.url.copy_with(scheme="https")
        ext = request.extensions
        ext["sni_hostname"] = service
        ext[tls.MTLS_EXTENSION] = service  # the split transport keeps a pool per service

    # -- mirrored copies -----------------------------------------------------------------------

    async def send_copy(
        self,
        method: str,
        url: httpx.URL,
        headers: list[tuple[str, str]],
        body: bytes,
        service: str,
        done: Callable[[], None],
    ) -> None:
        """Send a fire-and-forget copy of a request (a mirror) to a mesh endpoint over mTLS;
        runs on the Mesh's runtime loop; `done` is called once it is over, however it ends."""
        try:
            client = self._copies.get(service)
            if client is None:  # only the runtime loop gets here: no lock needed
                client = self._copies[service] = httpx.AsyncClient(
                    timeout=COPY_TIMEOUT, verify=self.client_context
                )
            async with asyncio.timeout(COPY_TIMEOUT):  # the whole copy: httpx's restarts with every byte
                response = await client.request(
                    method,
                    url.copy_with(scheme="https"),
                    headers=headers,
                    content=body,
                    extensions={"sni_hostname": service},
                )
                await response.aclose()
        except Exception as exc:
            log.debug("mirrored %s %s failed: %s", method, url, exc)
        finally:
            done()

    async def aclose(self) -> None:
        copies, self._copies = self._copies, {}
        for client in copies.values():
            await client.aclose()


def _key_pem(m: _Material) -> bytes:
    return key_pem(m.key)


def _bytes(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else value


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


# -- enrolment ---------------------------------------------------------------------------------


def read_anchors(ca: str | os.PathLike[str] | bytes | None) -> bytes:
    """Trust anchors for the control service: PEM bytes, a PEM string, or a file's path."""
    if ca is None:
        return b""
    if isinstance(ca, bytes):
        return ca
    text = os.fspath(ca)
    if "-----BEGIN" in text:
        return text.encode("ascii")
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read the CA file {text}: {exc.strerror}") from None


def control_options(
    url: str, *, token: str | None, identity: Identity | None, anchors: bytes = b""
) -> dict[str, Any]:
    """httpx.AsyncClient arguments for talking to the control service: the join token as a
    bearer token, and for an https URL the verification of the control service (against the
    bundle and the anchors) with our certificate presented when we have one."""
    options: dict[str, Any] = {}
    if token:
        options["headers"] = {"authorization": f"Bearer {token}"}
    if url.startswith("https:"):
        if identity is not None:
            options["verify"] = identity.control_context
        elif anchors:
            options["verify"] = tls.control_context(anchors)
        else:
            raise IdentityError(f"{url} is https: give its CA with ca= or $MESH_CA")
    return options


class Enrollment:
    """Obtains this process's certificate from the control service's CA with a join token
    (`POST /v1/ca/sign`), then keeps it renewed at half-life."""

    def __init__(
        self,
        control: str | ControlEndpoints,
        service: str,
        token: str,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        anchors: bytes = b"",
        lifetime: float | None = None,
        timeout: float = 5.0,
    ) -> None:
        # the replicas (every one can sign) and the one in use, shared with the Mesh's link
        self.endpoints = control if isinstance(control, ControlEndpoints) else ControlEndpoints(control)
        self.service = service
        self.trust_domain = trust_domain
        self.expected = spiffe_id(trust_domain, service)  # ValueError for a bad service name
        self.lifetime = lifetime
        self.renewals = 0
        self._token = token
        self._anchors = anchors
        self._timeout = timeout

    def __repr__(self) -> str:  # never the token
        return f"Enrollment({self.url!r}, service={self.service!r})"

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    async def request(self, identity: Identity | None = None) -> tuple[Any, bytes, bytes]:
        """A new key and its certificate: (key, chain PEM, bundle PEM). IdentityError when the
        CA refuses; httpx.HTTPError when it cannot be reached (worth retrying)."""
        key = generate_key()
        body: dict[str, Any] = {"csr": make_csr(key, self.service).decode("ascii"), "service": self.service}
        if self.lifetime is not None:
            body["lifetime"] = self.lifetime
        url = self.url
        options = control_options(url, token=self._token, identity=identity, anchors=self._anchors)
        try:
            async with httpx.AsyncClient(timeout=self._timeout, **options) as http:
                r = await http.post(f"{url}{SIGN_PATH}", json=body)
        except httpx.TransportError as exc:
            if not refused_by_tls(exc):  # the next replica, for the next try
                self.endpoints.failed(url, exc, warn=False)
            raise
        if r.status_code >= 500:
            self.endpoints.failed(url, f"the CA answered {r.status_code}", warn=False)
            raise httpx.HTTPStatusError(f"the CA answered {r.status_code}", request=r.request, response=r)
        self.endpoints.ok(url)
        if r.status_code != 200:
            raise IdentityError(
                f"the control service's CA refused to sign for {self.service!r}: {r.status_code} {_reason(r)}"
            )
        try:
            data = r.json()
            chain, bundle = _bytes(data["certificate"]), _bytes(data["bundle"])
        except (ValueError, KeyError, TypeError, UnicodeEncodeError) as exc:
            raise IdentityError(f"unreadable answer from the CA: {type(exc).__name__}") from None
        m = _material(key, chain, bundle)
        if m.spiffe_id != self.expected:
            raise IdentityError(f"the CA issued {m.spiffe_id}, expected {self.expected}")
        return key, chain, bundle

    async def obtain(self, deadline: float) -> Identity:
        """The first certificate, retrying an unreachable CA until `deadline` (monotonic)."""
        failures = 0
        while True:
            url = self.url  # a failure moves `self.url` on to the next replica
            try:
                key, chain, bundle = await self.request()
                identity = Identity(
                    key, chain, bundle, trust_domain=self.trust_domain, anchors_pem=self._anchors
                )
                log.info(
                    "certificate for %s obtained; valid until %s",
                    identity.spiffe_id,
                    _when(identity.not_after),
                )
                return identity
            except httpx.HTTPError as exc:
                if refused_by_tls(exc):  # the control service is not who the anchors say
                    raise IdentityError(f"cannot verify the control service at {url}: {exc}") from None
                if hint := await atls_hint(url, exc):  # http:// for a TLS control service
                    raise IdentityError(hint) from None
                failures += 1
                pause = random.uniform(0.05, min(2.0, 0.1 * 2**failures))
                if time.monotonic() + pause > deadline:
                    raise IdentityError(
                        f"the control service's CA at {self.endpoints} is unreachable: {exc}"
                    ) from None
                # once per start-up, not per retry (the deadline ends the retries)
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(level, "CA at %s unreachable (%s); retrying", url, exc)
                await asyncio.sleep(pause)

    async def renew_forever(self, identity: Identity) -> None:
        """Renew at half of the remaining lifetime (±5%), retrying failures with full jitter."""
        failures = 0
        expired_said = False  # a failing streak logs once, and once more if the cert expires
        while True:
            left = identity.not_after - time.time()
            if failures == 0:
                pause = max(0.0, left) * random.uniform(0.45, 0.55)
            else:
                cap = max(0.05, min(30.0, left / 4))
                pause = random.uniform(0.02, min(cap, 0.1 * 2**failures))
            await asyncio.sleep(pause)
            try:
                key, chain, bundle = await self.request(identity)
                identity.update(key, chain, bundle)
                self.renewals += 1
                failures, expired_said = 0, False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                left = identity.not_after - time.time()
                if left < 0 and not expired_said:
                    level, expired_said = logging.ERROR, True
                else:
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "renewing the certificate of %s failed (%s); %s",
                    self.service,
                    _brief(exc),
                    "it has EXPIRED" if left < 0 else f"{left:.0f}s of validity left",
                )


def _reason(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = r.json().get("error")
        if isinstance(error, str):
            return error[:200]
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return error["message"][:200]
    return r.reason_phrase
