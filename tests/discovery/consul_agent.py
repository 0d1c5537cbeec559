"""A Consul agent for tests: the HTTP API py-consul speaks, over real HTTP on 127.0.0.1.

It holds a catalog (nodes, services, checks) with a raft-like index and answers
`GET /v1/health/service/<name>` as Consul does: `index` + `wait` block until the service's index
passes the one asked for or the wait (plus up to wait/16) elapses; `passing`, `tag`, `dc` and
`node-meta` filter; bodies are the documented shape (Node, Service, Checks) with the
X-Consul-Index, X-Consul-KnownLeader and X-Consul-LastContact headers. `PUT
/v1/agent/service/register` and `/v1/agent/service/deregister/<id>` register on the agent's own
node and run the HTTP check the registration names. ACLs: with `token` set, a read without a
token is filtered to nothing and an unknown token is refused (403 "ACL not found").

Misbehaviour on demand: `rewind(index)` (a snapshot restore: the index goes backwards),
`fail(times)` (500s), `hang()` (accept, never answer), `instant()` (answer blocking queries at
once), `force_index(value)` (a bogus X-Consul-Index, e.g. 0). `filter` expressions are recorded,
not evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from meshlib.testing import RunningServer, serve

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0


def go_duration(text: str) -> float:
    """Seconds in a Go duration ("10s", "1500ms", "1m30s"); ValueError otherwise."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class Node:
    name: str
    address: str
    datacenter: str
    meta: dict[str, str]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    index: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self.address,
                "lan_ipv4": self.address,
                "wan": self.address,
                "wan_ipv4": self.address,
            },
            "Meta": {"consul-network-segment": "", **self.meta},  # the segment key: as agents report it
            "CreateIndex": self.index,
            "ModifyIndex": self.index,
        }


@dataclass
class Instance:
    id: str
    service: str
    node: str
    port: int
    address: str
    tags: list[str]
    meta: dict[str, str]
    weights: dict[str, int]
    status: str
    locality: dict[str, str] | None
    check: dict[str, Any] | None
    create_index: int
    modify_index: int

    def service_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Kind": "",
            "ID": self.id,
            "Service": self.service,
            "Tags": list(self.tags),
            "Address": self.address,
            "Meta": dict(self.meta),
            "Port": self.port,
            "Weights": dict(self.weights),
            "EnableTagOverride": False,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.address:
            body["TaggedAddresses"] = {
                "lan_ipv4": {"Address": self.address, "Port": self.port},
                "wan_ipv4": {"Address": self.address, "Port": self.port},
            }
        if self.locality:
            body["Locality"] = dict(self.locality)
        return body

    def checks_body(self, node: Node) -> list[dict[str, Any]]:
        check = self.check or {}
        return [
            {
                "Node": node.name,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": node.index,
                "ModifyIndex": node.index,
            },
            {
                "Node": node.name,
                "CheckID": f"service:{self.id}",
                "Name": f"Service '{self.service}' check",
                "Status": self.status,
                "Notes": "",
                "Output": "",
                "ServiceID": self.id,
                "ServiceName": self.service,
                "ServiceTags": list(self.tags),
                "Type": "http" if check.get("http") else "tcp" if check.get("tcp") else "",
                "Interval": check.get("interval", ""),
                "Timeout": check.get("timeout", ""),
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": self.create_index,
                "ModifyIndex": self.modify_index,
            },
        ]


@dataclass
class Recorded:
    """One request as the agent saw it (the token is kept here for tests to compare)."""

    method: str
    path: str
    params: list[tuple[str, str]]
    token: str | None
    body: Any = None


class ConsulAgentEmulator:
    """Start with `with ConsulAgentEmulator() as agent:`; `agent.url` is a `consul://` URL."""

    def __init__(
        self,
        *,
        datacenter: str = "dc1",
        node: str = "agent-one",
        token: str | None = None,
        **server_options: Any,
    ) -> None:
        """`server_options` go to uvicorn (`ssl_certfile`, `ssl_keyfile` for an HTTPS agent)."""
        self.server_options = server_options
        self.datacenter = datacenter
        self.agent_node = node
        self.token = token
        self.datacenters = {datacenter}
        self.requests: list[Recorded] = []
        self._lock = threading.RLock()  # re-entered by `batch`
        self._raft = 1
        self._nodes: dict[str, Node] = {}
        self._instances: dict[str, Instance] = {}
        self._service_index: dict[str, int] = {}
        self._fail = 0
        self._stopping = False
        self._hang = False
        self._instant = False
        self._forced: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._release: asyncio.Event | None = None
        self._checks: dict[str, asyncio.Task[None]] = {}
        self._server: RunningServer | None = None
        self.add_node(node, "127.0.0.1")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ConsulAgentEmulator:
        app = Starlette(
            routes=[
                Route("/v1/health/service/{name}", self._health_service, methods=["GET"]),
                Route("/v1/agent/service/register", self._register, methods=["PUT"]),
                Route("/v1/agent/service/deregister/{id}", self._deregister, methods=["PUT"]),
            ]
        )
        self._server = serve(app, **self.server_options)
        # One request so the server's loop is known before a test mutates the catalog.
        scheme = "https" if "ssl_certfile" in self.server_options else "http"
        httpx.get(f"{scheme}://{self._server.address}/v1/health/service/-", verify=False)
        with self._lock:
            self.requests.clear()
        return self

    def stop(self) -> None:
        self._stopping = True  # held queries answer now: uvicorn's shutdown waits for them
        self._wake()
        self.hang(False)
        if self._loop is not None:
            for task in list(self._checks.values()):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> ConsulAgentEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        assert self._server is not None
        return self._server.address

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    @property
    def url(self) -> str:
        return f"consul://{self.address}?dc={self.datacenter}"

    # -- the catalog ------------------------------------------------------------------------

    def add_node(
        self, name: str, address: str, *, datacenter: str | None = None, meta: dict[str, str] | None = None
    ) -> None:
        with self._lock:
            self._raft += 1
            dc = datacenter or self.datacenter
            self.datacenters.add(dc)
            self._nodes[name] = Node(name, address, dc, dict(meta or {}), index=self._raft)
        self._wake()

    def add(
        self,
        service: str,
        id: str,
        port: int,
        *,
        address: str = "",
        node: str | None = None,
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        weights: dict[str, int] | None = None,
        status: str = "passing",
        locality: dict[str, str] | None = None,
        check: dict[str, Any] | None = None,
    ) -> int:
        """Register (or replace) an instance; returns the new index."""
        with self._lock:
            self._raft += 1
            old = self._instances.get(id)
            self._instances[id] = Instance(
                id=id,
                service=service,
                node=node or self.agent_node,
                port=port,
                address=address,
                tags=list(tags or []),
                meta=dict(meta or {}),
                weights=dict(weights or {"Passing": 1, "Warning": 1}),
                status=status,
                locality=locality,
                check=check,
                create_index=old.create_index if old else self._raft,
                modify_index=self._raft,
            )
            self._service_index[service] = self._raft
            index = self._raft
        self._wake()
        return index

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes made inside are seen together, as one answer (a burst of registrations)."""
        with self._lock:
            yield
        self._wake()

    def set_status(self, id: str, status: str) -> None:
        with self._lock:
            instance = self._instances[id]
            if instance.status == status:
                return
            self._raft += 1
            instance.status = status
            instance.modify_index = self._raft
            self._service_index[instance.service] = self._raft
        self._wake()

    def remove(self, id: str) -> bool:
        with self._lock:
            instance = self._instances.pop(id, None)
            if instance is None:
                return False
            self._raft += 1
            self._service_index[instance.service] = self._raft
        self._wake()
        return True

    def index(self, service: str) -> int:
        with self._lock:
            return self._service_index.get(service, self._raft)

    def instances(self) -> dict[str, Instance]:
        with self._lock:
            return dict(self._instances)

    # -- misbehaviour -----------------------------------------------------------------------

    def rewind(self, index: int) -> None:
        """A snapshot restore: every index goes back to at most `index`; the data stays."""
        with self._lock:
            self._raft = index
            for service, value in self._service_index.items():
                self._service_index[service] = min(value, index)
        self._wake()

    def fail(self, times: int = 1) -> None:
        """Answer the next `times` health queries with a 500 (-1: until `fail(0)`)."""
        with self._lock:
            self._fail = times
        self._wake()

    def hang(self, on: bool = True) -> None:
        self._hang = on
        if not on and self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    def instant(self, on: bool = True) -> None:
        """Answer blocking queries at once, the index unchanged (a misbehaving agent)."""
        self._instant = on
        self._wake()

    def force_index(self, value: str | None) -> None:
        self._forced = value

    def health_queries(self, service: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.startswith("/v1/health/service/")
                and (service is None or r.path.endswith(f"/{service}"))
            ]

    # -- the HTTP API -----------------------------------------------------------------------

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_waiters)

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _record(self, request: Request, body: Any = None) -> str | None:
        self._loop = asyncio.get_running_loop()
        if self._release is None:
            self._release = asyncio.Event()
        token = request.headers.get("x-consul-token") or request.query_params.get("token")
        bearer = request.headers.get("authorization", "")
        if not token and bearer.lower().startswith("bearer "):
            token = bearer[7:]
        with self._lock:
            self.requests.append(
                Recorded(request.method, request.url.path, request.query_params.multi_items(), token, body)
            )
        return token

    def _headers(self, index: int) -> dict[str, str]:
        return {
            "X-Consul-Index": self._forced if self._forced is not None else str(index),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "leader",
        }

    async def _hung(self) -> None:
        assert self._release is not None
        while self._hang:
            self._release.clear()
            await self._release.wait()

    async def _health_service(self, request: Request) -> Response:
        token = self._record(request)
        if self._hang:
            await self._hung()
        if self.token is not None and token and token != self.token:
            return PlainTextResponse("ACL not found", status_code=403)
        params = request.query_params
        dc = params.get("dc") or self.datacenter
        if dc not in self.datacenters:
            return PlainTextResponse("No path to datacenter", status_code=500)
        try:
            min_index = int(params.get("index", "0") or 0)
            wait = min(go_duration(params["wait"]), MAX_WAIT) if "wait" in params else DEFAULT_WAIT
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        name = request.path_params["name"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        while True:
            with self._lock:
                if self._fail:
                    if self._fail > 0:
                        self._fail -= 1
                    return PlainTextResponse("rpc error making call: EOF", status_code=500)
                index = max(self._service_index.get(name, self._raft), 1) if self._raft else 0
                if (
                    min_index == 0
                    or index > min_index
                    or self._instant
                    or self._stopping
                    or loop.time() >= deadline
                ):
                    body = self._entries(name, dc, params, filtered=self.token is not None and token is None)
                    break
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.add(future)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
        headers = self._headers(index)
        if self.token is not None and token is None:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return JSONResponse(body, headers=headers)

    def _entries(self, name: str, dc: str, params: Any, *, filtered: bool) -> list[dict[str, Any]]:
        if filtered:
            return []
        passing = "passing" in params and params["passing"].lower() not in ("false", "0")
        tags = params.getlist("tag")
        node_meta = [m.partition(":") for m in params.getlist("node-meta")]
        out = []
        for instance in self._instances.values():
            node = self._nodes[instance.node]
            if instance.service != name or node.datacenter != dc:
                continue
            if passing and instance.status != "passing":
                continue
            if any(tag not in instance.tags for tag in tags):
                continue
            if any(node.meta.get(k) != v for k, _, v in node_meta):
                continue
            out.append(
                {
                    "Node": node.body(),
                    "Service": instance.service_body(),
                    "Checks": instance.checks_body(node),
                }
            )
        return out

    async def _register(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            return PlainTextResponse(f"Request decode failed: {exc}", status_code=400)
        token = self._record(request, body)
        if self.token is not None and token != self.token:
            return PlainTextResponse("Permission denied", status_code=403)
        get = _keys(body)
        name = get("name")
        if not name:
            return PlainTextResponse("Missing service name", status_code=400)
        checks = get("checks") or ([get("check")] if get("check") else [])
        check = _keys(checks[0]) if checks else None
        check_def = (
            {
                "http": check("http"),
                "tcp": check("tcp"),
                "interval": check("interval"),
                "timeout": check("timeout") or "10s",
                "tls_skip_verify": bool(check("tls_skip_verify")),
                "deregister_critical_service_after": check("DeregisterCriticalServiceAfter"),
            }
            if check
            else None
        )
        service_id = get("id") or name
        self.add(
            name,
            service_id,
            int(get("port") or 0),
            address=get("address") or "",
            tags=get("tags") or [],
            meta=get("meta") or {},
            weights=get("weights") or None,
            status="critical" if check_def else "passing",  # a check starts critical, as in Consul
            check=check_def,
        )
        if check_def and (check_def["http"] or check_def["tcp"]):
            old = self._checks.pop(service_id, None)
            if old is not None:
                old.cancel()
            self._checks[service_id] = asyncio.get_running_loop().create_task(
                self._run_check(service_id, check_def)
            )
        return Response(status_code=200)

    async def _run_check(self, service_id: str, check: dict[str, Any]) -> None:
        """Consul's HTTP check (2xx passing, 429 warning, else critical) or TCP check."""
        interval = go_duration(check["interval"] or "10s")
        timeout = go_duration(check["timeout"])
        async with httpx.AsyncClient(timeout=timeout, verify=not check["tls_skip_verify"]) as client:
            while True:
                status = "critical"
                try:
                    if check["http"]:
                        code = (await client.get(check["http"])).status_code
                        status = "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
                    else:
                        host, _, port = check["tcp"].rpartition(":")
                        conn = asyncio.open_connection(host.strip("[]"), int(port))
                        _, writer = await asyncio.wait_for(conn, timeout)
                        writer.close()
                        status = "passing"
                except (httpx.HTTPError, OSError, TimeoutError):
                    pass
                if service_id not in self.instances():
                    return
                self.set_status(service_id, status)
                await asyncio.sleep(interval)

    async def _deregister(self, request: Request) -> Response:
        token = self._record(request)
        if self.token is not None and token != self.token:
            return PlainTextResponse("Permission denied", status_code=403)
        service_id = request.path_params["id"]
        task = self._checks.pop(service_id, None)
        if task is not None:
            task.cancel()
        if not self.remove(service_id):
            hint = "Ensure that the service ID is passed, not the service name."
            return PlainTextResponse(f'Unknown service ID "{service_id}". {hint}', status_code=404)
        return Response(status_code=200)


def _keys(body: dict[str, Any]) -> Any:
    """Consul decodes request bodies case-insensitively and takes snake_case for CamelCase."""
    folded = {k.replace("_", "").lower(): v for k, v in body.items()}
    return lambda key: folded.get(key.replace("_", "").lower())


__all__ = ["ConsulAgentEmulator", "Recorded", "go_duration"]
