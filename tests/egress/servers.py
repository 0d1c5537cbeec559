"""Real servers outside the mesh for the egress tests: a plain recorder, and an HTTPS one with
its own CA (made here) that records the SNI each handshake asked for."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshlib.listening import bind
from meshlib.testing import RunningServer


class Recorder:
    """An ASGI app that answers 200 with the path and records what each request carried."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        with self.lock:
            self.seen.append(
                {"path": scope["path"], "query": scope["query_string"].decode(), "scheme": scope["scheme"],
                 "headers": headers}
            )  # fmt: skip
        body = scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    """A throwaway CA; `issue` makes a server certificate for DNS names, signed by it."""

    name: str = "egress test CA"
    key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(self.name))
            .issuer_name(_name(self.name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, *names: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server answering to `names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class TLSServer:
    """An HTTPS server on 127.0.0.1; `snis` lists the server names the handshakes asked for."""

    running: RunningServer
    app: Recorder
    snis: list[str | None]

    @property
    def address(self) -> str:
        return self.running.address


@contextmanager
def tls_server(ca: CA, directory: Path, *names: str) -> Iterator[TLSServer]:
    """A uvicorn HTTPS server with a certificate for `names` from `ca`."""
    cert, key = ca.issue(*names)
    (directory / "server.crt").write_bytes(cert)
    (directory / "server.key").write_bytes(key)
    app = Recorder()
    snis: list[str | None] = []
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=1,
        ssl_certfile=str(directory / "server.crt"),
        ssl_keyfile=str(directory / "server.key"),
    )
    config.load()
    assert config.ssl is not None

    def record(sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        snis.append(name)

    config.ssl.sni_callback = record
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the TLS server did not start"
        time.sleep(0.005)
    running = RunningServer("127.0.0.1", sock.getsockname()[1], server, thread, sock)
    try:
        yield TLSServer(running, app, snis)
    finally:
        running.stop()
