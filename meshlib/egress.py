"""External hosts as the data plane sees them: what one declared port of an External means for a
call (where to connect, whether the mesh originates TLS and how it verifies the peer).

Compiled once per Snapshot from the External documents (`Snapshot.externals`); the TLS context
of an origination is made on its first call and kept for the Snapshot. No protocol here: the
HTTP transport and the gRPC channels read these objects (and share `declared_port`, the outbound
policy's check) and do the sending.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from meshlib.errors import OriginationError, OutboundBlocked

if TYPE_CHECKING:
    from collections.abc import Mapping

    from meshlib.mesh import Mesh
    from meshlib.rules.models import ExternalDoc, ExternalPort
    from meshlib.snapshot import ServicePlan

DECLARE_HINT = (
    "declare it with an External document (kind: External, service: {host}, ports: [{{port: {port}}}]) "
    "or run with Mesh(outbound='allow_any') / MESH_OUTBOUND=allow_any"
)


class OriginationUnusable(Exception):
    """An origination's `ca` cannot be read or holds no certificate: its calls fail closed."""


@dataclass(eq=False)
class Origination:
    """TLS the mesh speaks upstream for a plain-HTTP call: SNI, and the CAs it verifies with."""

    sni: str
    ca: str | None  # a PEM file's path or PEM text; None: the system's CAs
    _made: tuple[ssl.SSLContext, tuple[str, str]] | None = field(default=None, repr=False)
    _pem: bytes = field(default=b"", repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def verified_by(self) -> str:
        """The CAs in words, for error messages (never the PEM text itself)."""
        if self.ca is None:
            return "the system's CAs"
        return "the External's ca (PEM text)" if "-----BEGIN" in self.ca else f"the CA file {self.ca}"

    def prepare(self) -> tuple[ssl.SSLContext, tuple[str, str]]:
        """The client context and a key for connection pools ((sni, CA digest): two Externals at
        one address never share a connection verified for the other); made once, on first use.
        Raises `OriginationUnusable` when the CAs cannot be read."""
        made = self._made
        if made is None:
            with self._lock:
                made = self._made
                if made is None:
                    pem = _read_ca(self.ca)
                    made = (_client_context(pem), (self.sni, hashlib.sha256(pem).hexdigest()))
                    self._pem = pem
                    self._made = made
        return made

    def roots(self) -> tuple[bytes | None, tuple[str, str]]:
        """The CAs as PEM (None: the system's, which the caller finds) and the pool key of
        `prepare`, for a TLS stack that takes certificates rather than an `ssl` context (grpc).
        Raises `OriginationUnusable` as `prepare` does."""
        _, key = self.prepare()
        return (self._pem or None), key


def _read_ca(ca: str | None) -> bytes:
    if ca is None:
        return b""
    if "-----BEGIN" in ca:
        return ca.encode("ascii", "replace")
    try:
        return Path(ca).read_bytes()
    except OSError as exc:
        raise OriginationUnusable(f"cannot read the CA file {ca}: {exc.strerror}") from None


@functools.lru_cache(maxsize=64)
def _client_context(pem: bytes) -> ssl.SSLContext:
    """A verifying client context: the system's CAs for no PEM, else only those in `pem`.
    Cached by content: a rules update that keeps the CA keeps the context (loading the system
    store takes milliseconds)."""
    if not pem:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies and checks the name; no system CAs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise OriginationUnusable(f"the ca holds no usable PEM certificate ({exc})") from None
    return ctx


@dataclass(frozen=True, eq=False)
class ExternalTarget:
    """One declared port of an External host: how a call to it leaves the process."""

    host: str
    port: int  # the port the app calls
    upstream: int  # the port the mesh connects to
    origination: Origination | None


def external_targets(doc: ExternalDoc) -> dict[int, tuple[ExternalTarget, list[str]]]:
    """Per declared port: its target and the addresses to connect to (the fixed `endpoints`,
    a bare host taking the upstream port; else the host itself, resolved by DNS on connect)."""
    out: dict[int, tuple[ExternalTarget, list[str]]] = {}
    for p in doc.ports:
        target = ExternalTarget(doc.service, p.port, p.upstream, _origination(doc.service, p))
        if doc.endpoints is None:
            addresses = [f"{doc.service}:{p.upstream}"]
        else:
            addresses = [e if ":" in e.rpartition("]")[2] else f"{e}:{p.upstream}" for e in doc.endpoints]
        out[p.port] = (target, list(dict.fromkeys(addresses)))
    return out


def _origination(host: str, port: ExternalPort) -> Origination | None:
    tls = port.tls
    if tls is None:
        return None
    return Origination(sni=tls.sni or host, ca=tls.ca)


def declared_port(
    mesh: Mesh,
    ports: Mapping[int, ServicePlan],
    host: str,
    port: int,
    registry_only: bool,
    request: Any = None,
) -> ServicePlan | None:
    """The plan of port `port` of the External `host` (whose plans by port are `ports`), its
    TLS origination made ready (unusable CAs fail closed with `OriginationError`). A port the
    External does not declare is not the External's: None (sent as it is) or, under
    `registry_only`, `OutboundBlocked`. `request` goes into the errors (httpx's, or None)."""
    plan = ports.get(port)
    if plan is not None:
        check_origination(plan, request)
        return plan
    if registry_only:
        declared = ", ".join(str(p) for p in ports)
        why = f"port {port} of External {host!r} is not declared (ports: {declared})"
        block(mesh, host, port, why, f"add {{port: {port}}} to the ports of External/{host}", request)
    return None


def block(
    mesh: Mesh, host: str, port: int, why: str | None = None, hint: str | None = None, request: Any = None
) -> NoReturn:
    """Refuse a call under `registry_only`: counted as `outbound_blocked`, by host, and raised
    as `OutboundBlocked` saying how to declare the host."""
    mesh.stats.count("outbound_blocked", host)
    why = why or f"{host!r} is neither a mesh service nor an External host"
    hint = hint or DECLARE_HINT.format(host=host, port=port)
    raise OutboundBlocked(f"outbound policy registry_only: {why}; {hint}", request=request)


def check_origination(plan: ServicePlan, request: Any = None) -> None:
    """Make the External port's TLS context (once per Snapshot); unusable CAs fail closed."""
    external = plan.external
    origination = external.origination if external is not None else None
    if origination is not None:
        try:
            origination.prepare()
        except OriginationUnusable as exc:
            raise OriginationError(
                f"TLS origination to {plan.name}: {exc}; the call is refused (fails closed)", request=request
            ) from None
