"""grpcio credentials from the mesh identity: mTLS channels that verify the server's service,
and server credentials that follow every renewal without a restart.

grpcio checks a server only by host name, so the CA puts one DNS name derived from the service
(`certificates.service_dns_name`) in every leaf it issues, next to the SPIFFE id, and a channel
to a service expects that name (`grpc.ssl_target_name_override`) from a chain that verifies
against the mesh bundle alone: only a certificate the CA issued for that service passes.
See docs/security.md, "gRPC".
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from meshlib.security.certificates import load_pem_chain, service_dns_name

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.security.identity import Identity, WorkloadPem

__all__ = ["MODES", "ChannelSecurity", "channel_security", "server_credentials"]

log = logging.getLogger("meshlib.grpc")

MODES = ("STRICT", "PERMISSIVE")
TARGET_NAME_OPTION = "grpc.ssl_target_name_override"
_CACHE_LIMIT = 1024
_cache: dict[tuple[int, str], ChannelSecurity] = {}  # (id of the Identity, service) -> current


@dataclass(frozen=True)
class ChannelSecurity:
    """What a channel to one service needs: pass `credentials` and `options` to
    `grpc.secure_channel`. A channel keeps the credentials it was made with, so a pool compares
    `generation` with a fresh `channel_security(...)` and replaces its channels when it moved.
    `generation` equals `mesh.credentials.generation` at the time it was made."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, Any], ...]
    generation: object


def channel_security(mesh: Mesh, service: str) -> ChannelSecurity | None:
    """mTLS for calls to `service`: the bundle as the only roots, this workload's key and chain,
    and the service's DNS name as the name the server's certificate must hold. None when the
    Mesh has no identity (plaintext channels).

    Cheap enough to call per RPC: the same object comes back until the identity changes
    (generations are unique in the process, so a recycled `id` cannot return a stale one)."""
    identity = mesh.credentials
    if identity is None:
        return None
    key = (id(identity), service)
    cached = _cache.get(key)
    if cached is not None and cached.generation == identity.generation:
        return cached
    pem = identity.pem()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem.bundle_pem, private_key=pem.key_pem, certificate_chain=pem.chain_pem
    )
    options = ((TARGET_NAME_OPTION, service_dns_name(service)),)
    security = ChannelSecurity(credentials, options, pem.generation)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[key] = security
    return security


def server_credentials(mesh: Mesh, mode: str = "STRICT") -> grpc.ServerCredentials:
    """Credentials for `server.add_secure_port`: the current certificate, re-read at each new
    connection's handshake (renewals and bundle changes apply without a restart), and a client
    certificate that verifies against the bundle required.

    STRICT and PERMISSIVE give the same TLS port: grpcio can require a client certificate or
    not ask for one, but not ask and accept its absence, and not asking would strip mesh
    callers of their identity. PERMISSIVE's plaintext callers get a second port of their own
    (`add_insecure_port`, whose callers have no identity). ValueError for another mode or a
    Mesh without identity."""
    upper = mode.upper() if isinstance(mode, str) else mode
    if upper not in MODES:
        raise ValueError(f"gRPC server credentials are for mtls STRICT or PERMISSIVE, not {mode!r}")
    identity = mesh.credentials
    if identity is None:
        raise ValueError(f"mtls={upper} needs an identity (credentials=, or control= with a join token)")
    _warn_without_service_name(identity)
    fetcher = _Fetcher(identity)
    return grpc.dynamic_ssl_server_credentials(fetcher.initial, fetcher, require_client_authentication=True)


class _Fetcher:
    """grpcio calls this before every new connection's handshake: a new configuration when the
    identity changed since the last one, else None (keep the current one)."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._lock = threading.Lock()
        pem = identity.pem()
        self._generation = pem.generation
        self.initial = _configuration(pem)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        if self._identity.generation == self._generation:
            return None
        with self._lock:  # handshakes may run on several threads; the first one installs it
            pem = self._identity.pem()
            if pem.generation == self._generation:
                return None
            try:
                configuration = _configuration(pem)
            except Exception as exc:  # keep serving the previous certificate rather than none
                log.warning("cannot load the renewed certificate into grpc: %s", type(exc).__name__)
                return None
            self._generation = pem.generation
        log.debug("gRPC server: serving certificate generation %d", pem.generation)
        return configuration


def _warn_without_service_name(identity: Identity) -> None:
    """A certificate without its service's DNS name (an operator's own PKI, an older CA) is
    served, but every gRPC client will refuse it: say so once, at the start."""
    service = identity.service
    leaf = load_pem_chain(identity.chain_pem)[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        dns = []
    if service is None or service_dns_name(service) not in dns:
        expected = service_dns_name(service) if service is not None else "a mesh service's DNS name"
        log.warning(
            "the certificate of %s does not name %s: mesh gRPC clients will refuse this server "
            "(docs/security.md, gRPC)",
            identity.spiffe_id,
            expected,
        )


def _configuration(pem: WorkloadPem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(pem.key_pem, pem.chain_pem)], root_certificates=pem.bundle_pem
    )
