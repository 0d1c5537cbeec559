"""gRPC channels to External hosts: which declared port a channel's target names, the grpc
security its endpoint channels open with (TLS origination with the External's SNI and CAs, or
plaintext), and a refused certificate said in the External's terms.

The policy itself (a declared port, `registry_only`, an origination's CAs failing closed) is
`meshlib.egress`'s, shared with the httpx transport; this module only speaks grpc's dialect.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from meshlib.egress import OriginationUnusable, block, declared_port
from meshlib.errors import NoEndpointsError, OriginationError
from meshlib.grpc.wire import TlsRefused
from meshlib.names import RULE, check_service_name, is_service_name
from meshlib.unknown import no_endpoints_message, single_label

if TYPE_CHECKING:
    from meshlib.egress import ExternalTarget
    from meshlib.mesh import Mesh
    from meshlib.pipeline import Call
    from meshlib.snapshot import ServicePlan, Snapshot

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"  # the SNI, and the name the certificate must hold
AUTHORITY_OPTION = "grpc.default_authority"
GRPC_DEFAULT_PORT = 443
"""The port of a target without one, as grpc takes it (for an External declaring several ports)."""
_REFUSED_MARKS = ("SSL_ERROR_SSL", "Verification Check failed", "is not in peer certificate")
"""What grpc's status details say when a handshake failed on a certificate (not an EOF or a
reset, which may heal): grpc gives no error object to inspect, only these words."""
_CACHE_LIMIT = 256


def split_target(target: str) -> tuple[str, int | None]:
    """`host[:port]` (`[v6]:port` too) as grpc targets are written, the host lower-cased."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port = target.partition(":")
    else:  # a name, or a bare IPv6 address
        host, port = target, ""
    if port and not port.isdigit():
        return target.lower(), None
    return host.lower(), int(port) if port else None


_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "passthrough"})
"""grpc's name resolvers, which a mesh channel does not use (the mesh picks the endpoints)."""


def check_target(target: object, what: str) -> str:
    """`target` if a mesh channel could ever send to it; else a TypeError or ValueError, at once,
    that starts with `what` (the argument). A target is a mesh service's name, or a port of an
    External as grpc writes targets: `host:port`, the host alone, `[v6]:port` (`split_target`;
    any case: hosts are compared lower-cased). Only the form is judged here: whether the rules
    have it is each RPC's question (rules change; `registry_only` refuses and counts then)."""
    if not isinstance(target, str):
        raise TypeError(
            f"{what} must be a mesh service name or an External's host:port (a str), "
            f"not {type(target).__name__}"
        )
    if is_service_name(target):  # the usual case
        return target
    try:
        host, port = split_target(target)
    except ValueError:  # a port of digits int() does not take
        host, port = target, None
    if ":" not in target:  # a name: a mesh service's, or an External host's
        if is_service_name(host):
            return target
        check_service_name(target, what)  # raises its ValueError
    bracketed = target.startswith("[")  # an IPv6 address, nothing else
    if (port is None or 1 <= port <= 65535) and (
        _ipv6(host) if bracketed else is_service_name(host) or _ipv6(host)
    ):
        return target
    scheme = target.partition(":")[0].lower()
    hint = (
        "; no name-resolver scheme (dns:///, xds:///, unix:): the mesh picks the endpoints itself"
        if scheme in _SCHEMES or "://" in target
        else ""
    )
    raise ValueError(
        f"{what}: {target[:80]!r} is neither a mesh service name ({RULE}) nor an External's port "
        f"as host:port (docs/egress.md#grpc-channels){hint}"
    )


def _ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def pool_key(plan: ServicePlan) -> str:
    """The name of the channel pool a plan's RPCs go out on: the service, or an External's
    `host:port` (a mesh service's name never holds a colon)."""
    external = plan.external
    return plan.name if external is None else f"{external.host}:{external.port}"


def keyed_plan(snapshot: Snapshot, key: str) -> ServicePlan | None:
    """The plan a pool's channels serve in `snapshot` (None: it has none there any more)."""
    plan = snapshot.grpc_plan(key)
    if plan is not None or ":" not in key:
        return plan
    host, port = split_target(key)
    ports = snapshot.externals.get(host)
    return ports.get(port) if ports is not None and port is not None else None


