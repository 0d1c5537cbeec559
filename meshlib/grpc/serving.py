"""`Mesh.serve_grpc` and `Mesh.serve_grpc_aio`: a grpcio server on the mesh's terms.

The port is added with the mesh's server credentials when the Mesh has an identity (mTLS
STRICT or PERMISSIVE), plaintext otherwise. grpcio cannot take TLS and plaintext on one port,
so PERMISSIVE's plaintext callers get a second port (`plaintext_port`), which is never
registered: mesh clients always hold a certificate and are sent to the TLS port. Once the
server is started, the instance is registered with the control service with
`meshlib.io/protocol: grpc`, so clients of either protocol pick the endpoints that speak
theirs; `stop()` deregisters before the server stops taking calls, so callers move away while
the calls in flight finish.

What to serve is either a server the app built (`grpc.server(pool,
interceptors=server_interceptors(mesh))`, not started, no port added) or a list of
"adders": callables given the server, as the generated `add_<Service>Servicer_to_server` are
once bound to a servicer (`functools.partial(add_EchoServicer_to_server, Echo())`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.grpc.aio_server import aio_server_interceptors
from meshlib.grpc.server import server_interceptors

if TYPE_CHECKING:
    from meshlib.mesh import Mesh

log = logging.getLogger("meshlib.grpc")

Adder = Callable[[Any], object]
"""Puts a servicer on a server: `lambda server: add_EchoServicer_to_server(Echo(), server)`."""

DEFAULT_WORKERS = 16


@dataclass
class GrpcServing:
    """A started sync server: where it listens, and how to stop it (deregistering first)."""

    mesh: Mesh
    server: grpc.Server
    address: str  # host:port as bound (the real port for port=0); the TLS one under mTLS
    registered: str | None  # the address registered with the control service, if any
    plaintext_address: str | None = None  # PERMISSIVE's second port, for callers without TLS

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def stop(self, grace: float | None = 5.0) -> None:
        """Deregister, then stop taking calls; returns once the calls in flight have ended
        (or `grace` seconds have passed)."""
        if self.registered is not None:
            self.mesh.deregister(self.registered)
            self.registered = None
        self.server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (`grpc.Server.wait_for_termination`); deregisters then."""
        try:
            return self.server.wait_for_termination(timeout)
        except KeyboardInterrupt:
            self.stop()
            return True

    def __enter__(self) -> GrpcServing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class AioGrpcServing:
    """A started asyncio server; `await stop()` deregisters, then stops it."""

    mesh: Mesh
    server: grpc.aio.Server
    address: str
    registered: str | None
    plaintext_address: str | None = None

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    async def stop(self, grace: float | None = 5.0) -> None:
        if self.registered is not None:
            await asyncio.to_thread(self.mesh.deregister, self.registered)
            self.registered = None
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def __aenter__(self) -> AioGrpcServing:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_grpc(
    mesh: Mesh,
    what: grpc.Server | Iterable[Adder],
    *,
    port: int,
    host: str,
    mtls: str | None = None,
    plaintext_port: int | None = None,
    advertise: str | None = None,
    labels: Mapping[str, str] | None = None,
    max_workers: int = DEFAULT_WORKERS,
) -> GrpcServing:
    if isinstance(what, grpc.Server):
        server = what
    else:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers, thread_name_prefix="meshlib-grpc"),
            interceptors=server_interceptors(mesh),
        )
        for add in what:
            add(server)
    address, plaintext = _add_ports(mesh, server, host, port, mtls, plaintext_port)
    server.start()
    registered = _register(mesh, advertise or address, labels)
    return GrpcServing(mesh, server, address, registered, plaintext)


async def serve_grpc_aio(
    mesh: Mesh,
    what: grpc.aio.Server | Iterable[Adder],
    *,
    port: int,
    host: str,
    mtls: str | None = None,
    plaintext_port: int | None = None,
    advertise: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> AioGrpcServing:
    if isinstance(what, grpc.aio.Server):
        server = what
    else:
        server = grpc.aio.server(interceptors=aio_server_interceptors(mesh))
        for add in what:
            add(server)
    address, plaintext = _add_ports(mesh, server, host, port, mtls, plaintext_port)
    await server.start()
    registered = _register(mesh, advertise or address, labels)
    return AioGrpcServing(mesh, server, address, registered, plaintext)


def _add_ports(
    mesh: Mesh, server: Any, host: str, port: int, mtls: str | None, plaintext_port: int | None
) -> tuple[str, str | None]:
    """Listen on host:port, over the mesh's mTLS when it has an identity (else plaintext), and,
    for PERMISSIVE, on host:plaintext_port without TLS. Returns both addresses as bound."""
    mode = mesh._server_mtls(mtls)
    secure = mesh.credentials is not None and mode in ("STRICT", "PERMISSIVE")
    if plaintext_port is not None and not (secure and mode == "PERMISSIVE"):
        raise ValueError(
            f"plaintext_port is for mtls=PERMISSIVE with an identity (here: {mode or 'no mTLS'})"
        )
    target = f"{host}:{port}"
    if secure:
        credentials = importlib.import_module("meshlib.grpc.credentials")
        bound = server.add_secure_port(target, credentials.server_credentials(mesh, mode))
    else:
        bound = server.add_insecure_port(target)
    if not bound:
        raise OSError(f"gRPC server could not listen on {target}")
    plaintext = None
    if plaintext_port is not None:
        plain = server.add_insecure_port(f"{host}:{plaintext_port}")
        if not plain:
            raise OSError(f"gRPC server could not listen on {host}:{plaintext_port}")
        plaintext = f"{host}:{plain}"
    return f"{host}:{bound}", plaintext


def _register(mesh: Mesh, address: str, labels: Mapping[str, str] | None) -> str | None:
    """Register the gRPC endpoint beside any HTTP one of the same process; None without a
    control service."""
    if mesh.link is None or not mesh.service:
        log.info("%s serving gRPC on %s (no control service)", mesh.service or "service", address)
        return None
    merged = {**mesh.labels, **(labels or {}), PROTOCOL_LABEL: "grpc"}
    mesh.link.register(address, merged, 10.0)
    log.info("%s serving gRPC on %s, registering with %s", mesh.service, address, mesh.control)
    return address
