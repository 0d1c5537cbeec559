"""The control service's certificate authority (Istio's Citadel, in-process).

On first start it creates a self-signed root in the data dir (`ca.crt`, and `ca.key` written
0600 and never widened); later starts load them. An operator can plug the mesh into an existing
PKI instead (`ca_cert`, `ca_key`): the certificate may be an intermediate, and the file may
carry its chain up to the root, which then becomes the trust anchor handed to workloads.

It signs CSRs into short-lived SPIFFE leaves (24 h by default, 1 s at least, 30 days at most),
returned with the chain between the leaf and the root. The trust `bundle` holds every root a
workload must accept: the current one and, after a `rotate`, the previous one until its overlap
ends, so that leaves issued before the rotation keep working while processes renew. The bundle
is also written to `ca-bundle.crt`, which CLI clients use to verify the control service.

Replicas on etcd share one CA (meshlib.control.etcd_ca): the CA is then built from a
`CAMaterial` (root, key, previous roots) held in etcd, nothing of it is written to the data
dir but the bundle, and a rotation is computed here (`rotated`) and stored there; each replica
installs what etcd holds with `adopt`.

The control service's own TLS certificate (`server_credentials`) is a leaf of the same CA,
`spiffe://<trust domain>/control`, kept in `control.crt` / `control.key` and re-issued past its
half-life, after a rotation, or when asked for a host it does not cover.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlib.security import certificates as certs
from meshlib.security.files import create_private, warn_if_readable, write_private, write_public

log = logging.getLogger("meshlib.security")

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
PREVIOUS_FILE = "ca-previous.json"
BUNDLE_FILE = "ca-bundle.crt"
SERVER_CERT_FILE = "control.crt"
SERVER_KEY_FILE = "control.key"
LOCK_FILE = ".ca.lock"

DEFAULT_LIFETIME = timedelta(hours=24)
MIN_LIFETIME = timedelta(seconds=1)
MAX_LIFETIME = timedelta(days=30)
SERVER_LIFETIME = timedelta(days=30)
ROOT_LIFETIME = timedelta(days=3650)


class CAError(ValueError):
    """The CA cannot be loaded or cannot do what was asked (the message says why)."""


@dataclass(frozen=True)
class ServerCredentials:
    """The control service's own certificate (leaf + chain) and key, in memory and on disk."""

    cert_pem: bytes
    key_pem: bytes
    cert_file: Path
    key_file: Path
    not_after: float  # unix seconds
    renew_at: float  # unix seconds: half-life


@dataclass(frozen=True)
class _Previous:
    cert_pem: bytes
    until: float  # unix seconds


@dataclass(frozen=True)
class CAMaterial:
    """A CA as it is kept outside a data dir: the signer (with its chain), its key, and the
    previous roots still trusted until their overlap ends."""

    cert_pem: bytes
    key_pem: bytes
    previous: tuple[tuple[bytes, float], ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "certificate": self.cert_pem.decode("ascii"),
            "key": self.key_pem.decode("ascii"),
            "previous": [{"certificate": c.decode("ascii"), "until": u} for c, u in self.previous],
        }

    @classmethod
    def from_json(cls, data: object) -> CAMaterial:
        if not isinstance(data, dict):
            raise CAError("CA material is not a JSON object")
        try:
            previous = tuple(
                (str(p["certificate"]).encode("ascii"), float(p["until"])) for p in data.get("previous", [])
            )
            return cls(str(data["certificate"]).encode("ascii"), str(data["key"]).encode("ascii"), previous)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CAError(f"CA material is incomplete: {exc!r}") from None

    @classmethod
    def create(cls, trust_domain: str) -> CAMaterial:
        """A new self-signed root for `trust_domain`."""
        cert_pem, key_pem = certs.create_ca(trust_domain, lifetime=ROOT_LIFETIME)
        return cls(cert_pem, key_pem)


