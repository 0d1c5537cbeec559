"""This process's workload identity: its key, its certificate, the trust bundle, and the TLS
contexts built from them; and the enrolment that obtains and renews it from the control CA.

The private key is generated here and never leaves the process: it is never written to disk
(`tls.load_chain` hands it to OpenSSL through an anonymous memory file) nor logged, and each
renewal makes a new one. Certificates are renewed at half-life on the Mesh's runtime loop,
with jittered retries; each change (a renewal, a new bundle) builds fresh contexts and swaps
them in, and every new connection switches to the newest ones at its handshake, so neither a
renewal nor a CA rotation drops a request or needs a restart.

Every renewal is made with the join token (the CA signs nothing without one). The certificate is
presented to the control service as well only while it can pass its handshake: not once it has
expired, nor once the bundle no longer holds its root (a rotation without overlap), when the
token alone gets the next one; the watch link shares that context, so it reconnects with the
token alone too until then.
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
from collections.abc import Awaitable, Callable, Mapping
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
    issued_by,
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
RETRY_FIRST = 0.1  # the first pause after a failed renewal (s), doubling from there
RETRY_MIN = 0.05  # the shortest cap, near the end of the certificate's validity
RETRY_CAP = 30.0  # the longest pause between two attempts, and the one once the certificate is useless
_GENERATIONS = itertools.count(1)  # one number per installed material, process-wide
# a connection dropped after the handshake: how TLS 1.3 may say that our certificate was refused
_DROPPED = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


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
    trusted: bool  # the chain reaches a root of the bundle (False after a rotation without overlap)


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
        trusted=_chains_to(chain, roots),
    )


def _chains_to(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> bool:
    """Whether chain[0] reaches one of `roots` through the certificates of `chain` (signatures
    only: validity is the caller's business)."""
    anchors = {_der(r) for r in roots}
    current = chain[0]
    for _ in range(len(chain)):
        if _der(current) in anchors or any(issued_by(current, r) for r in roots):
            return True
        parent = next((c for c in chain[1:] if c is not current and issued_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


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
    mTLS, `control_context` verifies the control service by hostname (presenting the
    certificate while it is usable); contexts already handed out follow every later change.
    Build one with `from_pem`/`from_files` (an operator's own certificate files), or let
    `Enrollment` obtain one from the control service's CA.
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
        self._anonymous: ssl.SSLContext | None = None
        self._presenting = False  # whether the control context presents the certificate
        self._listeners: list[Callable[[], None]] = []
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

    @property
    def trusted(self) -> bool:
        """Whether the certificate chains to a root of the current bundle: False once a CA
        rotation without overlap left its root out (peers and the control service refuse it)."""
        return self._material.trusted

    def usable(self, now: float | None = None) -> bool:
        """Whether peers and the control service can accept the certificate: not expired, and
        chaining to the bundle."""
        m = self._material
        return m.trusted and (time.time() if now is None else now) < m.not_after

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
        """For the control service: hostname verification against the bundle and the anchors,
        presenting the certificate while it is usable (see `withdraw`): an expired or untrusted
        one would fail the control service's handshake, where the join token alone still gets
        through."""
        assert self._control.current is not None
        return self._control.current

    @property
    def anonymous_control_context(self) -> ssl.SSLContext:
        """For the control service, presenting no certificate: the join token is then the only
        proof (a renewal whose certificate the control service refused)."""
        assert self._anonymous is not None
        return self._anonymous

    @property
    def presents_to_control(self) -> bool:
        """Whether `control_context` presents the certificate now."""
        return self._presenting

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
        anchors = m.bundle_pem + self._anchors
        present = m.trusted and time.time() < m.not_after
        if present:
            control = tls.control_context(anchors, m.chain_pem, pem, slot=self._control)
        else:
            control = tls.control_context(anchors, slot=self._control)
        anonymous = tls.control_context(anchors)
        servers = {
            strict: tls.server_context(m.chain_pem, pem, m.bundle_pem, require_client_cert=strict)
            for strict, slot in self._servers.items()
            if slot.current is not None
        }
        self._client.current = client
        self._control.current = control
        self._anonymous = anonymous
        self._presenting = present
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
        self._changed()

    def withdraw(self, now: float | None = None) -> bool:
        """Stop presenting the certificate to the control service if it is no longer usable
        (expired, or its root left the bundle): the join token alone then proves who we are,
        and the watch link, which shares the context, keeps reaching the control service.
        True if it was withdrawn now. The next certificate is presented again."""
        with self._lock:
            if not self._presenting or self.usable(now):
                return False
            m = self._material
            self._control.current = tls.control_context(m.bundle_pem + self._anchors, slot=self._control)
            self._presenting = False
        log.info(
            "the certificate of %s is %s: the control service gets the join token alone until a new one",
            m.spiffe_id,
            "no longer trusted" if not m.trusted else "expired",
        )
        return True

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener()` after every change (renewal, bundle), on the thread that made it;
        returns the function that unsubscribes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.exception("an identity listener failed")

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
        if not m.trusted and old.trusted:  # renewed at once by an enrolment (a listener)
            log.log(
                logging.INFO if self._listeners else logging.WARNING,
                "the new trust bundle no longer holds the root of the certificate of %s (a CA "
                "rotation without overlap): peers refuse it %s",
                m.spiffe_id,
                "until it is renewed, now" if self._listeners else "until a new one is installed",
            )
        self._changed()
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
    (`POST /v1/ca/sign`), then keeps it renewed at half-life, with the token every time.

    `clock` (unix seconds) and `sleep` are for tests: the renewal schedule follows them."""

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
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        # the replicas (every one can sign) and the one in use, shared with the Mesh's link
        self.endpoints = control if isinstance(control, ControlEndpoints) else ControlEndpoints(control)
        self.service = service
        self.trust_domain = trust_domain
        self.expected = spiffe_id(trust_domain, service)  # ValueError for a bad service name
        self.lifetime = lifetime
        self.renewals = 0
        self.failures = 0  # of the current streak of failed renewals
        self.late_failures = 0  # of those, the ones made with a certificate of no use any more
        self._token = token
        self._anchors = anchors
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep

    def __repr__(self) -> str:  # never the token
        return f"Enrollment({self.url!r}, service={self.service!r})"

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    async def request(self, identity: Identity | None = None) -> tuple[Any, bytes, bytes]:
        """A new key and its certificate: (key, chain PEM, bundle PEM). IdentityError when the
        CA refuses; httpx.HTTPError when it cannot be reached (worth retrying).

        The join token goes with every request. Over https the current certificate goes as
        well while it is usable; an expired or untrusted one is left out, and one the control
        service's handshake refuses is left out of a second try at once: the token alone then
        renews it (after a rotation without overlap, or an expiry while the CA was down)."""
        key = generate_key()
        body: dict[str, Any] = {"csr": make_csr(key, self.service).decode("ascii"), "service": self.service}
        if self.lifetime is not None:
            body["lifetime"] = self.lifetime
        url = self.url
        options = control_options(url, token=self._token, identity=identity, anchors=self._anchors)
        present = False
        if identity is not None and "verify" in options:
            present = identity.presents_to_control and identity.usable(self._clock())
            if not present:
                options["verify"] = identity.anonymous_control_context
        try:
            try:
                r = await self._post(url, body, options)
            except httpx.TransportError as exc:
                # refused in the handshake (TLS 1.2), or, TLS 1.3 checking a client certificate
                # after the client's part of the handshake, by an alert or a bare close later on
                refused = refused_by_tls(exc) or isinstance(exc, _DROPPED)
                if not present or not refused:
                    raise
                assert identity is not None
                log.info(
                    "the control service refused the certificate of %s (%s); trying the join token alone",
                    self.service,
                    _brief(exc),
                )
                options["verify"] = identity.anonymous_control_context
                r = await self._post(url, body, options)
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
        if not m.trusted:
            raise IdentityError("the CA issued a certificate that does not chain to the bundle it sent")
        return key, chain, bundle

    async def _post(self, url: str, body: dict[str, Any], options: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(timeout=self._timeout, **options) as http:
            return await http.post(f"{url}{SIGN_PATH}", json=body)

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

    def pause(self, identity: Identity) -> float:
        """How long to wait before the next renewal attempt.

        After a success: half of the remaining validity (±5%), or none when the certificate is
        untrusted (a rotation without overlap). After failed attempts: a step from 0.1 s
        doubling with each failure, the pause jittered between half and all of it. While the
        certificate is valid the step is at most a quarter of the remaining validity (so that a
        few attempts fit before it ends) and 30 s; once it is of no use any more (expired, or
        untrusted) the doubling starts again from 0.1 s, up to 30 s: a fleet whose certificates
        expired while the control service was down neither hammers it (an attempt per process
        every 22 s on average) nor waits long if it is back soon."""
        left = identity.not_after - self._clock()
        if self.failures == 0:
            if not identity.trusted:
                return 0.0
            return max(0.0, left) * random.uniform(0.45, 0.55)
        if left <= 0 or not identity.trusted:
            step = min(RETRY_CAP, RETRY_FIRST * 2.0 ** min(max(0, self.late_failures - 1), 32))
        else:
            cap = max(RETRY_MIN, min(RETRY_CAP, left / 4))
            step = min(cap, RETRY_FIRST * 2.0 ** min(self.failures - 1, 32))
        return random.uniform(step / 2, step)

    async def renew_forever(self, identity: Identity) -> None:
        """Renew at half of the remaining lifetime (±5%), retrying failures with a jittered
        exponential backoff (`pause`), and at once when a new bundle leaves the certificate's
        root out. A streak of failures logs one WARNING, and one more if the certificate
        expires meanwhile; the retries log at DEBUG, the recovery at INFO."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:  # on the thread that changed the identity
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
                loop.call_soon_threadsafe(changed.set)

        unsubscribe = identity.subscribe(wake)
        warned = expired_said = False
        try:
            while True:
                changed.clear()
                await self._wait(self.pause(identity), changed, identity)
                identity.withdraw(self._clock())  # expired or untrusted: the token alone from now on
                try:
                    key, chain, bundle = await self.request(identity)
                    identity.update(key, chain, bundle)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures += 1
                    left = identity.not_after - self._clock()
                    if left <= 0 or not identity.trusted:
                        self.late_failures += 1
                    level = logging.DEBUG
                    if not warned or (left <= 0 and not expired_said):
                        level, warned = logging.WARNING, True
                        expired_said = expired_said or left <= 0
                    log.log(
                        level,
                        "renewing the certificate of %s failed (%s); %s",
                        self.service,
                        _brief(exc),
                        "it has EXPIRED: peers refuse it until it is renewed; retrying, with pauses "
                        f"of up to {RETRY_CAP:.0f}s"
                        if left <= 0
                        else f"{left:.0f}s of validity left; retrying",
                    )
                    continue
                if self.failures:
                    log.info(
                        "certificate of %s renewed after %d failed attempt(s)", self.service, self.failures
                    )
                self.renewals += 1
                self.failures, self.late_failures, warned, expired_said = 0, 0, False, False
        finally:
            unsubscribe()

    async def _wait(self, pause: float, changed: asyncio.Event, identity: Identity) -> None:
        """Sleep `pause` seconds, or less if a change (a new bundle) leaves the certificate
        untrusted: then it is renewed at once."""
        sleeper = asyncio.ensure_future(self._sleep(pause))
        try:
            while True:
                waiter = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if sleeper.done():
                    return
                changed.clear()
                if not identity.trusted:
                    return
        finally:
            sleeper.cancel()


def _reason(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = r.json().get("error")
        if isinstance(error, str):
            return error[:200]
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return error["message"][:200]
    return r.reason_phrase
