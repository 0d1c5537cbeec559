"""Endpoints from Kubernetes: the EndpointSlices (discovery.k8s.io/v1) of one Service, listed
and then watched, merged into one endpoint set.

The `kubernetes` client is blocking, so each watch runs its list/watch loop on a thread of its
own and hands each whole set to the event loop with `call_soon_threadsafe`; the async side
keeps only the newest set, so a slow reader skips sets instead of queueing them. We call the
generated list function with `watch=True` and read the event lines ourselves rather than use
`kubernetes.watch.Watch.stream`: that helper retries a 410 Gone once from the same (expired)
resourceVersion and then raises, so it cannot recover by listing again, and it hides the
socket a stop must shut down. Events are read as plain JSON (no model deserialization): it is
cheaper and keeps a nil condition nil.

Which endpoints take requests (see docs/discovery.md): not `terminating`, `ready` (nil means
ready) and `serving` (nil means the `ready` value). A Service with publishNotReadyAddresses has
every endpoint `ready`; `serving` still says whether its readiness probe passes, and we follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from meshlib.discovery.base import EndpointSet, Target
from meshlib.endpoint import PROTOCOL_LABEL
from meshlib.rules import EndpointSpec

log = logging.getLogger("meshlib.discovery.kubernetes")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller
ZONE_LABEL = "zone"
NODE_LABEL = "node"
POD_LABEL = "pod"
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONNECT_TIMEOUT = 5.0
LIST_TIMEOUT = 30.0
WATCH_READ_GRACE = 30.0  # a watch read waits this much longer than the server's timeoutSeconds
GONE = 410

_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Options(BaseModel):
    """Per-service options of the Kubernetes provider (a `Target`'s options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(None, max_length=63, pattern=_NAME)
    """The Service's namespace; default: the URL's `namespace`, else the kubeconfig context's,
    else the pod's own (in cluster), else `default`."""
    port: str | None = Field(None, min_length=1, max_length=63)
    """The Service port's name; may be left out when the Service has a single port."""
    label_selector: str | None = Field(None, min_length=1, max_length=1000)
    """More label requirements ANDed with `kubernetes.io/service-name=<name>`."""
    address_type: Literal["IPv4", "IPv6"] | None = None
    """Only slices of this address family (both by default; FQDN slices are never used)."""
    watch_timeout: int = Field(300, ge=5, le=3600)
    """Seconds one watch request lasts before it is renewed from the last resourceVersion."""


class KubernetesError(Exception):
    """The watch cannot go on: the API server refused (`status`, e.g. 401, 403) or was not
    reached, or a Service is not configured as the options expect. Not a 410: that lists again."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Gone(Exception):
    """The resourceVersion we watch from was compacted away: list again."""


@dataclass(frozen=True, slots=True)
class _Source:
    """Where the API server and credentials come from, as the URL says."""

    kubeconfig: str | None  # a path (or KUBECONFIG's list); None: in-cluster
    context: str | None
    namespace: str | None

    @classmethod
    def parse(cls, url: str) -> _Source:
        parts = urlsplit(url)
        if parts.scheme != "kubernetes":
            raise ValueError(f"not a kubernetes:// URL: {url!r}")
        if parts.netloc:
            raise ValueError(f"{url!r}: a kubeconfig path is written kubernetes:///path (three slashes)")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"context", "namespace"}
        if unknown:
            raise ValueError(f"{url!r}: unknown parameter(s) {sorted(unknown)}; known: context, namespace")
        path = unquote(parts.path) or None
        if path is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
            path = os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
        return cls(path, query.get("context"), query.get("namespace"))


def _takes_requests(conditions: Mapping[str, Any]) -> bool:
    """EndpointConditions as the API documents them: nil `ready` is ready, nil `serving`
    defers to `ready`, nil `terminating` is not terminating."""
    if conditions.get("terminating") is True or conditions.get("ready") is False:
        return False
    return conditions.get("serving") is not False  # ready here, so a nil `serving` is too


def _pick_port(slice_: Mapping[str, Any], name: str | None) -> tuple[int, str | None] | None:
    """The slice's port number (and appProtocol) for the port named `name`; with no name, its
    only port. None when the slice lists no port (a Service without endpoints); a Service whose
    ports do not say which one is meant is an error rather than an empty set."""
    ports = [p for p in slice_.get("ports") or () if p.get("port") is not None]
    if not ports:
        return None
    names = sorted(str(p.get("name") or "") for p in ports)
    where = f"EndpointSlice {slice_['metadata'].get('name')!r} has ports {names}"
    if name is not None:
        ports = [p for p in ports if p.get("name") == name]
        if not ports:
            raise KubernetesError(f"{where}, none named {name!r}")
    elif len(ports) > 1:
        raise KubernetesError(f"{where}: set the `port` option")
    return int(ports[0]["port"]), ports[0].get("appProtocol")


def slice_endpoints(slice_: Mapping[str, Any], options: Options) -> tuple[EndpointSpec, ...]:
    """The endpoints of one EndpointSlice that take new requests, on the chosen port."""
    family = slice_.get("addressType")
    if family not in ("IPv4", "IPv6") or (options.address_type and family != options.address_type):
        return ()
    port = _pick_port(slice_, options.port)
    if port is None:
        return ()
    number, app_protocol = port
    out = []
    for ep in slice_.get("endpoints") or ():
        addresses = ep.get("addresses") or ()
        if not addresses or not _takes_requests(ep.get("conditions") or {}):
            continue
        host = addresses[0]  # the API defines no meaning for the others; kube-proxy ignores them
        labels: dict[str, str] = {}
        if ep.get("zone"):
            labels[ZONE_LABEL] = ep["zone"]
        if ep.get("nodeName"):
            labels[NODE_LABEL] = ep["nodeName"]
        ref = ep.get("targetRef") or {}
        if ref.get("kind") == "Pod" and ref.get("name"):
            labels[POD_LABEL] = ref["name"]
        if app_protocol == "grpc":
            labels[PROTOCOL_LABEL] = "grpc"
        address = f"[{host}]:{number}" if family == "IPv6" else f"{host}:{number}"
        out.append(EndpointSpec(address=address, labels=labels))
    return tuple(out)


def merge(slices: Mapping[str, tuple[EndpointSpec, ...]]) -> EndpointSet:
    """One set from a Service's slices, each address once (the controller may list an endpoint
    in two slices while it moves it), in a stable order."""
    chosen: dict[str, EndpointSpec] = {}
    for name in sorted(slices):
        for spec in slices[name]:
            chosen.setdefault(spec.address, spec)
    return tuple(chosen[a] for a in sorted(chosen))


def _lines(resp: Any) -> Iterator[bytes]:
    """The newline-delimited JSON of a watch response, each line as soon as it has arrived."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line for line in complete if line.strip())
    # a line cut off by the end of the stream is no event: the next watch sends it again


class _Watcher:
    """One Service's list-then-watch loop, on its own thread; hands whole sets to `publish`."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        selector: str,
        options: Options,
        publish: Callable[[EndpointSet | BaseException | None], None],
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self.options = options
        self.publish = publish
        self.slices: dict[str, tuple[EndpointSpec, ...]] = {}
        self.stopped = threading.Event()
        self._resp: Any = None
        self.thread = threading.Thread(target=self.run, daemon=True, name=f"meshlib-k8s-{selector}")

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            while not self.stopped.is_set():
                version = self._list()
                try:
                    while not self.stopped.is_set():
                        version = self._watch(version)
                except (_Gone, ApiException) as e:
                    if isinstance(e, ApiException) and e.status != GONE:
                        raise
                    log.info("%s: resourceVersion %s is gone (410); listing again", self._what, version)
        except ApiException as e:  # its text carries every response header: keep the gist
            failure = KubernetesError(f"{self._what}: API server answered {e.status} {e.reason}", e.status)
            failure.__cause__ = e
            self._fail(failure)
        except KubernetesError as e:
            self._fail(e)
        except Exception as e:
            failure = KubernetesError(f"{self._what}: {type(e).__name__}: {e}")
            failure.__cause__ = e
            self._fail(failure)
        else:
            self.publish(None)

    @property
    def _what(self) -> str:
        return f"EndpointSlices {self.selector} in {self.namespace}"

    def _fail(self, failure: KubernetesError) -> None:
        """Hand a failure to the async side (which raises it), unless the watch was stopped."""
        self.publish(None if self.stopped.is_set() else failure)

    def stop(self) -> None:
        self.stopped.set()
        resp = self._resp
        if resp is not None:
            # unblocks the thread's read at once; it then sees `stopped`
            with contextlib.suppress(ValueError, RuntimeError, OSError, AttributeError):
                resp.shutdown()

    def _list(self) -> str:
        resp = self.api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
        )
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self.slices = {
            item["metadata"]["name"]: slice_endpoints(item, self.options) for item in body.get("items") or ()
        }
        self.publish(merge(self.slices))
        return str(body["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        """One watch request from `version`; the resourceVersion to go on from when it ends."""
        resp = self.api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self.selector,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.options.watch_timeout,
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT, self.options.watch_timeout + WATCH_READ_GRACE),
        )
        self._resp = resp  # then look at `stopped`: a stop() that saw no response yet is seen here
        try:
            if self.stopped.is_set():
                return version
            for line in _lines(resp):
                if self.stopped.is_set():
                    break
                version = self._apply(json.loads(line), version)
        except Exception:
            if self.stopped.is_set():
                return version
            raise
        finally:
            self._resp = None
            resp.release_conn()
        return version

    def _apply(self, event: Mapping[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise _Gone()
            raise KubernetesError(
                f"{self._what}: watch error {obj.get('reason')}: {obj.get('message')}", obj.get("code")
            )
        meta = obj.get("metadata") or {}
        version = str(meta.get("resourceVersion") or version)
        if kind == "BOOKMARK":
            return version
        name = str(meta.get("name"))
        if kind in ("ADDED", "MODIFIED"):
            self.slices[name] = slice_endpoints(obj, self.options)
        elif kind == "DELETED":
            self.slices.pop(name, None)
        else:
            raise KubernetesError(f"unknown watch event type {kind!r}")
        self.publish(merge(self.slices))
        return version


class _Latest:
    """The newest value from a watcher thread, read on the event loop: sets overwrite each
    other unread, a failure or the end (None) is final."""

    _EMPTY: ClassVar[object] = object()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = asyncio.Event()
        self._value: object = self._EMPTY
        self._final = False

    def put(self, value: EndpointSet | BaseException | None) -> None:
        """From any thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is reading any more
            self._loop.call_soon_threadsafe(self._set, value)

    def _set(self, value: object) -> None:
        if self._final:
            return
        self._final = not isinstance(value, tuple)
        self._value = value
        self._ready.set()

    async def get(self) -> EndpointSet | BaseException | None:
        await self._ready.wait()
        value = self._value
        if not self._final:
            self._ready.clear()
        assert isinstance(value, (tuple, BaseException)) or value is None
        return value


