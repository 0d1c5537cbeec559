"""An HTTPS listener's certificates, chosen by the client's SNI name.

One `ssl.SSLContext` per certificate; the listener's own context serves the first (the
default, for clients that send no SNI or a name no certificate lists) and its `sni_callback`
switches the connection to the context of the name asked for. `update` loads new files into
new contexts and swaps them in: connections already open keep the certificate they got, new
ones get the new one, and the listener never restarts.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshlib.gateway.hosts import HostSet

if TYPE_CHECKING:
    from meshlib.rules import TlsCertificateSpec

log = logging.getLogger("meshlib.gateway")

ALPN = ["http/1.1"]  # uvicorn's h11 protocol: say so, so that clients do not try h2


def _context(spec: TlsCertificateSpec) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    ctx.load_cert_chain(spec.certificate, spec.key)
    return ctx


class SniCertificates:
    """The contexts of one listener; `context` is what the listener serves with."""

    def __init__(self, specs: Sequence[TlsCertificateSpec]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(ALPN)
        self.context.sni_callback = self._pick
        self._specs: tuple[TlsCertificateSpec, ...] = ()
        self._stamps: tuple[tuple[int, int] | None, ...] = ()
        self._by_host: list[tuple[HostSet, ssl.SSLContext]] = []
        self.update(specs)

    def update(self, specs: Sequence[TlsCertificateSpec]) -> None:
        """Load `specs` (unchanged ones too: a renewed file under the same path is picked up);
        an unreadable file raises, and the contexts in force stay."""
        specs = tuple(specs)
        stamps = _stamps(specs)
        contexts = [(HostSet(spec.hosts), _context(spec)) for spec in specs]
        first = specs[0]
        self.context.load_cert_chain(first.certificate, first.key)  # the default, for new connections
        self._by_host = contexts
        self._specs = specs
        self._stamps = stamps

    def stale(self) -> bool:
        """Whether a certificate or key file changed since it was loaded (a renewal in place)."""
        return _stamps(self._specs) != self._stamps

    @property
    def specs(self) -> tuple[TlsCertificateSpec, ...]:
        return self._specs

    def pick(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name: an exact name first, then the longest wildcard."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        best, score = None, -1
        for hosts, ctx in self._by_host:
            s = hosts.specificity(name)
            if s > score:
                best, score = ctx, s
        return best

    def _pick(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ctx = self.pick(server_name)
        if ctx is not None:
            sock.context = ctx
        return None


def _stamps(specs: Sequence[TlsCertificateSpec]) -> tuple[tuple[int, int] | None, ...]:
    """(mtime, size) of every file, None for one that cannot be read: what tells a renewal."""
    out: list[tuple[int, int] | None] = []
    for spec in specs:
        for path in (spec.certificate, spec.key):
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)