class CertificateAuthority:
    """Signs workload certificates for one trust domain; see the module docstring."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        trust_domain: str = certs.DEFAULT_TRUST_DOMAIN,
        ca_cert: str | Path | None = None,
        ca_key: str | Path | None = None,
        default_lifetime: timedelta = DEFAULT_LIFETIME,
        max_lifetime: timedelta = MAX_LIFETIME,
        clock: Callable[[], float] = time.time,
        material: CAMaterial | None = None,
    ) -> None:
        certs.spiffe_id(trust_domain, "x")  # ValueError for a trust domain that cannot be in an id
        if (ca_cert is None) != (ca_key is None):
            raise CAError("an operator CA needs both its certificate and its key (ca_cert and ca_key)")
        if material is not None and ca_cert is not None:
            raise CAError("a CA comes from the operator's files or from shared material, not both")
        self.data_dir = Path(data_dir)
        self.trust_domain = trust_domain
        self.default_lifetime = default_lifetime
        self.max_lifetime = max_lifetime
        self.operator = ca_cert is not None
        self.shared = material is not None
        """Held elsewhere (etcd): installed with `adopt`, rotated by whoever holds it."""
        self._clock = clock
        self._lock = threading.RLock()
        self._previous: list[_Previous] = []
        self._server: ServerCredentials | None = None
        self._server_hosts: tuple[str, ...] = ()
        self.generation = 0
        """Incremented whenever the signing CA or the bundle changes (for TLS contexts to follow)."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._file_lock():
            if material is not None:
                self._install(material)
            elif ca_cert is not None and ca_key is not None:
                self._load_operator(Path(ca_cert), Path(ca_key))
            else:
                self._load_or_create()
                self._load_previous()
        self._bundle_written = b""
        self.write_bundle()

    # -- signing ------------------------------------------------------------------------------

    def sign(
        self,
        csr_pem: bytes | str,
        service: str,
        lifetime: timedelta | float | None = None,
        *,
        dns_names: Sequence[str] = (),
    ) -> bytes:
        """A leaf for `service` (SPIFFE id `spiffe://<td>/svc/<service>`, its one URI SAN) from a
        CSR, followed by the chain up to (not including) the root. The leaf also names the
        service's `certs.service_dns_name`, which gRPC clients verify as the host name: the CA
        is the only one that puts it there, and only for the service it signs for. ValueError
        for a bad CSR, service or lifetime."""
        spiffe = certs.spiffe_id(self.trust_domain, service)
        names = [certs.service_dns_name(service), *dns_names]
        return self._issue(csr_pem, spiffe, lifetime, names)

    def spiffe_id(self, service: str) -> str:
        return certs.spiffe_id(self.trust_domain, service)

    def lifetime(self, value: timedelta | float | None) -> timedelta:
        """A requested lifetime, checked (at least 1 s) and capped at `max_lifetime`."""
        if value is None:
            return min(self.default_lifetime, self.max_lifetime)
        if not isinstance(value, timedelta):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError("lifetime must be a number of seconds")
            if value > self.max_lifetime.total_seconds():
                return self.max_lifetime
            value = timedelta(seconds=value)
        if value < MIN_LIFETIME:
            raise ValueError(f"lifetime must be at least {MIN_LIFETIME.total_seconds():g} second")
        return min(value, self.max_lifetime)

    def _issue(
        self,
        csr_pem: bytes | str,
        spiffe: str,
        lifetime: timedelta | float | None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> bytes:
        life = self.lifetime(lifetime)
        data = csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else csr_pem
        with self._lock:
            signer, key, chain = self._signer_pem, self._key_pem, self._chain_pem
        leaf = certs.issue(
            signer, key, data, spiffe_id=spiffe, dns_names=dns_names, ip_addresses=ip_addresses, lifetime=life
        )
        return leaf + chain

    # -- trust --------------------------------------------------------------------------------

    @property
    def bundle(self) -> bytes:
        """PEM of every root a workload must trust now (current first, then previous ones)."""
        now = self._clock()
        with self._lock:
            parts = [self._roots_pem] + [p.cert_pem for p in self._previous if now < p.until]
        return b"".join(parts)

    @property
    def root_pem(self) -> bytes:
        """The current trust anchor(s) alone, without previous roots."""
        return self._roots_pem

    @property
    def signer_pem(self) -> bytes:
        """The certificate that signs leaves (the root, or the operator's intermediate)."""
        return self._signer_pem

    def next_change(self) -> float | None:
        """When the bundle next changes on its own (a previous root's overlap ends), or None."""
        now = self._clock()
        pending = [p.until for p in self._previous if p.until > now]
        return min(pending) if pending else None

    def write_bundle(self) -> bool:
        """Write `ca-bundle.crt` if the bundle changed (dropping ended overlaps); True if written."""
        bundle = self.bundle
        with self._lock:
            if bundle == self._bundle_written:
                return False
            now = self._clock()
            ended = [p for p in self._previous if now >= p.until]
            if ended:
                self._previous = [p for p in self._previous if now < p.until]
                if not self.operator and not self.shared:
                    self._save_previous()
            write_public(self.data_dir / BUNDLE_FILE, bundle)
            self._bundle_written = bundle
        return True

    # -- rotation -----------------------------------------------------------------------------

    def rotate(self, overlap: timedelta | float = timedelta(hours=1)) -> None:
        """Replace the root (and its key) with a new one; new leaves are signed by the new key.

        The old root stays in the bundle for `overlap` so that leaves it signed keep verifying
        until processes have renewed: give at least the leaf lifetime in use. Roots from earlier
        rotations stay at most as long, so `overlap=0` trusts the new root alone at once (after a
        compromise). An operator's CA is the operator's to rotate (restart with the new one)."""
        if self.shared:
            raise CAError("this CA is shared by replicas: rotate it through the store that holds it")
        with self._file_lock(), self._lock:
            new = self.rotated(self.material(), overlap)
            self._previous = [_Previous(c, u) for c, u in new.previous]
            self._save_previous()  # first: a crash after this leaves the old root trusted
            write_private(self.data_dir / CA_KEY_FILE, new.key_pem)
            write_public(self.data_dir / CA_CERT_FILE, new.cert_pem)
            self._set_current(new.cert_pem, new.key_pem)
            self._server = None
            self.generation += 1
        self.write_bundle()
        log.info(
            "CA rotated: new root %s; the previous root stays trusted for %ds",
            _fingerprint(new.cert_pem),
            _overlap(overlap).total_seconds(),
        )

    def rotated(self, current: CAMaterial, overlap: timedelta | float) -> CAMaterial:
        """The material after rotating `current`: a new root, and the old one in the previous
        roots for `overlap` (see `rotate`). Nothing is installed."""
        span = _overlap(overlap)
        if self.operator:
            raise CAError("this CA was given by the operator (ca_cert/ca_key): rotate it in its own PKI")
        now = self._clock()
        old_root = certs.cert_pem(certs.load_pem_chain(current.cert_pem)[-1])
        old_cert = certs.load_pem_chain(old_root)[0]
        until = min(now + span.total_seconds(), old_cert.not_valid_after_utc.timestamp())
        # earlier roots still in their overlap get at most this one's (0: trust only the new root)
        previous = [(c, min(u, until)) for c, u in current.previous]
        previous = [(c, u) for c, u in previous if now < u]
        if until > now:
            previous.append((old_root, until))
        fresh = CAMaterial.create(self.trust_domain)
        return CAMaterial(fresh.cert_pem, fresh.key_pem, tuple(previous))

    def material(self) -> CAMaterial:
        """The CA as it is now (its key included: keep it secret)."""
        now = self._clock()
        with self._lock:
            previous = tuple((p.cert_pem, p.until) for p in self._previous if now < p.until)
            return CAMaterial(self._signer_pem + self._chain_pem_above_signer, self._key_pem, previous)

    def adopt(self, material: CAMaterial) -> bool:
        """Install shared material (another replica rotated); True if it changed anything."""
        now = self._clock()
        live = tuple((c, u) for c, u in material.previous if now < u)
        with self._lock:
            if CAMaterial(material.cert_pem, material.key_pem, live) == self.material():
                return False
            self._install(material)
            self._server = None
            self.generation += 1
        self.write_bundle()
        log.info("CA: now signing with root %s", _fingerprint(self._roots_pem))
        return True

    def _install(self, material: CAMaterial) -> None:
        self._set_current(material.cert_pem, material.key_pem)
        for cert_pem, _ in material.previous:
            certs.load_pem_chain(cert_pem)  # ValueError for junk
        now = self._clock()
        self._previous = [_Previous(c, u) for c, u in material.previous if now < u]

    # -- the control service's own certificate ------------------------------------------------

    def server_credentials(self, hosts: Sequence[str] = ()) -> ServerCredentials:
        """The control service's TLS certificate, for localhost, 127.0.0.1, ::1 and `hosts`,
        re-issued when missing, signed by a previous CA, past half-life or not covering a host."""
        wanted = _hosts(hosts)
        with self._lock:
            current = self._server
            now = self._clock()
            if current is not None and now < current.renew_at and set(wanted) <= set(self._server_hosts):
                return current
            if current is None:
                current = self._load_server(now, wanted)
            if current is None or now >= current.renew_at or not set(wanted) <= set(self._server_hosts):
                current = self._issue_server(wanted)
            self._server = current
            return current

    def _load_server(self, now: float, wanted: tuple[str, ...]) -> ServerCredentials | None:
        cert_file, key_file = self.data_dir / SERVER_CERT_FILE, self.data_dir / SERVER_KEY_FILE
        try:
            cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
            chain = certs.load_pem_chain(cert_pem)
            key = certs.load_key_pem(key_pem)
        except (OSError, ValueError):
            return None
        leaf = chain[0]
        signer = certs.load_pem_chain(self._signer_pem)[0]
        try:
            leaf.verify_directly_issued_by(signer)
        except Exception:  # InvalidSignature, or a name mismatch (ValueError)
            return None
        if leaf.public_key() != key.public_key():  # type: ignore[attr-defined]
            return None
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return None
        ips = (str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        have = {*san.get_values_for_type(x509.DNSName), *ips}
        if not set(wanted) <= have:
            return None
        self._server_hosts = tuple(sorted(have))
        return _credentials(cert_pem, key_pem, cert_file, key_file, leaf)

    def _issue_server(self, wanted: tuple[str, ...]) -> ServerCredentials:
        hosts = tuple(sorted({*wanted, *self._server_hosts}))
        key = certs.generate_key()
        key_pem = certs.key_pem(key)
        dns = [h for h in hosts if not _is_ip(h)]
        ips = [h for h in hosts if _is_ip(h)]
        spiffe = f"{certs.SCHEME}{self.trust_domain}/control"
        csr = certs.make_csr(key, "control")
        cert_pem = self._issue(csr, spiffe, SERVER_LIFETIME.total_seconds(), dns, ips)
        cert_file, key_file = self.data_dir / SERVER_CERT_FILE, self.data_dir / SERVER_KEY_FILE
        write_private(key_file, key_pem)
        write_private(cert_file, cert_pem)
        self._server_hosts = hosts
        log.info("issued the control service's certificate for %s", ", ".join(hosts))
        return _credentials(cert_pem, key_pem, cert_file, key_file, certs.load_pem_chain(cert_pem)[0])

    # -- loading ------------------------------------------------------------------------------

    def _set_current(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Install a CA: `cert_pem` is the signer followed by any chain up to its root."""
        try:
            chain = certs.load_pem_chain(cert_pem)
        except ValueError as exc:
            raise CAError(f"the CA certificate is not PEM: {exc}") from None
        try:
            key = certs.load_key_pem(key_pem)
        except ValueError as exc:
            raise CAError(f"the CA key: {exc}") from None
        signer = chain[0]
        if signer.public_key() != key.public_key():  # type: ignore[attr-defined]
            raise CAError("the CA key does not match the CA certificate (the first one in its file)")
        try:
            constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError("the CA certificate is not a CA (BasicConstraints ca=true is required)")
        for child, parent in itertools.pairwise(chain):
            try:
                child.verify_directly_issued_by(parent)
            except Exception as exc:
                raise CAError(
                    f"the CA certificate file is not a chain: {child.subject.rfc4514_string()} "
                    f"is not issued by the next certificate ({type(exc).__name__})"
                ) from None
        top = chain[-1]
        if top.issuer != top.subject:
            log.warning(
                "the CA chain ends at %s, which is not self-signed: workloads will trust it as a "
                "root (include the chain up to the root in the CA certificate file to avoid this)",
                top.subject.rfc4514_string(),
            )
        now = self._clock()
        if signer.not_valid_after_utc.timestamp() <= now:
            raise CAError(f"the CA certificate expired on {signer.not_valid_after_utc:%Y-%m-%d %H:%M}Z")
        self._signer_pem = certs.cert_pem(signer)
        self._chain_pem_above_signer = b"".join(certs.cert_pem(c) for c in chain[1:])
        self._key_pem = key_pem
        # leaves carry every certificate between them and the root; the root is in the bundle
        self._chain_pem = b"".join(certs.cert_pem(c) for c in chain if c.issuer != c.subject)
        self._roots_pem = certs.cert_pem(top)

    def _load_or_create(self) -> None:
        cert_file, key_file = self.data_dir / CA_CERT_FILE, self.data_dir / CA_KEY_FILE
        if not key_file.exists():
            cert_pem, key_pem = certs.create_ca(self.trust_domain, lifetime=ROOT_LIFETIME)
            if create_private(key_file, key_pem):
                write_public(cert_file, cert_pem)
                log.info("created a new root CA for %s in %s", self.trust_domain, self.data_dir)
        try:
            key_pem = key_file.read_bytes()
            cert_pem = cert_file.read_bytes()
        except OSError as exc:
            raise CAError(f"cannot read the CA in {self.data_dir}: {exc.strerror or exc}") from None
        warn_if_readable(key_file)
        self._set_current(cert_pem, key_pem)

    def _load_operator(self, cert_file: Path, key_file: Path) -> None:
        try:
            cert_pem = cert_file.read_bytes()
            key_pem = key_file.read_bytes()
        except OSError as exc:
            raise CAError(f"cannot read the operator's CA: {exc.strerror or exc}: {exc.filename}") from None
        warn_if_readable(key_file)
        self._set_current(cert_pem, key_pem)
        log.info("using the operator's CA %s (%s)", cert_file, _fingerprint(self._signer_pem))

    def _load_previous(self) -> None:
        path = self.data_dir / PREVIOUS_FILE
        try:
            items = json.loads(path.read_text(encoding="utf-8"))["previous"]
            previous = [_Previous(str(i["certificate"]).encode("ascii"), float(i["until"])) for i in items]
            for p in previous:
                certs.load_pem_chain(p.cert_pem)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return
        now = self._clock()
        self._previous = [p for p in previous if now < p.until]

    def _save_previous(self) -> None:
        items = [{"certificate": p.cert_pem.decode("ascii"), "until": p.until} for p in self._previous]
        write_public(self.data_dir / PREVIOUS_FILE, json.dumps({"previous": items}, indent=1).encode())

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Serialise CA creation and rotation between processes sharing a data dir."""
        try:
            import fcntl
        except ImportError:  # not POSIX: creation still cannot race thanks to create_private
            yield
            return
        with open(self.data_dir / LOCK_FILE, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def __repr__(self) -> str:
        kind = "operator" if self.operator else "own"
        return f"CertificateAuthority({self.trust_domain!r}, {kind} root {_fingerprint(self._roots_pem)})"


def _overlap(overlap: timedelta | float) -> timedelta:
    if not isinstance(overlap, timedelta):
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
            raise ValueError("overlap must be a number of seconds")
        if not math.isfinite(overlap):
            raise ValueError("overlap must be a number of seconds")
        overlap = timedelta(seconds=overlap)
    if overlap < timedelta(0) or overlap > timedelta(days=3650):
        raise ValueError("overlap must be from 0 seconds to 10 years")
    return overlap


def _credentials(
    cert_pem: bytes, key_pem: bytes, cert_file: Path, key_file: Path, leaf: x509.Certificate
) -> ServerCredentials:
    start = leaf.not_valid_before_utc.timestamp()
    end = leaf.not_valid_after_utc.timestamp()
    return ServerCredentials(cert_pem, key_pem, cert_file, key_file, end, start + (end - start) / 2)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    out = {"localhost", "127.0.0.1", "::1"}
    for host in hosts:
        h = host.strip().strip("[]").lower()
        if not h or h in ("0.0.0.0", "::"):  # a wildcard bind address is not a name to verify
            continue
        if _is_ip(h):
            h = str(ipaddress.ip_address(h))
        out.add(h)
    return tuple(sorted(out))


def _fingerprint(pem: bytes) -> str:
    """A short, non-secret name for a certificate: sha256 of its DER, first 16 hex digits."""
    cert = certs.load_pem_chain(pem)[0]
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]
