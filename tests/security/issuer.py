"""A token issuer for tests: keys made in the test, tokens signed with them, and its JWKS served
by a real uvicorn server on 127.0.0.1 that can rotate its keys, count its fetches and go down."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from meshlib.testing import serve

ISSUER = "https://auth.example.com"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = {"RS": RSAAlgorithm, "PS": RSAAlgorithm, "ES": ECAlgorithm, "Ed": OKPAlgorithm}[
            self.alg[:2]
        ]
        jwk = json.loads(algorithm.to_jwk(public))
        jwk["kid"] = self.kid
        return jwk


def rsa_key(kid: str, alg: str = "RS256") -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def ed_key(kid: str) -> SigningKey:
    return SigningKey(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in keys]}


def token(key: SigningKey, *, issuer: str = ISSUER, kid: str | None = "same", **claims: Any) -> str:
    """A token signed by `key` (its own kid unless `kid` says otherwise), valid for a minute."""
    now = int(time.time())
    payload: dict[str, Any] = {"iss": issuer, "sub": "alice", "aud": "orders", "iat": now, "exp": now + 60}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": key.kid if kid == "same" else kid} if kid is not None else {}
    return jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)


def request_authentication(service: str = "orders", **rule: Any) -> dict[str, Any]:
    jwt_rule: dict[str, Any] = {"issuer": ISSUER, "audiences": [service], **rule}
    return {"kind": "RequestAuthentication", "service": service, "jwt": [jwt_rule]}


@dataclass
class JwksServer:
    """Serves `keys` at /jwks.json; `fetches` counts GETs; `down` answers 503."""

    keys: list[SigningKey]
    cache_control: str | None = None
    down: bool = False
    fetches: int = 0
    fetched: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if self.down:
            status, body = 503, b"down"
        else:
            status, body = 200, json.dumps(jwks(*self.keys)).encode()
        headers = [(b"content-type", b"application/json")]
        if self.cache_control:
            headers.append((b"cache-control", self.cache_control.encode()))
        with self.fetched:  # counted before the answer goes: a client that has it sees the count
            self.fetches += 1
            self.fetched.notify_all()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def wait_fetches(self, n: int, timeout: float = 5.0) -> None:
        with self.fetched:
            assert self.fetched.wait_for(lambda: self.fetches >= n, timeout), (
                f"{self.fetches} fetches, not {n}"
            )


@contextmanager
def jwks_server(
    *keys: SigningKey, cache_control: str | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[JwksServer]:
    """`tls`: (certificate, key) files to serve https with (see `server_tls`)."""
    app = JwksServer(list(keys), cache_control)
    options = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls is not None else {}
    with serve(app, **options) as server:
        app.url = f"{'https' if tls else 'http'}://{server.address}/jwks.json"
        yield app


def server_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of its own and a server certificate it signs for 127.0.0.1: (CA, certificate, key)
    files, as an issuer inside a company's network would have."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("test issuer CA", ca_key, "test issuer CA", ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("127.0.0.1", key, "test issuer CA", ca_key, False)
    paths = directory / "issuer-ca.pem", directory / "issuer.pem", directory / "issuer-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths
