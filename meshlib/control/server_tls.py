"""Serving the control service over TLS from its own CA.

`uvicorn_tls_options(plane, hosts)` gives the keyword arguments for `uvicorn.Config`: the
server certificate and key that the plane's CA issued (files in the data dir, mode 0600), the
trust bundle as `ssl_ca_certs` with `ssl_cert_reqs=CERT_OPTIONAL` (a workload may present its
mesh certificate as its identity, and with its join token when it renews; anyone else may still
connect and show a join token), and a context factory that keeps the TLS context current
without a restart: on every handshake a server-name callback (called with or without SNI)
swaps in a context built from the current certificate and bundle when the CA rotated, the
overlap of a previous root ended, or the server certificate passed its half-life. Swapping the
context swaps the trust store too, so a root that left the bundle stops being accepted at once.

A client certificate that is presented but expired, or that no longer chains to the bundle,
fails the handshake: it is never taken as "no certificate". Workloads leave such a certificate
out (meshlib.security.identity) and renew with the join token alone.

The h11 protocol is `meshlib.security.uvicorn_tls.TLSH11Protocol`, so that the client
certificate reaches handlers in `scope["extensions"]["tls"]` (the ASGI TLS extension).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from meshlib.security.ca import BUNDLE_FILE, CertificateAuthority

if TYPE_CHECKING:
    from meshlib.control.plane import ControlPlane

log = logging.getLogger("meshlib.control")


def tls_protocol(trust_domain: str) -> type:
    """uvicorn's h11 protocol, filling `scope["extensions"]["tls"]` with the client's chain."""
    from meshlib.security.uvicorn_tls import TLSH11Protocol

    return type("ControlTLSProtocol", (TLSH11Protocol,), {"trust_domain": trust_domain})


class TLSContexts:
    """Builds the server's SSLContext and keeps it current (see the module docstring)."""

    def __init__(self, ca: CertificateAuthority, hosts: Sequence[str] = ()) -> None:
        self.ca = ca
        self.hosts = tuple(hosts)
        self._key: tuple[Any, ...] | None = None
        self._current: ssl.SSLContext | None = None
        self.swaps = 0

    def factory(self, config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """uvicorn's `ssl_context_factory`: the default context, plus the swapping callback."""
        ctx = default()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._current = ctx
        self._key = self._state()
        ctx.sni_callback = self._on_hello
        return ctx

    def context(self) -> ssl.SSLContext:
        """The context for a new handshake, rebuilt if the credentials or the bundle changed."""
        key = self._state()
        if self._current is None or key != self._key:
            self._current = self._build()
            self._key = key
            self.swaps += 1
            log.info("control: TLS context renewed (CA generation %d)", self.ca.generation)
        return self._current

    def _state(self) -> tuple[Any, ...]:
        creds = self.ca.server_credentials(self.hosts)
        self.ca.write_bundle()
        return (self.ca.generation, creds.cert_pem, self.ca.bundle)

    def _build(self) -> ssl.SSLContext:
        creds = self.ca.server_credentials(self.hosts)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(creds.cert_file, creds.key_file)
        ctx.load_verify_locations(cadata=self.ca.bundle.decode("ascii"))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.sni_callback = self._on_hello
        return ctx

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            current = self.context()
        except Exception:  # keep serving with the context in use rather than failing handshakes
            log.exception("control: cannot renew the TLS context; keeping the current one")
            return None
        if current is not ctx:
            sslobj.context = current
        return None


def uvicorn_tls_options(plane: ControlPlane, hosts: Sequence[str] = ()) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` serving `plane`'s app over TLS from its CA."""
    ca = plane.ca
    if ca is None:
        raise ValueError("security is off: create the app with security=True to serve it over TLS")
    creds = ca.server_credentials(hosts)
    ca.write_bundle()
    contexts = TLSContexts(ca, hosts)
    options: dict[str, Any] = {
        "ssl_certfile": str(creds.cert_file),
        "ssl_keyfile": str(creds.key_file),
        "ssl_ca_certs": str(ca.data_dir / BUNDLE_FILE),
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "ssl_context_factory": contexts.factory,
    }
    options["http"] = tls_protocol(ca.trust_domain)
    return options