def outside_plan(mesh: Mesh, snapshot: Snapshot, target: str) -> ServicePlan:
    """The plan of a channel whose target is no mesh service with a plan: a declared port of an
    External (a target without a port: the External's only port, else 443), or a refusal. A
    mesh channel never sends to an undeclared host: `OutboundBlocked` (counted) for any but a
    single-label name under `registry_only`, a `NoEndpointsError` otherwise."""
    host, port = split_target(target)
    registry_only = mesh.outbound == "registry_only"
    ports = snapshot.externals.get(host)
    if ports is not None:
        if port is None:
            port = next(iter(ports)) if len(ports) == 1 else GRPC_DEFAULT_PORT
        plan = declared_port(mesh, ports, host, port, registry_only)
        if plan is not None:
            return plan
        declared = ", ".join(str(p) for p in ports)
        raise NoEndpointsError(
            f"port {port} of External {host!r} is not declared (ports: {declared}): a mesh gRPC channel "
            f"sends to declared ports only; add {{port: {port}}} to the ports of External/{host}"
        )
    if registry_only and not (port is None and single_label(host)):
        block(mesh, host, port or GRPC_DEFAULT_PORT)
    raise NoEndpointsError(no_endpoints_message(mesh, target))


@dataclass(frozen=True)
class OriginSecurity:
    """How the channels to one External port open (the pool's `security`): `credentials` None
    for plaintext; `options` the authority (and the SNI); `generation` what makes a pool open
    new channels when it changes (the SNI and the CAs' digest)."""

    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    generation: object


_securities: dict[tuple[object, ...], OriginSecurity] = {}


def origin_security(external: ExternalTarget) -> OriginSecurity:
    """The channel security of an External port: never the mesh's identity. With origination,
    TLS verified against the External's CAs (the system's without `ca`) with its SNI as the
    name the certificate must hold; the CAs unusable fail closed with `OriginationError`."""
    origination = external.origination
    if origination is None:
        authority = external.host if external.upstream == 80 else f"{external.host}:{external.upstream}"
        key: tuple[object, ...] = (authority,)
    else:
        try:
            pem, digest = origination.roots()
        except OriginationUnusable as exc:
            raise OriginationError(
                f"TLS origination to {external.host}: {exc}; the call is refused (fails closed)"
            ) from None
        authority = external.host if external.upstream == 443 else f"{external.host}:{external.upstream}"
        key = (authority, digest)
    found = _securities.get(key)
    if found is not None:
        return found
    options: tuple[tuple[str, Any], ...] = ((AUTHORITY_OPTION, authority),)
    credentials = None
    if origination is not None:
        roots = pem if pem is not None else _system_roots()
        credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        options = (*options, (TARGET_NAME_OPTION, origination.sni))
    security = OriginSecurity(credentials, options, key)
    if len(_securities) >= _CACHE_LIMIT:
        _securities.clear()
    _securities[key] = security
    return security


@functools.lru_cache(maxsize=1)
def _system_roots() -> bytes | None:
    """The system's CAs as Python's ssl finds them (its default CA file); None leaves grpc's
    own roots when there is no such file."""
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile):
        if name and Path(name).is_file():
            try:
                return Path(name).read_bytes()
            except OSError:
                continue
    return None


def check_refused(call: Call, details: str | None) -> None:
    """An originated TLS attempt that failed on the server's certificate: raised as `TlsRefused`
    naming the External, the address, the SNI and the CAs (a refusal, never retried: a
    certificate does not heal). Anything else (a refused connection, a reset) is left alone."""
    external = call.plan.external
    origination = external.origination if external is not None else None
    if origination is None or not details or not any(m in details for m in _REFUSED_MARKS):
        return
    endpoint = call.endpoint.address if call.endpoint is not None else "?"
    raise TlsRefused(
        f"TLS origination to {call.service} at {endpoint} (SNI {origination.sni}): the server's "
        f"certificate failed verification against {origination.verified_by}: {details}"
    )
