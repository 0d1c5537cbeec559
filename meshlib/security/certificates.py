"""SPIFFE X.509 certificates as pure functions over `cryptography` (no I/O, no state).

A workload's identity is the URI SAN `spiffe://<trust domain>/svc/<service>` of a short-lived
leaf certificate; the control service's CA issues it from a CSR, and both sides of an mTLS
connection read it back from the peer's certificate. Every workload leaf also carries one DNS
name derived from its service (`service_dns_name`), for TLS stacks that can only check host
names (grpcio): see docs/security.md, "gRPC". Everything here takes and returns PEM
bytes or `cryptography` objects so that the CA, the data plane and tests share one code path.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "mesh.local"
SCHEME = "spiffe://"
_SVC = "/svc/"
_CN_MAX = 64  # upper bound of commonName in RFC 5280
_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what TLS stacks accept
SERVICE_DNS_SUFFIX = "svc.meshlib.invalid"  # .invalid (RFC 6761) is never a real DNS name
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def spiffe_id(trust_domain: str, service: str) -> str:
    """`spiffe://<trust_domain>/svc/<service>`; ValueError for a name that cannot be a path part."""
    if not trust_domain or any(c in trust_domain for c in "/:@?#") or not trust_domain.isprintable():
        raise ValueError(f"invalid trust domain {trust_domain[:80]!r}")
    if not service or any(c in service for c in "/?#") or not service.isprintable() or " " in service:
        raise ValueError(f"invalid service name {service[:80]!r} for a SPIFFE id")
    return f"{SCHEME}{trust_domain}{_SVC}{service}"


def service_of(spiffe: str, trust_domain: str) -> str | None:
    """The service of a `spiffe://<trust_domain>/svc/<service>` id; None for any other id."""
    prefix = f"{SCHEME}{trust_domain}{_SVC}"
    if not isinstance(spiffe, str) or not spiffe.startswith(prefix):
        return None
    service = spiffe[len(prefix) :]
    if not service or any(c in service for c in "/?#") or not service.isprintable() or " " in service:
        return None
    return service


def service_dns_name(service: str) -> str:
    """The DNS name the CA puts in every leaf of `service`, next to its SPIFFE id.

    A lowercase DNS label is used as is (`orders.svc.meshlib.invalid`); any other name (capitals,
    dots, `*`, non-ASCII) is hashed one level further down (`<sha256>.hash.svc.meshlib.invalid`),
    so that no two services share a name under a case-insensitive, wildcard-aware host match."""
    if _DNS_LABEL.fullmatch(service):
        return f"{service}.{SERVICE_DNS_SUFFIX}"
    digest = hashlib.sha256(service.encode("utf-8", "surrogatepass")).hexdigest()[:60]
    return f"{digest}.hash.{SERVICE_DNS_SUFFIX}"


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new P-256 private key (small, fast, accepted by every TLS stack)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: object) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key_pem(pem: bytes | str) -> object:
    """A private key from PEM (unencrypted); ValueError if it is not one."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_pem_chain(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; ValueError if there is none."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificates(data)


