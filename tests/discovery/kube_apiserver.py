"""A kube-apiserver for EndpointSlices, over real HTTP, for the real `kubernetes` client.

It speaks what the client sends and parses for discovery.k8s.io/v1 EndpointSlices in a
namespace: the list (an EndpointSliceList whose metadata.resourceVersion a watch starts
from; items without kind/apiVersion, as the server sends them) and the watch (`watch=true`: a
chunked stream of newline-delimited `{"type", "object"}` events, ADDED/MODIFIED/DELETED with the
whole object stamped with its new resourceVersion, BOOKMARK only with allowWatchBookmarks and
carrying nothing but metadata.resourceVersion, ERROR with a Status). `compact()` forgets the
history: a watch from an older resourceVersion then gets the API server's answer, HTTP 200 and
one ERROR event with a Status of code 410, reason Expired, "too old resource version: X (Y)"
(or, with `gone_as_http`, an HTTP 410 with that Status as the body, as a request that misses
the watch cache gets). Bearer-token authentication; a wrong token gets a 401 Status.

Changes are made from the test's thread (`apply`, `delete`, `bookmark`, `compact`,
`drop_watches`); open watches are fed on the server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from meshlib.testing import RunningServer, serve

GROUP_VERSION = "discovery.k8s.io/v1"
SERVICE_NAME = "kubernetes.io/service-name"
CREATED = "2026-01-01T00:00:00Z"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A metav1.Status as the API server serializes a failure."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def endpoint(
    ip: str,
    *,
    ready: bool | None = True,
    serving: bool | None = True,
    terminating: bool | None = False,
    node: str | None = None,
    zone: str | None = None,
    pod: str | None = None,
) -> dict[str, Any]:
    """One discovery.k8s.io/v1 Endpoint; a condition given as None is left out (nil)."""
    conditions = {k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating))}
    ep: dict[str, Any] = {
        "addresses": [ip],
        "conditions": {k: v for k, v in conditions.items() if v is not None},
    }
    if pod:
        ep["targetRef"] = {"kind": "Pod", "namespace": "default", "name": pod, "uid": str(uuid.uuid4())}
    if node:
        ep["nodeName"] = node
    if zone:
        ep["zone"] = zone
    return ep


def port(number: int, name: str | None = None, app_protocol: str | None = None) -> dict[str, Any]:
    """One EndpointPort (`name` empty for a Service's single unnamed port)."""
    p: dict[str, Any] = {"name": name or "", "protocol": "TCP", "port": number}
    if app_protocol:
        p["appProtocol"] = app_protocol
    return p


def endpoint_slice(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    *,
    namespace: str = "default",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller writes it (server fields added on apply)."""
    return {
        "metadata": {
            "name": name,
            "generateName": f"{service}-",
            "namespace": namespace,
            "labels": {
                SERVICE_NAME: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "name": service,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}.{service}")),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


def matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass(eq=False)
class _Stream:
    """One open watch: its filter and the queue the test thread feeds on the server loop."""

    namespace: str
    selector: str
    bookmarks: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    def send(self, event: dict[str, Any] | None) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop is gone: so is this watch
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class KubeApiServer:
    """The emulated API server's state and its HTTP app; `start()` serves it on 127.0.0.1."""

    def __init__(self, token: str = "emulator-token") -> None:
        self.token = token
        self.lock = threading.Lock()
        self.version = 1000  # etcd's revision: one counter for every object
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, type, object)
        self.compacted = 0  # watches from a version below this get 410
        self.gone_as_http = False
        self.resumed = threading.Event()  # cleared by pause(): watch requests wait for resume()
        self.resumed.set()
        self.streams: set[_Stream] = set()
        self.lists: list[str] = []  # labelSelector of each list request
        self.watches: list[str] = []  # resourceVersion of each watch request
        self._uids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self.endpointslices)
            ]
        )
        self.server: RunningServer | None = None

    # -- the test's side --------------------------------------------------------------------

    def start(self) -> KubeApiServer:
        self.server = serve(self.app)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def stop(self) -> None:
        """The API server goes away: watches end, new connections are refused."""
        self.resume()
        self.drop_watches()
        if self.server is not None:
            self.server.kill()
            self.server = None

    def kubeconfig(self, context: str = "emulator", namespace: str | None = None) -> dict[str, Any]:
        """A kubeconfig (as a dict, for yaml) pointing at this server with its bearer token."""
        ctx: dict[str, Any] = {"cluster": "emulator", "user": "tester"}
        if namespace:
            ctx["namespace"] = namespace
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
        }

    def apply(self, obj: dict[str, Any]) -> int:
        """Create or replace an EndpointSlice; its new resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self.lock:
            self.version += 1
            old = self.objects.get(key)
            meta["uid"] = (
                old["metadata"]["uid"] if old else f"00000000-0000-4000-8000-{next(self._uids):012d}"
            )
            meta["generation"] = old["metadata"]["generation"] + 1 if old else 1
            meta["creationTimestamp"] = CREATED
            meta["resourceVersion"] = str(self.version)
            obj = {"kind": "EndpointSlice", "apiVersion": GROUP_VERSION, **obj}
            self.objects[key] = obj
            self._record("MODIFIED" if old else "ADDED", obj)
            return self.version

    def delete(self, name: str, namespace: str = "default") -> int:
        with self.lock:
            obj = copy.deepcopy(self.objects.pop((namespace, name)))
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self._record("DELETED", obj)
            return self.version

    def bookmark(self) -> int:
        """A BOOKMARK at the current resourceVersion to every watch that asked for them."""
        with self.lock:
            event = {
                "type": "BOOKMARK",
                "object": {
                    "kind": "EndpointSlice",
                    "apiVersion": GROUP_VERSION,
                    "metadata": {"resourceVersion": str(self.version), "creationTimestamp": None},
                    "addressType": "",
                    "endpoints": None,
                },
            }
            for s in self.streams:
                if s.bookmarks:
                    s.send(event)
            return self.version

    def compact(self) -> int:
        """Forget every change up to now (etcd compaction): older versions are Gone."""
        with self.lock:
            self.compacted = self.version
            self.history.clear()
            return self.version

    def pause(self) -> None:
        """Hold new watch requests (a client reconnecting while the network is out)."""
        self.resumed.clear()

    def resume(self) -> None:
        self.resumed.set()

    def drop_watches(self) -> None:
        """End every open watch (the server restarted, a load balancer cut the connection)."""
        with self.lock:
            for s in self.streams:
                s.send(None)

    # -- the server's side ------------------------------------------------------------------

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.version, kind, obj))
        meta = obj["metadata"]
        for s in self.streams:
            if s.namespace == meta["namespace"] and matches(s.selector, meta.get("labels", {})):
                s.send({"type": kind, "object": obj})

    async def endpointslices(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return JSONResponse(status(401, "Unauthorized", "Unauthorized"), status_code=401)
        namespace = request.path_params["namespace"]
        q = request.query_params
        selector = q.get("labelSelector", "")
        if q.get("watch") not in ("true", "1"):
            return self._list(namespace, selector)
        with self.lock:
            self.watches.append(q.get("resourceVersion", ""))
        if not self.resumed.is_set():
            await asyncio.to_thread(self.resumed.wait, 10)
        return self._watch(
            namespace,
            selector,
            q.get("resourceVersion", ""),
            q.get("allowWatchBookmarks") == "true",
            int(q.get("timeoutSeconds", "1800")),
        )

    def _list(self, namespace: str, selector: str) -> Response:
        with self.lock:
            self.lists.append(selector)
            items = []
            for (ns, _), obj in sorted(self.objects.items()):
                if ns == namespace and matches(selector, obj["metadata"].get("labels", {})):
                    items.append({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")})
            body = {
                "kind": "EndpointSliceList",
                "apiVersion": GROUP_VERSION,
                "metadata": {"resourceVersion": str(self.version)},
                "items": items,
            }
        return JSONResponse(body)

    def _watch(self, namespace: str, selector: str, version: str, bookmarks: bool, timeout: int) -> Response:
        with self.lock:
            since = int(version or 0)
            if since and since < self.compacted:
                gone = status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
                if self.gone_as_http:
                    return JSONResponse(gone, status_code=410)
                return StreamingResponse(
                    self._lines([{"type": "ERROR", "object": gone}]), media_type="application/json"
                )
            if since:
                backlog = [{"type": k, "object": o} for v, k, o in self.history if v > since]
            else:  # "" or "0": the current state first, as synthetic ADDED events
                backlog = [{"type": "ADDED", "object": o} for o in self.objects.values()]
            backlog = [
                e
                for e in backlog
                if e["object"]["metadata"]["namespace"] == namespace
                and matches(selector, e["object"]["metadata"].get("labels", {}))
            ]
            stream = _Stream(namespace, selector, bookmarks, asyncio.get_running_loop())
            self.streams.add(stream)
        return StreamingResponse(self._events(stream, backlog, timeout), media_type="application/json")

    async def _lines(self, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        for e in events:
            yield json.dumps(e).encode() + b"\n"

    async def _events(
        self, stream: _Stream, backlog: list[dict[str, Any]], timeout: int
    ) -> AsyncIterator[bytes]:
        try:
            async for line in self._lines(backlog):
                yield line
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                try:
                    event = await asyncio.wait_for(stream.queue.get(), left)
                except TimeoutError:
                    return
                if event is None:
                    return
                yield json.dumps(event).encode() + b"\n"
        finally:
            with self.lock:
                self.streams.discard(stream)


def main() -> None:
    """`python -m tests.discovery.kube_apiserver KUBECONFIG_PATH`: serve a Service `web` with
    two endpoints on the port named `http`, for trying the provider without a cluster."""
    import sys
    import time

    import yaml

    path = sys.argv[1] if len(sys.argv) > 1 else "kubeconfig.yaml"
    server = KubeApiServer().start()
    endpoints = [endpoint("10.0.0.1", zone="zone-a", node="node-1"), endpoint("10.0.0.2", zone="zone-b")]
    server.apply(endpoint_slice("web-abc12", "web", endpoints, [port(8080, "http")]))
    with open(path, "w") as f:
        yaml.safe_dump(server.kubeconfig(), f)
    print(f"API server at {server.url}; export KUBECONFIG={path}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
