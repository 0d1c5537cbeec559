"""A running gateway: its listeners on an event loop of their own, kept in step with the rules.

The gateway is a mesh member: the Mesh's service is the Gateway document's `service`, its
identity (mTLS to services), its registration and its telemetry. Requests run through the
inbound sequence under that name (`Mesh.asgi`), then the proxy; calls leave through an
`httpx.AsyncClient` of the Mesh made on the gateway's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx

from meshlib.gateway.listeners import ListenerApp, Listeners
from meshlib.gateway.proxy import Proxy

if TYPE_CHECKING:
    from meshlib.mesh import Mesh
    from meshlib.rules import ListenerSpec
    from meshlib.snapshot import Snapshot

log = logging.getLogger("meshlib.gateway")

START_TIMEOUT = 10.0
CALL_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
"""Per socket operation of a call through the gateway (a route's `timeout` bounds the whole)."""
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
CERTIFICATE_CHECK = 5.0
"""Seconds between looks at the certificate files, for renewals written in place."""


class GatewayServing:
    """`mesh.serve_gateway(...)`: `.addresses` (document port -> bound host:port), `.wait()`,
    `.stop()`; a context manager that stops on exit."""

    def __init__(self, mesh: Mesh, host: str = "127.0.0.1", ports: Mapping[int, int] | None = None) -> None:
        if not mesh.service:
            raise ValueError("a gateway needs the Mesh's service name: the Gateway document's service")
        self.mesh = mesh
        self.service = mesh.service
        self.host = host
        self._ports = dict(ports or {})
        self._loop: asyncio.AbstractEventLoop | None = None  # made on the gateway's thread
        self._thread = threading.Thread(target=self._run, name=f"meshlib-gateway-{self.service}", daemon=True)
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._listeners: Listeners | None = None
        self._error: BaseException | None = None
        self._specs: tuple[Snapshot | None, dict[int, ListenerSpec], int | None] = (None, {}, None)
        self._registered: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> GatewayServing:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"gateway {self.service} did not start in {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"gateway {self.service} did not start: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        loop = self._loop
        if self._stopping is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._registered is not None:
            self.mesh.deregister(self._registered)
            self._registered = None

    def wait(self) -> None:
        """Block until the gateway stops (`stop()` from another thread, or a signal's handler)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def __enter__(self) -> GatewayServing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def addresses(self) -> dict[int, str]:
        """Each listener's document port -> the host:port it listens on."""
        listeners = self._listeners
        return {p: listener.address for p, listener in dict(listeners.running).items()} if listeners else {}

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def url(self, port: int, scheme: str = "http") -> str:
        return f"{scheme}://{self.addresses[port]}"

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        self._loop = loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # start-up failed: say why to start()
            self._error = exc
            log.error("gateway %s stopped: %s", self.service, exc)
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        client = self.mesh.client(timeout=CALL_TIMEOUT, limits=LIMITS, trust_env=False)
        proxy = self.mesh.asgi(Proxy(self.mesh, self.service, client))
        self._listeners = listeners = Listeners(
            lambda port: ListenerApp(port, self._spec, proxy), self.host, self._ports
        )
        loop = asyncio.get_running_loop()
        changed = self._changed

        def on_update(_: Snapshot) -> None:
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(changed.set)

        self.mesh.on_update(on_update)
        try:
            failed = await listeners.apply(self.mesh.snapshot.rules.gateway(self.service))
            if failed:  # at start, a port that cannot be had is an error, not a warning
                raise RuntimeError("; ".join(failed))
            if self.mesh.snapshot.rules.gateway(self.service) is None:
                log.warning("no Gateway/%s in the rules yet: no listener until one arrives", self.service)
            self._register()
            self._ready.set()
            await self._follow(listeners)
        finally:
            await listeners.stop()
            await client.aclose()

    async def _follow(self, listeners: Listeners) -> None:
        """Apply each rules change until stopped (changes that come during one are applied once)."""
        assert self._stopping is not None and self._changed is not None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait(
                    {stopping, changed}, timeout=CERTIFICATE_CHECK, return_when=asyncio.FIRST_COMPLETED
                )
                if self._stopping.is_set():
                    changed.cancel()
                    return
                if not changed.done():  # a quiet while: any certificate renewed in place?
                    changed.cancel()
                    listeners.refresh(self.mesh.snapshot.rules.gateway(self.service))
                    continue
                self._changed.clear()
                await listeners.apply(self.mesh.snapshot.rules.gateway(self.service))
                self._register()
        finally:
            stopping.cancel()

    def _register(self) -> None:
        """Register the first routed listener (with a control service), as `serve` registers."""
        listeners = self._listeners
        if self.mesh.link is None or listeners is None or self._registered is not None:
            return
        routed = [
            listener.address
            for port, listener in sorted(listeners.running.items())
            if not (spec := self._spec(port)[0]) or not spec.https_redirect
        ]
        if routed:
            self._registered = routed[0]
            self.mesh.register(routed[0])
            log.info("gateway %s registered at %s", self.service, routed[0])

    def _spec(self, port: int) -> tuple[ListenerSpec | None, int | None]:
        """The listener spec in force for a document port, and the port HTTPS redirects point at."""
        snapshot = self.mesh.snapshot
        cached = self._specs
        if cached[0] is not snapshot:
            doc = snapshot.rules.gateway(self.service)
            specs = {spec.port: spec for spec in doc.listeners} if doc is not None else {}
            cached = self._specs = (snapshot, specs, doc.https_port if doc is not None else None)
        return cached[1].get(port), cached[2]


def serve_gateway(
    mesh: Mesh, host: str = "127.0.0.1", ports: Mapping[int, int] | None = None
) -> GatewayServing:
    """Start a gateway for `mesh` and return once its listeners accept connections."""
    return GatewayServing(mesh, host, ports).start()


__all__ = ["GatewayServing", "serve_gateway"]