class KubernetesProvider:
    """Endpoints of Kubernetes Services from their EndpointSlices, through one API server."""

    kind: ClassVar[str] = "kubernetes"

    def __init__(self, api_client: Any, namespace: str = "default") -> None:
        from kubernetes.client import DiscoveryV1Api

        self.api_client = api_client
        self.namespace = namespace
        self._api = DiscoveryV1Api(api_client)
        self._watchers: set[_Watcher] = set()

    @classmethod
    def from_url(cls, url: str) -> KubernetesProvider:
        """`kubernetes://` (in cluster when KUBERNETES_SERVICE_HOST is set, else KUBECONFIG or
        ~/.kube/config) or `kubernetes:///path/to/kubeconfig`; `?context=` and `?namespace=`
        (the default namespace) on either."""
        from kubernetes import client, config

        source = _Source.parse(url)
        configuration = client.Configuration()
        try:
            namespace = cls._configure(source, configuration)
        except config.ConfigException as e:
            where = "the in-cluster service account" if source.kubeconfig is None else source.kubeconfig
            raise KubernetesError(f"{url}: no usable configuration from {where}: {e}") from None
        return cls(client.ApiClient(configuration), namespace or "default")

    @staticmethod
    def _configure(source: _Source, configuration: Any) -> str | None:
        """Load credentials into `configuration`; the default namespace they name, if any."""
        from kubernetes import config

        namespace = source.namespace
        if source.kubeconfig is None:
            config.load_incluster_config(client_configuration=configuration)
            if namespace is None and IN_CLUSTER_NAMESPACE.exists():
                namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
        else:
            config.load_kube_config(
                config_file=source.kubeconfig,
                context=source.context,
                client_configuration=configuration,
                persist_config=False,
            )
            if namespace is None:
                contexts, current = config.list_kube_config_contexts(source.kubeconfig)
                chosen = next((c for c in contexts if c["name"] == source.context), current)
                namespace = (chosen or {}).get("context", {}).get("namespace")
        return namespace

    async def watch(self, target: Target) -> AsyncIterator[EndpointSet]:
        options = Options.model_validate(dict(target.options))
        selector = f"{SERVICE_NAME_LABEL}={target.name}"
        if options.label_selector:
            selector += f",{options.label_selector}"
        latest = _Latest(asyncio.get_running_loop())
        watcher = _Watcher(self._api, options.namespace or self.namespace, selector, options, latest.put)
        self._watchers.add(watcher)
        watcher.thread.start()
        try:
            while True:
                value = await latest.get()
                if value is None:
                    return
                if isinstance(value, BaseException):
                    raise value
                yield value
        finally:
            watcher.stop()
            self._watchers.discard(watcher)

    async def aclose(self) -> None:
        watchers = list(self._watchers)
        for w in watchers:
            w.stop()
        for w in watchers:
            await asyncio.to_thread(w.thread.join, CONNECT_TIMEOUT)
        self.api_client.close()
