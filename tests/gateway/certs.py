"""Web PKI stand-ins for the gateway's tests: a CA, and server certificates for host names."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlib.security import certificates


@dataclass
class WebCA:
    """A CA that signs server certificates for DNS names, written as files under `where`."""

    where: Path

    def __post_init__(self) -> None:
        self.cert_pem, key_pem = certificates.create_ca("web.test")
        self.cert = x509.load_pem_x509_certificate(self.cert_pem)
        self.key = serialization.load_pem_private_key(key_pem, None)
        self.where.mkdir(parents=True, exist_ok=True)
        (self.where / "ca.crt").write_bytes(self.cert_pem)

    @property
    def bundle(self) -> Path:
        return self.where / "ca.crt"

    def server(self, name: str, *hosts: str) -> tuple[str, str]:
        """(certificate path, key path) of a new certificate for `hosts`, CN `name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        crt, pem = self.where / f"{name}.crt", self.where / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return str(crt), str(pem)
