"""The Mesh: one per process, holding the current Snapshot and handing out meshed clients."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import logging
import math
import os
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, overload

from meshlib.balancing import BALANCERS
from meshlib.balancing.zones import ZONE_LABEL
from meshlib.control.endpoints import ControlEndpoints
from meshlib.default_settings import DEFAULT_SETTINGS, DefaultSettings, configured
from meshlib.discovery.base import Provider
from meshlib.discovery.runner import DiscoveryRunner
from meshlib.endpoint import LoadBook
from meshlib.filters import client_stack
from meshlib.names import check_service_name, is_service_name
from meshlib.pipeline import Stack
from meshlib.resilience.state import ResilienceState
from meshlib.rules import RuleSet
from meshlib.runtime import Runtime
from meshlib.server_load import ServerLoad
from meshlib.snapshot import Snapshot
from meshlib.stats import TrafficStats
from meshlib.telemetry import Telemetry
from meshlib.unknown import no_endpoints_reason

if TYPE_CHECKING:
    import httpx

    from meshlib.control.link import ControlLink
    from meshlib.control.registration import Registration
    from meshlib.gateway import GatewayServing
    from meshlib.grpc.aio_channel import AioMeshChannel
    from meshlib.grpc.channel import MeshChannel
    from meshlib.grpc.clients import GrpcClients
    from meshlib.grpc.serving import AioGrpcServing, GrpcServing
    from meshlib.http.transport import HttpxWire
    from meshlib.security.identity import Enrollment, Identity
    from meshlib.settings import MeshSettings

log = logging.getLogger("meshlib")

MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
ENROLL_TIMEOUT = 10.0  # how long Mesh() waits for its first certificate from an unreachable CA
_AUTHENTICATION = "meshlib.security.authentication"
READY_REGISTRATION_WAIT = 2.0  # how long serve()'s ready line waits for the registry's answer

P = ParamSpec("P")
R = TypeVar("R")


class ClientInjector(Protocol):
    """What `Mesh.call(service)` returns: a decorator that supplies the first argument, an
    `httpx.AsyncClient` to a coroutine or async generator function and an `httpx.Client` to a
    plain one."""

    @overload
    def __call__(
        self, fn: Callable[Concatenate[httpx.AsyncClient, P], Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(
        self, fn: Callable[Concatenate[httpx.AsyncClient, P], AsyncIterator[R]]
    ) -> Callable[P, AsyncIterator[R]]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[httpx.Client, P], R]) -> Callable[P, R]: ...


class Mesh:
    """This process's place in the mesh.

    Readers take `mesh.snapshot` once per request and never lock; updates (a rules-file edit,
    later the control service and discovery) build a new Snapshot and swap the reference.

    Arguments left out come from the `MESH_*` environment (`mesh.settings`,
    docs/configuration.md); given ones win.
    """

    def __init__(
        self,
        service: str | None = None,
        *,
        control: str | Sequence[str] | None = None,
        config: str | os.PathLike[str] | None = None,
        labels: Mapping[str, str] | None = None,
        token: str | None = None,
        watch_interval: float = 0.25,
        address: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        mtls: str | None = None,
        credentials: Identity | None = None,
        trust_domain: str | None = None,
        ca: str | os.PathLike[str] | bytes | None = None,
        tracing: Any = None,
        metrics: Any = None,
        metrics_path: str | None = None,
        access_log: Any = None,
        redis: str | None = None,
        passthrough: bool | None = None,
        outbound: str | None = None,
        http_transport: str | None = None,
        load_reports: bool | None = None,
        discovery: str | Provider | Sequence[str | Provider] | None = None,
    ) -> None:
        # wrong arguments are refused here, before anything starts, not met later in a request,
        # a header or a background task
        if service == "":
            raise ValueError("Mesh(service=''): leave the service out (None) for a process without a name")
        self.service = check_service_name(service, "Mesh(service=...)") if service is not None else None
        own_labels = _check_labels(labels)
        watch_interval = _check_watch_interval(watch_interval)
        _check_discovery(discovery)
        # explicit arguments win over the MESH_* environment (meshlib/settings.py); with neither,
        # the defaults, without building the model (meshlib/default_settings.py)
        explicit = dict(
            control=control,
            token=token,
            address=address or None,
            mtls=mtls,
            trust_domain=trust_domain or None,
            ca=ca,
            redis=redis,
            cache_dir=cache_dir,
            metrics_path=metrics_path,
            passthrough=passthrough,
            outbound=outbound,
            http_transport=http_transport,
            load_reports=load_reports,
            discovery=discovery if isinstance(discovery, str) else None,
        )
        settings: MeshSettings | DefaultSettings = DEFAULT_SETTINGS
        self._settings: MeshSettings | None = None
        if configured(explicit):
            from meshlib.settings import MeshSettings

            settings = self._settings = MeshSettings.resolve(**explicit)
        # single-label hosts without rules: a NoEndpointsError (default), or DNS (True)
        self.passthrough = settings.passthrough
        # hosts neither mesh services nor Externals: sent as they are (allow_any, the default) or
        # refused with OutboundBlocked (registry_only); docs/egress.md
        self.outbound = settings.outbound
        # what the async client sends to mesh endpoints with: h1 (meshlib/http/h1.py) or httpcore
        self.http_transport = settings.http_transport
        self.address = settings.address
        self.labels = own_labels
        self.control = settings.control  # one URL, or the replicas' URLs comma-separated
        # the replicas and the one in use, shared by the enrollment and every loop of the link
        self.control_endpoints = ControlEndpoints(self.control) if self.control else None
        self.token = settings.token
        # mTLS (docs/security.md): the identity comes from `credentials`, or from the control
        # service's CA with the join token; `mtls` is how `serve()` treats callers
        self.mtls = _mtls_mode(settings.mtls)
        self.trust_domain = settings.trust_domain
        self.ca = settings.ca
        self.credentials: Identity | None = credentials if self.mtls != "DISABLE" else None
        self.enrollment: Enrollment | None = None  # set when the identity comes from the CA
        self.config = Path(config) if config is not None else None
        self.loads = LoadBook()
        # this server's load (requests in flight, latency by RIF, CPU, the app's own figure): on
        # every response as an ORCA load report while `load_reports` is on; unset, while the rules
        # give this service a balancer that weighs by reports (docs/load-reports.md)
        self.load = ServerLoad()
        self.load_reports = self.load.tracking = bool(settings.load_reports)
        self.stats = TrafficStats()
        # tracing, metrics, /metrics and the access log: docs/observability.md
        self.telemetry = Telemetry(
            self,
            tracing=tracing,
            metrics=metrics,
            metrics_path=settings.metrics_path,
            access_log=access_log if access_log is not None else settings.access_log,
        )
        # `RateLimit` documents with `scope: global` share their bucket through this Redis
        self.redis = settings.redis
        self.resilience = ResilienceState(self.stats, redis=self.redis)
        self.stack: Stack = client_stack(
            self.resilience,
            telemetry=self.telemetry,
            explain=functools.partial(no_endpoints_reason, self),
            zone=self.labels.get(ZONE_LABEL),  # where this process is, for zone-aware routing
        )
        self._http_wire: HttpxWire | None = None  # made with the first client (meshlib.http)
        self._grpc: GrpcClients | None = None  # made with the first gRPC channel (meshlib.grpc)
        self._wire_lock = threading.Lock()
        self._update_lock = threading.Lock()
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._runtime: Runtime | None = None
        self._sync_clients: dict[str, httpx.Client] = {}
        # `@mesh.call`'s async clients, by event loop: not weak keys, since a client's connections
        # hold on to their loop; each goes with its loop's shutdown (see _LoopClients)
        self._async_clients: dict[asyncio.AbstractEventLoop, _LoopClients] = {}
        self._closed = False

        rules, digest = RuleSet.EMPTY, None
        if self.config is not None:
            from meshlib.rules.file import read_rules

            rules, digest = read_rules(self.config)  # a bad file at start-up is an error, not a warning
        self._snapshot = Snapshot(rules, version=f"file:{digest}" if digest else "0", loads=self.loads)
        # an endpoint back in discovery, or re-registered by a new process, starts afresh
        self.resilience.observe(self._snapshot)
        self.on_update(self.resilience.observe)
        # discovery (docs/discovery.md): the first provider is the process default
        if discovery is None or isinstance(discovery, str):
            providers: list[str | Provider] = [
                u.strip() for u in (settings.discovery or "").split(",") if u.strip()
            ]
        elif isinstance(discovery, Sequence):
            providers = list(discovery)
        else:
            providers = [discovery]
        self.discovery = DiscoveryRunner(self, providers)
        self.on_update(self.discovery.observe)
        self.discovery.observe(self._snapshot)
        # end-user JWKS URLs are fetched when the rules bring them in, not on a first request
        self.on_update(self._prepare_authentication)
        self._prepare_authentication(self._snapshot)
        if settings.load_reports is None:  # as the rules say: on while callers weigh by them
            self.on_update(self._decide_load_reports)
            self._decide_load_reports(self._snapshot)
        self._link: ControlLink | None = None
        if self.credentials is None and self.mtls != "DISABLE" and self.control and self.token and service:
            self.credentials = self._enroll()
        if self.mtls is None and self.credentials is not None:
            self.mtls = "STRICT"
        if self.mtls in ("STRICT", "PERMISSIVE") and self.credentials is None:
            raise ValueError(f"mtls={self.mtls!r} needs credentials=, or control= with a join token")
        if self.control_endpoints is not None:
            # the file (if any) only bootstraps; the control service's rules replace it
            from meshlib.control.link import ControlLink  # only with a control service (import cost)

            self._link = ControlLink(self, self.control_endpoints, settings.cache_dir)
            self._link.start()
        elif self.config is not None:
            from meshlib.rules.file import watch_rules_file

            self.runtime.submit(
                watch_rules_file(self.config, self._on_rules_file, digest=digest, interval=watch_interval)
            )

    # -- state ---------------------------------------------------------------------------

    @property
    def settings(self) -> MeshSettings:
        """The settings in force: the arguments given, over the `MESH_*` environment."""
        if self._settings is None:  # nothing was configured: the defaults, as a model
            from meshlib.settings import MeshSettings

            self._settings = MeshSettings.model_construct()
        return self._settings

    @property
    def snapshot(self) -> Snapshot:
        """The Snapshot in force; take it once per request."""
        return self._snapshot

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            with self._update_lock:
                if self._runtime is None:
                    self._runtime = Runtime(f"meshlib-{self.service or 'mesh'}")
        return self._runtime

    def on_update(self, fn: Callable[[Snapshot], None]) -> None:
        """Call `fn(snapshot)` after each swap (from the runtime's thread; keep it quick)."""
        self._listeners.append(fn)

    def update(self, make: Callable[[Snapshot], Snapshot]) -> Snapshot:
        """Swap in `make(current)`; updates are serialized so none is lost."""
        with self._update_lock:
            new = make(self._snapshot)
            self._snapshot = new
        for fn in list(self._listeners):
            try:
                fn(new)
            except Exception:
                log.exception("snapshot listener failed")
        return new

    def apply_rules(self, rules: RuleSet, version: str) -> Snapshot:
        """Swap in new rules, keeping discovered endpoints and learned load figures."""
        snap = self.update(lambda cur: cur.with_rules(rules, version))
        log.info("rules version %s in force (%d documents)", version, len(rules))
        return snap

    def _prepare_authentication(self, snapshot: Snapshot) -> None:
        """End-user JWT checks (meshlib.security.authentication), imported with the first
        RequestAuthentication document for this service; until then there is nothing to do."""
        if _AUTHENTICATION not in sys.modules and (
            not self.service or snapshot.rules.request_authentication(self.service) is None
        ):
            return
        from meshlib.security import authentication

        authentication.prepare(self, snapshot)

    def _decide_load_reports(self, snapshot: Snapshot) -> None:
        """Load reports on while this service's Destination has a balancer that weighs by them
        (its callers' balancer); counting requests, once on, stays on (cheap, and others read it)."""
        dest = snapshot.rules.destination(self.service) if self.service else None
        on = dest is not None and getattr(BALANCERS.get(dest.load_balancer), "reads_load_reports", False)
        if on:
            self.load.tracking = True
        self.load_reports = on

    def _on_rules_file(self, rules: RuleSet, digest: str) -> None:
        self.apply_rules(rules, f"file:{digest}")

    # -- identity ------------------------------------------------------------------------

    @property
    def identity(self) -> str | None:
        """This process's SPIFFE id (`spiffe://<td>/svc/<service>`); None without mTLS."""
        credentials = self.credentials
        return credentials.spiffe_id if credentials is not None else None

    def _enroll(self) -> Identity:
        """The first certificate from the control service's CA (waits up to ENROLL_TIMEOUT for
        an unreachable one; a refused token is an error at once), then renewal in the background."""
        from meshlib.security.identity import Enrollment, read_anchors

        assert self.control_endpoints and self.token and self.service
        anchors = read_anchors(self.ca)
        enrollment = Enrollment(
            self.control_endpoints, self.service, self.token, trust_domain=self.trust_domain, anchors=anchors
        )
        first = enrollment.obtain(time.monotonic() + ENROLL_TIMEOUT)
        try:
            identity = asyncio.run_coroutine_threadsafe(first, self.runtime.loop).result()
        except BaseException:
            self.runtime.stop()
            raise
        self.enrollment = enrollment
        self.runtime.submit(enrollment.renew_forever(identity))
        return identity

    def control_http_options(self) -> dict[str, Any]:
        """httpx.AsyncClient arguments for the control service: the join token, and for https
        the verification of the control service and our certificate."""
        if self.control is None or (not self.token and not self.control.startswith("https:")):
            return {}
        from meshlib.security.identity import control_options, read_anchors

        return control_options(
            self.control, token=self.token, identity=self.credentials, anchors=read_anchors(self.ca)
        )

    # -- control service -----------------------------------------------------------------

    @property
    def link(self) -> ControlLink | None:
        """The link to the control service (None in local mode)."""
        return self._link

    def wait_for_control(self, timeout: float = 10.0) -> bool:
        """The readiness call: block until the control service's state (or the cached one)
        is in force, so that calls made next see its rules and endpoints.

        Returns True once it is (at once without a control service, or when a cached state
        was loaded at start-up), False if `timeout` seconds pass first; it never raises. Until
        then a call to a service with no endpoints fails with a NoEndpointsError that says
        the control service has not been reached yet."""
        deadline = time.monotonic() + timeout
        while self._link is not None and self._link.state is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def wait_for_discovery(self, *services: str, timeout: float = 10.0) -> bool:
        """The readiness call for discovered services: block until the watch of each of
        `services` has answered once (True), or `timeout` seconds pass (False); never raises.
        A service the rules do not send to a provider is looked up at the process default."""
        return self.discovery.wait(services, timeout)

    def register(
        self, address: str | None = None, *, labels: Mapping[str, str] | None = None, ttl: float = 10.0
    ) -> Registration:
        """Register this instance (`address`, default `Mesh(address=...)`) with the control
        service's registry and keep it registered until `deregister()` or `close()`."""
        address = address or self.address
        if self._link is None or address is None:
            raise ValueError("register() needs Mesh(control=...) and an address")
        self.address = address
        return self._link.register(address, labels if labels is not None else self.labels, ttl)

    def deregister(self, address: str | None = None) -> None:
        """Leave the registry: the instance at `address`, or every one this process registered
        (its HTTP and its gRPC endpoints) when None."""
        if self._link is not None:
            self._link.deregister(address)

    # -- clients -------------------------------------------------------------------------

    @property
    def http_wire(self) -> HttpxWire:
        """The `Wire` of this Mesh's httpx clients (one per Mesh: mirrored copies leave from it)."""
        if self._http_wire is None:
            from meshlib.http.transport import HttpxWire

            with self._wire_lock:  # not _update_lock: shared clients are made under that one
                if self._http_wire is None:
                    self._http_wire = HttpxWire(self)
        return self._http_wire

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` whose requests to mesh services go through the mesh."""
        return self._async_client(kwargs)

    def _async_client(self, kwargs: dict[str, Any], meshed: tuple[str, ...] = ()) -> httpx.AsyncClient:
        from meshlib.http.clients import async_client

        return async_client(self, kwargs, meshed)

    def sync_client(self, **kwargs: Any) -> httpx.Client:
        """An `httpx.Client` with the same pipeline as `client()`."""
        return self._sync_client(kwargs)

    def _sync_client(self, kwargs: dict[str, Any], meshed: tuple[str, ...] = ()) -> httpx.Client:
        from meshlib.http.clients import sync_client

        return sync_client(self, kwargs, meshed)

    def grpc_clients(self) -> GrpcClients:
        """The gRPC side of this Mesh: its wire and its per-endpoint channel pools."""
        if self._grpc is None:
            from meshlib.grpc.clients import GrpcClients

            with self._wire_lock:
                if self._grpc is None:
                    self._grpc = GrpcClients(self)
        return self._grpc

    def grpc_channel(self, service: str) -> MeshChannel:
        """A `grpc.Channel` to `service` whose RPCs go through the mesh (generated stubs take it
        unchanged): routed, balanced, retried and traced by the same stack as HTTP requests.
        `service` may also be an External host's port, `host:port` (docs/egress.md); anything
        that can be neither is a TypeError or ValueError here, not a failure at the first RPC."""
        from meshlib.grpc.channel import MeshChannel

        return MeshChannel(self, self._grpc_target(service, "mesh.grpc_channel(service)"))

    def grpc_aio_channel(self, service: str) -> AioMeshChannel:
        """`grpc_channel` for `grpc.aio` stubs (use it on one event loop, as a grpc.aio channel)."""
        from meshlib.grpc.aio_channel import AioMeshChannel

        return AioMeshChannel(self, self._grpc_target(service, "mesh.grpc_aio_channel(service)"))

    def _grpc_target(self, target: str, what: str) -> str:
        """`target`, checked; a mesh service's name is named to discovery as `call` names one (at
        the process default provider, if any and no rules say otherwise), so its endpoints are
        looked for from the channel's making, not after its first RPC found none."""
        from meshlib.grpc.egress import check_target

        checked = check_target(target, what)
        if is_service_name(checked) and self.snapshot.rules.external(checked) is None:
            self.discovery.want(checked)
        return checked

    def call(self, service: str) -> ClientInjector:
        """Decorate a function to receive, as its first argument, a client for `service`.

        The client's base_url is `http://SERVICE`, it is shared by every call (connections are
        reused) and it is an AsyncClient for a coroutine function, an async generator function
        or an object whose `__call__` is one of those (one client per event loop, closed as its
        loop shuts down), a Client otherwise. `service` is a mesh service name (as in the rules:
        a TypeError or ValueError here otherwise), whatever `passthrough` says: with no
        endpoints a call fails with a NoEndpointsError that says why, never with a DNS error.
        For type checkers the decorated function loses that first parameter:

            @mesh.call("orders")
            async def get(client: httpx.AsyncClient, order_id: int) -> dict: ...

            await get(7)   # (order_id: int) -> Coroutine[..., dict]
        """
        check_service_name(service, "mesh.call(service)")
        self.discovery.want(service)  # at the process default provider, if any and no rules say otherwise

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            sig = inspect.signature(fn)
            params = list(sig.parameters.values())[1:]
            wrapper: Callable[..., Any]
            if _is_async(inspect.iscoroutinefunction, fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    return await fn(self._shared_async_client(service), *args, **kwargs)

                wrapper = async_wrapper
            elif _is_async(inspect.isasyncgenfunction, fn):

                @functools.wraps(fn)
                async def async_gen_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
                    # the client is taken on the first step, in the loop that iterates; what the
                    # caller sends or throws goes on to `fn`'s generator (as `yield from` would)
                    agen = fn(self._shared_async_client(service), *args, **kwargs)
                    try:
                        item = await agen.__anext__()
                        while True:
                            try:
                                sent = yield item
                            except GeneratorExit:
                                raise
                            except BaseException as exc:
                                item = await agen.athrow(exc)
                            else:
                                item = await agen.asend(sent)
                    except StopAsyncIteration:
                        return
                    finally:
                        await agen.aclose()

                wrapper = async_gen_wrapper
            else:

                @functools.wraps(fn)
                def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                    return fn(self._shared_sync_client(service), *args, **kwargs)

                wrapper = sync_wrapper
            cast(Any, wrapper).__signature__ = sig.replace(parameters=params)
            return wrapper

        return cast(ClientInjector, decorate)

    def _shared_sync_client(self, service: str) -> httpx.Client:
        client = self._sync_clients.get(service)
        if client is None:
            with self._update_lock:
                client = self._sync_clients.get(service)
                if client is None:
                    client = self._sync_client({"base_url": f"http://{service}"}, (service,))
                    self._sync_clients[service] = client
        return client

    def _shared_async_client(self, service: str) -> httpx.AsyncClient:
        # An AsyncClient's connections belong to the loop that opened them: one per loop.
        loop = asyncio.get_running_loop()
        entry = self._async_clients.get(loop)
        client = entry.clients.get(service) if entry is not None else None
        if client is None:
            dead: list[tuple[asyncio.AbstractEventLoop, _LoopClients]] = []
            with self._update_lock:
                entry = self._async_clients.get(loop)
                if entry is None:  # a new loop: the clients of loops closed since go now
                    dead = [(old, e) for old, e in self._async_clients.items() if old.is_closed()]
                    for old, _ in dead:
                        del self._async_clients[old]
                    entry = self._async_clients[loop] = _LoopClients(self, loop)
                client = entry.clients.get(service)
                if client is None:
                    client = self._async_client({"base_url": f"http://{service}"}, (service,))
                    entry.clients[service] = client
            for old, e in dead:
                e.abandon(old)
        return client

    def _forget_loop(self, loop: asyncio.AbstractEventLoop, entry: _LoopClients) -> None:
        with self._update_lock:
            if self._async_clients.get(loop) is entry:
                del self._async_clients[loop]

    # -- server side ---------------------------------------------------------------------

    def asgi(self, app: Any) -> Any:
        """Wrap an ASGI app in the mesh's server middleware."""
        from meshlib.http.asgi import MeshMiddleware

        return MeshMiddleware(app, mesh=self)

    def wsgi(self, app: Any) -> Any:
        """Wrap a WSGI app in the mesh's server middleware."""
        from meshlib.http.wsgi import MeshMiddleware

        return MeshMiddleware(app, mesh=self)

    def serve(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        mtls: str | None = None,
        interface: str = "auto",
        consul: str | None = None,
        **uvicorn_kwargs: Any,
    ) -> None:
        """Run an ASGI or WSGI app under uvicorn with the mesh's middleware (blocks until shutdown).

        The kind of app is detected (`interface="auto"`): a coroutine callable of (scope, receive,
        send) is ASGI (Starlette, FastAPI); a callable of (environ, start_response) is WSGI (Flask,
        Django), run on a thread pool through a2wsgi. Both get the same mTLS, caller identity,
        authorization, rate limits and telemetry. Pass `interface="asgi"` or `"wsgi"` for an app
        whose signature does not tell.

        With a control service, the instance registers once the server accepts connections
        and deregisters when it stops; one INFO line says when it is ready. `port=0` takes a
        free port; `mesh.address` tells it once the server accepts connections. An app that
        already has `MeshMiddleware` is fine: the inner one passes through. `mtls` overrides
        the Mesh's mode for this server only (an edge service: PERMISSIVE, or DISABLE with
        uvicorn's own `ssl_*` arguments; with STRICT or PERMISSIVE, `http=` and `ssl_*` are
        refused: they would replace the mesh's mTLS), while the Mesh's clients keep calling mesh
        services over mTLS. `consul` (an agent URL, `consul://127.0.0.1:8500`) also registers the
        instance in Consul with a health check on it (an HTTP GET of `/` on a plain port, a TCP
        connect under mTLS) and deregisters it on exit (docs/discovery.md)."""
        import uvicorn

        from meshlib.http.console import console_logging
        from meshlib.http.serving import meshed_app

        mode = self._server_mtls(mtls)
        options = self.uvicorn_options(mode)
        if options:  # mTLS is served by the mesh's own protocol: nothing may replace or wrap it
            taken = sorted(k for k in uvicorn_kwargs if k == "http" or k.startswith("ssl_"))
            if taken:
                raise ValueError(
                    f"serve(mtls={mode!r}) serves mTLS itself; {', '.join(taken)} would replace it "
                    "(with plaintext or another TLS): leave them out, or pass mtls='DISABLE' to "
                    "serve with uvicorn's own options"
                )
        served, release = meshed_app(self, app, interface)
        uvicorn_kwargs.setdefault("log_level", "warning")
        uvicorn_kwargs.update(options)
        config = uvicorn.Config(served, host=host, port=port, interface="asgi3", **uvicorn_kwargs)
        server = uvicorn.Server(config)
        if consul is not None and not self.service:
            raise ValueError("registering in Consul needs the Mesh's service name")
        consul_registration: list[Any] = []  # filled once the server accepts connections
        bound: list[str] = []  # this server's address, once it accepts connections
        with console_logging():  # the ready line shows even where logging is not configured
            started = self._register_when_started(
                server, f"{host}:{port}", mode, consul, consul_registration, bound
            )
            registering = self.runtime.submit(started)
            try:
                server.run()
            except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully, then re-raised the signal
                pass
            finally:
                server.should_exit = True  # a registration still under way finishes, then is undone
                with contextlib.suppress(Exception):
                    registering.result(timeout=10.0)
                # this server's address only: another server of the same process (HTTP on another
                # port, gRPC) stays registered; `self.address` names the last one to start
                for address in bound:
                    self.deregister(address)
                for registration in consul_registration:
                    self._leave_consul(registration)
                release()

    def serve_grpc(
        self,
        server_or_servicers: Any,
        port: int = 50051,
        host: str = "127.0.0.1",
        *,
        mtls: str | None = None,
        plaintext_port: int | None = None,
        advertise: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_workers: int = 16,
    ) -> GrpcServing:
        """Serve gRPC on host:port with the mesh's credentials, registered with the control
        service as a `grpc` endpoint of this service; returns at once with a `GrpcServing`
        (`.address`, `.port`, `.wait()`, `.stop()`, a context manager) that deregisters on stop.

        `server_or_servicers`: a `grpc.server(...)` the app built with
        `meshlib.grpc.server_interceptors(self)` (not started, no port added), or a list of
        callables each given the server to put a servicer on it
        (`functools.partial(add_EchoServicer_to_server, Echo())`): the server is then built
        here, with the interceptors and `max_workers` threads. `port=0` takes a free port;
        `advertise` is the address to register when `host` is not one callers can reach
        (`0.0.0.0`). Under mtls PERMISSIVE, `plaintext_port` adds a port for callers without
        TLS (grpcio cannot take both on one port); only the TLS port is registered, since mesh
        callers hold certificates. docs/grpc-server.md."""
        from meshlib.grpc.serving import serve_grpc

        return serve_grpc(
            self,
            server_or_servicers,
            port=port,
            host=host,
            mtls=mtls,
            plaintext_port=plaintext_port,
            advertise=advertise,
            labels=labels,
            max_workers=max_workers,
        )

    async def serve_grpc_aio(
        self,
        server_or_servicers: Any,
        port: int = 50051,
        host: str = "127.0.0.1",
        *,
        mtls: str | None = None,
        plaintext_port: int | None = None,
        advertise: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> AioGrpcServing:
        """`serve_grpc` for grpc.aio: a `grpc.aio.server(...)` built with
        `meshlib.grpc.aio_server_interceptors(self)`, or a list of callables as above;
        `await serving.stop()` deregisters, then stops the server."""
        from meshlib.grpc.serving import serve_grpc_aio

        return await serve_grpc_aio(
            self,
            server_or_servicers,
            port=port,
            host=host,
            mtls=mtls,
            plaintext_port=plaintext_port,
            advertise=advertise,
            labels=labels,
        )

    def serve_gateway(
        self, host: str = "127.0.0.1", *, ports: Mapping[int, int] | None = None
    ) -> GatewayServing:
        """Run this Mesh's service as an ingress gateway (docs/gateway.md): the listeners of
        its `Gateway` document, routing by its Route to mesh services through this Mesh's client
        stack. Returns once the listeners accept connections, with a `GatewayServing`
        (`.addresses`, `.wait()`, `.stop()`, a context manager); rules changes apply live.
        `ports` maps a document port to the one to bind instead (0: any free port)."""
        from meshlib.gateway import serve_gateway

        return serve_gateway(self, host, ports)

    def uvicorn_options(self, mtls: str | None = None) -> dict[str, Any]:
        """`uvicorn.Config` arguments serving this mesh's mTLS (the Mesh's `mtls` mode, or this
        one for one server; certificates kept current for new connections); empty without mTLS.
        `serve()` uses them."""
        mode = self._server_mtls(mtls)
        if self.credentials is None or mode not in ("STRICT", "PERMISSIVE"):
            return {}
        from meshlib.security.uvicorn_tls import mtls_protocol

        return {"http": mtls_protocol(self.credentials.server_context, mode, self.trust_domain)}

    def _server_mtls(self, mtls: str | None) -> str | None:
        """The mode of one server: the Mesh's unless `mtls` says otherwise."""
        mode = _mtls_mode(mtls) if mtls is not None else self.mtls
        if mode in ("STRICT", "PERMISSIVE") and self.credentials is None:
            raise ValueError(f"mtls={mode!r} needs an identity (credentials=, or control= with a join token)")
        return mode

    async def _register_when_started(
        self,
        server: Any,
        address: str,
        mtls: str | None,
        consul: str | None = None,
        consul_registration: list[Any] | None = None,
        bound: list[str] | None = None,
    ) -> None:
        """Once `server` accepts connections: its address (the real port for `port=0`), then
        register (with a control service, the address then appended to `bound`; in Consul) and
        say so. An address given to the Mesh (`address=`, MESH_ADDRESS) is the one registered:
        where callers reach this instance (a container's published address), which the
        listening one may not be."""
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        listening = _bound_address(server, address)
        if self._settings is None or self._settings.address is None:  # no address configured
            self.address = listening
            if self._link is not None and _unspecified(listening):
                log.warning(
                    "%s listens on %s and registers that address, which only this host can call; "
                    "give Mesh(address=...) or MESH_ADDRESS the address callers reach",
                    self.service,
                    listening,
                )
        address = self.address or listening
        registered: bool | None = None
        if self._link is not None and self.service:
            registration = self.register(address)
            if bound is not None:
                bound.append(address)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(registration.registered.wait(), READY_REGISTRATION_WAIT)
            registered = registration.registered.is_set()
        if consul is not None and consul_registration is not None:
            await self._join_consul(consul, address, mtls, consul_registration)
        log.info("%s", _ready_line(self, listening, registered, mtls))

    async def _join_consul(self, url: str, address: str, mtls: str | None, out: list[Any]) -> None:
        """Register in Consul; a refusal is logged, the server keeps serving (as with the
        control service, registration is how callers find it, not a reason to stop)."""
        from meshlib.discovery.consul import ConsulError
        from meshlib.discovery.consul_registration import ConsulRegistration

        assert self.service is not None
        plain = mtls in (None, "DISABLE")  # under mTLS a TCP check: the agent holds no mesh certificate
        registration = ConsulRegistration(url, self.service, address, check="http" if plain else "tcp")
        try:
            await registration.register()
        except ConsulError as exc:
            log.warning("%s", exc)
            return
        out.append(registration)

    def _leave_consul(self, registration: Any) -> None:
        try:
            self.runtime.submit(registration.deregister()).result(timeout=10.0)
        except Exception as exc:  # shutting down: say so and go on
            log.warning("leaving Consul: %s", exc)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop background work and close the shared clients: the sync ones, and the async ones
        of closed loops; those of a loop still open close on it when it runs next (`aclose`
        closes the running loop's before returning)."""
        if self._closed:
            return
        self._closed = True
        self.deregister()
        for f in self.stack.filters:
            close = getattr(f, "close", None)
            if close is not None:
                close()
        self.telemetry.close()
        self.resilience.close()
        authentication = sys.modules.get(_AUTHENTICATION)  # not loaded: nothing to forget
        if authentication is not None:
            authentication.forget(self)  # its JWKS URLs stop being fetched
        for client in self._sync_clients.values():
            client.close()
        self._sync_clients.clear()
        with self._update_lock:
            loops = list(self._async_clients.items())
            self._async_clients.clear()
        for loop, entry in loops:
            entry.close_soon(loop)
        if self._grpc is not None:
            self._grpc.close()
        if self._runtime is not None:
            with contextlib.suppress(Exception):
                if self._http_wire is not None:
                    self._runtime.submit(self._http_wire.shutdown()).result(2.0)
            if self.credentials is not None:
                with contextlib.suppress(Exception):
                    self._runtime.submit(self.credentials.aclose()).result(2.0)
            with contextlib.suppress(Exception):
                self._runtime.submit(self.discovery.aclose()).result(2.0)
            self._runtime.stop()

    async def aclose(self) -> None:
        """`close()`, once the shared async clients of the running loop are closed."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio's: no shared client of ours runs there
            loop = None
        with self._update_lock:
            entry = self._async_clients.pop(loop, None) if loop is not None else None
        if entry is not None:
            await entry.aclose()
        self.close()

    @property
    def closed(self) -> bool:
        """`close()` has been called: no background work runs, nothing new is started."""
        return self._closed

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Mesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Mesh(service={self.service!r}, version={self._snapshot.version!r})"


def _is_async(check: Callable[[Any], bool], fn: Callable[..., Any]) -> bool:
    """`check` (a coroutine function? an async generator function?) of `fn`, or of the
    `__call__` of a callable object: `inspect` looks at functions only."""
    if check(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn):
        return False
    return check(getattr(fn, "__call__", None))  # noqa: B004 (the method itself, not callable())


class _LoopClients:
    """`@mesh.call`'s async clients on one event loop.

    They close on their loop as it shuts down: `_closing` is an async generator parked at its
    yield, which asyncio's hooks register with the running loop, and `loop.shutdown_asyncgens()`
    (asyncio.run and asyncio.Runner call it before closing the loop; uvicorn runs under them)
    finishes it. A loop closed without that can run nothing any more, not even its transports'
    own close(): `abandon` closes their sockets instead of leaving them to the garbage
    collector."""

    def __init__(self, mesh: Mesh, loop: asyncio.AbstractEventLoop) -> None:
        self.clients: dict[str, httpx.AsyncClient] = {}
        self._closing_task: asyncio.Future[None] | None = None  # Mesh.close() closing them on the loop
        self._closer = self._closing(mesh, loop)
        with contextlib.suppress(StopIteration):  # its first step ends at the yield: registered
            self._closer.asend(None).send(None)

    async def _closing(self, mesh: Mesh, loop: asyncio.AbstractEventLoop) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            mesh._forget_loop(loop, self)
            for client in list(self.clients.values()):
                try:
                    await client.aclose()
                except Exception:
                    log.warning("closing a shared async client failed", exc_info=True)
            await asyncio.sleep(0)  # the transports' closing callbacks run: sockets closed now

    async def aclose(self) -> None:
        await self._closer.aclose()

    def close_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """From `Mesh.close()`, on any thread: closed on the loop when it next runs (a loop
        never run again, nor shut down, leaves them to the collector), or now if it is closed."""
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._start_closing)
                return
            except RuntimeError:  # closed meanwhile
                pass
        self.abandon(loop)

    def _start_closing(self) -> None:
        # the coroutine is made here, on the loop: none is left unawaited if the loop never runs
        self._closing_task = asyncio.ensure_future(self.aclose())

    def abandon(self, loop: asyncio.AbstractEventLoop) -> None:
        """`loop` is closed: the sockets of its transports (the clients' connections among
        them, and nothing anyone can use any more) are closed here. A selector loop (asyncio's
        default) keeps them in `_transports`; with another loop they wait for the collector."""
        self.clients.clear()
        transports = getattr(loop, "_transports", None)
        for transport in list(transports.values()) if transports is not None else ():
            sock = getattr(transport, "_sock", None)
            if sock is not None:
                transport._sock = None  # nothing left for its __del__ to close (or warn about)
                sock.close()


def _bound_address(server: Any, fallback: str) -> str:
    """host:port the server listens on (the real port when asked for port 0)."""
    for listener in getattr(server, "servers", None) or ():
        for sock in getattr(listener, "sockets", None) or ():
            host, port = sock.getsockname()[:2]
            return f"{host}:{port}"
    return fallback


def _unspecified(address: str) -> bool:
    """Whether `address` (host:port) listens on every interface (0.0.0.0, [::])."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _ready_line(mesh: Mesh, address: str, registered: bool | None, mtls: str | None) -> str:
    """The one line `serve()` logs when the server accepts connections."""
    labels = ",".join(f"{k}={v}" for k, v in sorted(mesh.labels.items())) or "none"
    if registered is None:
        registry = "not registered (no control service)"
    elif registered:
        registry = f"registered with {mesh.control}"
    else:
        registry = f"not yet registered with {mesh.control} (retrying in the background)"
    if registered is not None and mesh.address != address:
        registry = registry.replace(" with ", f" as {mesh.address} with ", 1)
    mtls = mtls if mesh.credentials is not None and mtls in ("STRICT", "PERMISSIVE") else "off"
    return f"{mesh.service or 'service'} ready on {address}: labels {labels}; {registry}; mTLS {mtls}"


def _mtls_mode(mode: str | None) -> str | None:
    if mode is None:
        return None
    upper = mode.upper()
    if upper not in MTLS_MODES:
        raise ValueError(f"mtls must be one of {', '.join(MTLS_MODES)}, not {mode!r}")
    return upper


MIN_WATCH_INTERVAL = 0.01  # seconds between looks at the rules file; faster only burns CPU


def _check_labels(labels: object) -> dict[str, str]:
    """This instance's labels, checked by the registry's rule (they are registered as they are)."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"Mesh(labels=...) must be a mapping of str to str, not {type(labels).__name__}")
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            shown = f"{key!r}: {value!r}"[:100]
            raise TypeError(f"Mesh(labels=...): keys and values must be str, not {shown}")
    if labels:
        from meshlib.control.registry import check_labels  # light: no pydantic

        try:
            check_labels(labels)
        except ValueError as exc:
            raise ValueError(f"Mesh(labels=...): {exc}") from None
    return dict(labels)


def _check_watch_interval(value: object) -> float:
    """Seconds between looks at the rules file: a number, at least MIN_WATCH_INTERVAL (0 would
    spin the runtime's thread; a string would end the watcher in the background)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Mesh(watch_interval=...) must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and value >= MIN_WATCH_INTERVAL):
        raise ValueError(
            f"Mesh(watch_interval=...) must be a number of seconds of at least {MIN_WATCH_INTERVAL}, "
            f"not {value!r}"
        )
    return float(value)


def _is_provider(value: object) -> bool:
    """A discovery `Provider` by its shape (a Protocol: nothing to subclass)."""
    return isinstance(getattr(type(value), "kind", None), str) and callable(getattr(value, "watch", None))


def _check_discovery(discovery: object) -> None:
    if discovery is None or isinstance(discovery, str) or _is_provider(discovery):
        return
    if isinstance(discovery, Sequence) and not isinstance(discovery, bytes | bytearray):
        for item in discovery:
            if not isinstance(item, str) and not _is_provider(item):
                raise TypeError(
                    f"Mesh(discovery=[...]): each item must be a provider URL (str) or a discovery "
                    f"Provider, not {type(item).__name__}"
                )
        return
    raise TypeError(
        "Mesh(discovery=...) must be a provider URL ('consul://127.0.0.1:8500'), a discovery Provider, "
        f"or a list of them, not {type(discovery).__name__}"
    )