def make_csr(key: object, service: str) -> bytes:
    """A PEM certificate signing request for `service` (CN = service), signed by `key`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service[:_CN_MAX])])
    )
    csr = builder.sign(key, _algorithm(key))  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def create_ca(
    trust_domain: str,
    *,
    lifetime: timedelta = timedelta(days=3650),
    key: object | None = None,
) -> tuple[bytes, bytes]:
    """A new self-signed root for a trust domain: (certificate PEM, PKCS#8 key PEM).

    Each root gets a distinct subject (a random suffix), so that during a rotation the old and
    the new root can sit in one bundle without chain building confusing them.
    """
    if key is None:
        key = generate_key()
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain[:_CN_MAX]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshlib root CA {secrets.token_hex(4)}"),
        ]
    )
    public = key.public_key()  # type: ignore[attr-defined]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _algorithm(key))  # type: ignore[arg-type]
    )
    return cert_pem(cert), key_pem(key)


def issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    csr_pem: bytes,
    *,
    spiffe_id: str,
    dns_names: Sequence[str] = (),
    lifetime: timedelta,
    not_before_skew: timedelta = timedelta(seconds=30),
    ip_addresses: Sequence[str] = (),
) -> bytes:
    """A leaf certificate (PEM) for the CSR's public key, with the given SPIFFE id.

    Nothing in the CSR but its public key is trusted: the identity comes from the caller (who
    authenticated the requester). The CSR's signature must be valid (proof that the requester
    holds the private key); ValueError otherwise, or for a CSR that is not PEM at all.
    """
    if lifetime <= timedelta(0):
        raise ValueError("the certificate lifetime must be positive")
    if not spiffe_id.startswith(SCHEME):
        raise ValueError(f"not a SPIFFE id: {spiffe_id[:80]!r}")
    csr = _load_csr(csr_pem)
    ca_cert = load_pem_chain(ca_cert_pem)[0]
    ca_key = load_key_pem(ca_key_pem)
    try:
        public = csr.public_key()
    except Exception as exc:  # ValueError, UnsupportedAlgorithm for an unknown key type
        raise ValueError(f"unsupported public key in the CSR: {exc}") from None
    if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        raise ValueError(f"unsupported public key type in the CSR: {type(public).__name__}")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name not in _CURVES:
        raise ValueError(f"unsupported curve {public.curve.name} in the CSR: use P-256, P-384 or P-521")
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        raise ValueError(f"RSA key of {public.key_size} bits in the CSR: at least 2048 are required")

    now = _now()
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans.extend(x509.DNSName(name) for name in dict.fromkeys(dns_names))
    sans.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ip_addresses))
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.rsplit("/", 1)[-1][:_CN_MAX] or "-")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - not_before_skew)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False, key_encipherment=isinstance(public, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_authority_key_id(ca_cert), critical=False)
        .sign(ca_key, _algorithm(ca_key))  # type: ignore[arg-type]
    )
    return cert_pem(cert)


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether `parent` signed `child` (its name as the issuer, a valid signature by its key)."""
    try:
        child.verify_directly_issued_by(parent)
    except Exception:  # another issuer name, a bad signature, an unsupported algorithm
        return False
    return True


def spiffe_ids_of(cert: x509.Certificate) -> list[str]:
    """Every `spiffe://` URI SAN of a certificate (normally one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # a malformed extension
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith(SCHEME)]


def spiffe_id_of_der(der: bytes) -> str | None:
    """The single SPIFFE id of a DER certificate; None if it has none, several, or is not one."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except (TypeError, ValueError):
        return None
    return _single(spiffe_ids_of(cert))


def spiffe_id_of_pem(pem: bytes | str) -> str | None:
    """The single SPIFFE id of the first certificate in PEM; None as for `spiffe_id_of_der`."""
    try:
        cert = load_pem_chain(pem)[0]
    except (TypeError, ValueError, UnicodeEncodeError):
        return None
    return _single(spiffe_ids_of(cert))


# --------------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _single(ids: list[str]) -> str | None:
    return ids[0] if len(ids) == 1 else None


def _algorithm(key: object) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def _load_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    data = csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a PEM certificate signing request: {str(exc)[:200]}") from None
    try:
        valid = csr.is_signature_valid
    except (TypeError, ValueError, x509.UnsupportedGeneralNameType) as exc:
        raise ValueError(f"cannot verify the CSR's signature: {str(exc)[:200]}") from None
    except Exception as exc:  # unsupported algorithms raise library-specific errors
        raise ValueError(f"cannot verify the CSR's signature: {type(exc).__name__}") from None
    if not valid:
        raise ValueError("the CSR's signature is invalid: it was not signed by the key it carries")
    return csr


def _key_usage(*, ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    """A root signs certificates; a leaf signs handshakes (and an RSA leaf also encrypts keys)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
