"""A gateway's listeners: one uvicorn server per port of its Gateway document, all on the
gateway's event loop, kept in step with the document.

A rules change adds and removes listeners without touching the others, loads changed
certificates into a running HTTPS listener (`SniCertificates.update`), and turns a plain
listener's `https_redirect` on or off per request (its app reads the spec in force). Only a
listener that changes between plain and HTTPS gets a new server, as a connection's TLS is
fixed when it is accepted: the new server takes the listening socket over (a duplicate of it:
the port never closes, and connections made meanwhile wait in its backlog), and the old one
stops accepting and finishes its requests in flight in the background (`STOP_GRACE`), as a
removed listener does. Its idle keep-alive connections are closed: they speak the old protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import uvicorn

from meshlib.gateway.https_redirect import redirect_to_https
from meshlib.gateway.tls import SniCertificates
from meshlib.headers import TIMEOUT
from meshlib.listening import bind
from meshlib.security.uvicorn_tls import TLSH11Protocol

if TYPE_CHECKING:
    from meshlib.rules import GatewayDoc, ListenerSpec

log = logging.getLogger("meshlib.gateway")

_MESH = b"x-mesh-"
_KEPT = TIMEOUT.encode()  # the caller's deadline is carried inward; the rest is the mesh's to say
STOP_GRACE = 5.0  # seconds a removed listener gives open requests to finish


class ListenerApp:
    """The ASGI app of one port: a redirect to HTTPS, or the meshed proxy."""

    def __init__(
        self, port: int, spec: Callable[[int], tuple[ListenerSpec | None, int | None]], proxy: Any
    ) -> None:
        self.port = port
        self.spec = spec
        self.proxy = proxy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            listener, https_port = self.spec(self.port)
            if listener is not None and listener.https_redirect and https_port is not None:
                await redirect_to_https(scope, send, https_port)
                return
            # an outside caller does not speak for a mesh service: its x-mesh-* headers go (the
            # deadline aside), before the inbound sequence reads them
            scope["headers"] = [(k, v) for k, v in scope["headers"] if not k.startswith(_MESH) or k == _KEPT]
        await self.proxy(scope, receive, send)


@dataclass
class Listener:
    """One running port."""

    port: int  # the document's
    sock: socket.socket
    server: uvicorn.Server
    task: asyncio.Task[None]
    certificates: SniCertificates | None = None
    address: str = field(init=False)

    def __post_init__(self) -> None:
        host, port = self.sock.getsockname()[:2]
        self.address = f"{host}:{port}"

    def stop_accepting(self) -> None:
        """Accept no more connections (at once: uvicorn would notice `should_exit` on its next
        tick); the ones open go on. Closes this listener's descriptor of the socket."""
        for server in getattr(self.server, "servers", ()):
            server.close()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace + 1.0)
        except (TimeoutError, asyncio.CancelledError):
            self.server.force_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 1.0)
        with contextlib.suppress(OSError):
            self.sock.close()


class Listeners:
    """The running listeners of one gateway; `apply(doc)` brings them in line with a document.

    `host` is the address to listen on; `ports` maps a document port to the port to bind instead
    (0: any free one), for tests and for running unprivileged behind a port mapping."""

    def __init__(self, app: Callable[[int], Any], host: str, ports: Mapping[int, int] | None = None) -> None:
        self._app = app
        self.host = host
        self.ports = dict(ports or {})
        self.running: dict[int, Listener] = {}
        self.draining: set[asyncio.Task[None]] = set()  # listeners that finish their requests in flight

    async def apply(self, doc: GatewayDoc | None) -> list[str]:
        """Start, stop, reload to match `doc`; returns what could not be started (one line each)."""
        failed: list[str] = []
        wanted = {spec.port: spec for spec in (doc.listeners if doc is not None else ())}
        for port in [p for p in self.running if p not in wanted]:
            log.info("gateway listener %d removed", port)
            self._drain(self.running.pop(port))
        for port, spec in wanted.items():
            current = self.running.get(port)
            if current is not None and (current.certificates is None) == (spec.tls is None):
                certificates = current.certificates
                if spec.tls is not None and certificates is not None and certificates.specs != spec.tls:
                    self._reload(current, spec)
                continue
            try:
                # plain <-> HTTPS: a new server on the same socket; the old one drains
                started = await self._start(spec, current.sock if current is not None else None)
            except Exception as exc:
                if current is not None:
                    log.error("gateway listener %d cannot switch, it goes on as it was: %s", port, exc)
                else:
                    log.error("gateway listener %d cannot start: %s", port, exc)
                failed.append(f"listener {port}: {exc}")
                continue
            self.running[port] = started
            if current is not None:
                log.info("gateway listener %d switched; the old one finishes its requests", port)
                self._drain(current)
        return failed

    def _drain(self, listener: Listener) -> None:
        """Stop `listener` accepting now, and let it finish its requests in flight meanwhile."""
        listener.stop_accepting()
        task = asyncio.create_task(listener.stop(), name=f"gateway-listener-{listener.port}-drain")
        self.draining.add(task)
        task.add_done_callback(self.draining.discard)

    def refresh(self, doc: GatewayDoc | None) -> None:
        """Reload the certificates of listeners whose files changed in place (a renewal)."""
        for spec in doc.listeners if doc is not None else ():
            listener = self.running.get(spec.port)
            if listener is not None and listener.certificates is not None and listener.certificates.stale():
                self._reload(listener, spec)

    def _reload(self, listener: Listener, spec: ListenerSpec) -> None:
        assert listener.certificates is not None and spec.tls is not None
        try:
            listener.certificates.update(spec.tls)
            log.info("gateway listener %d: certificates reloaded", spec.port)
        except Exception as exc:  # a bad file: keep serving the certificates in force
            log.error("gateway listener %d keeps its certificates: %s", spec.port, exc)

    async def _start(self, spec: ListenerSpec, taken: socket.socket | None = None) -> Listener:
        """A listener for `spec`, on a new socket or on a duplicate of `taken` (a running
        listener's, which goes on accepting until it is told to stop)."""
        certificates = SniCertificates(spec.tls) if spec.tls is not None else None
        options: dict[str, Any] = {}
        if certificates is not None:
            context = certificates.context
            options = {"ssl_context_factory": lambda _config, _default: context, "http": TLSH11Protocol}
        sock = taken.dup() if taken is not None else bind(self.host, self.ports.get(spec.port, spec.port))
        config = uvicorn.Config(
            self._app(spec.port),
            log_level="warning",
            lifespan="off",
            server_header=False,  # the service's own Server and Date headers pass through
            date_header=False,
            proxy_headers=False,  # x-forwarded-* are the gateway's own job (forwarding.py), not uvicorn's
            timeout_graceful_shutdown=int(STOP_GRACE),
            **options,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"gateway-listener-{spec.port}")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # its error, if any
                raise RuntimeError(f"listener {spec.port} stopped at start")
            await asyncio.sleep(0.005)
        listener = Listener(spec.port, sock, server, task, certificates)
        kind = "https" if certificates is not None else "redirect" if spec.https_redirect else "http"
        log.info("gateway listener %d (%s) on %s", spec.port, kind, listener.address)
        return listener

    async def stop(self) -> None:
        for port in list(self.running):  # signal all, then wait: shutdowns overlap
            self.running[port].server.should_exit = True
        await asyncio.gather(*(self.running.pop(p).stop() for p in list(self.running)), *list(self.draining))
