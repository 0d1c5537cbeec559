"""A stand-in for an external payments API: HTTPS on 127.0.0.1, with a CA of its own.

    python examples/egress/payments_api.py --port 8443 --certs examples/egress/certs

It makes a CA and a certificate for `payments.example` signed by it, writes the CA to
`<certs>/ca.pem` (what mesh.yaml's `ca:` points at) and serves `POST /v2/charges` over TLS.
Nothing of the mesh runs here: this is the outside world.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HOST = "payments.example"


async def charge(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse(
        {
            "status": "authorized",
            "order": body.get("order"),
            "path": request.url.path,
            "scheme": request.url.scheme,
        }
    )


app = Starlette(routes=[Route("/v2/charges", charge, methods=["POST"])])


def make_certificates(directory: Path) -> tuple[Path, Path]:
    """A CA (written to ca.pem) and a certificate for HOST signed by it: (cert file, key file)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "payments example CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory / "server.crt", directory / "server.key"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--certs", type=Path, default=Path("examples/egress/certs"))
    args = parser.parse_args()
    cert, key = make_certificates(args.certs)
    print(f"payments API on https://127.0.0.1:{args.port} (CA in {args.certs / 'ca.pem'})", flush=True)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
