"""Endpoints from Consul: blocking queries on the health endpoint, one loop per watched service.

The agent is named by a URL, `consul://127.0.0.1:8500?dc=dc1` (`tls=1` for TLS to the agent;
docs/discovery.md lists the parameters). py-consul is imported when a provider is made,
so `Options` validates without it. Its asyncio client (`consul.aio`) is used with a connector
of our own: the stock one passes arguments aiohttp deprecates, caps connections at 100 (each
watch holds one) and gives up on any request after 5 minutes (docs/decisions.md).

The loop follows HashiCorp's rules for blocking queries: an index below 1 (0, or a negative
one: an agent's bug) is taken as 1, so the next query still blocks (logged once while it
lasts); a valid index lower than the last one resets the loop to index 0; and a token bucket
(two back to back, then one per `min_interval`) keeps an agent that answers at once from making
it spin without delaying a change in the common case.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshlib.control.registry import check_labels
from meshlib.discovery.base import EndpointSet, Target
from meshlib.rules.models import MAX_WEIGHT, EndpointSpec

log = logging.getLogger("meshlib.discovery.consul")

DEFAULT_PORT = 8500
REQUEST_TIMEOUT_S = 10.0
"""How long an agent may take to connect and answer beyond a blocking query's wait (+ wait/16)."""
MAX_WAIT_S = 600.0  # Consul caps `wait` at 10 minutes

NODE_LABEL = "consul/node"
DATACENTER_LABEL = "consul/datacenter"
SERVICE_ID_LABEL = "consul/service-id"


class ConsulError(Exception):
    """The agent did not answer a query well (unreachable, an error status, a malformed answer,
    no answer in time). The runner keeps the last good set and watches again later."""


class Options(BaseModel):
    """Per-service options of a Consul watch (a `discovery: {consul: {...}}` block)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: tuple[str, ...] = Field((), validation_alias=AliasChoices("tags", "tag"))
    """Only instances that carry every one of these tags (Consul's `tag` parameter; `tag: blue`
    is `tags: [blue]`)."""
    datacenter: str | None = None
    """The datacenter to ask (the URL's `dc`, else the agent's own, by default)."""
    node_meta: dict[str, str] = {}
    """Only instances on nodes with these node metadata pairs (`node-meta`)."""
    filter: str | None = None
    """A Consul filter expression evaluated by the server, e.g. `Service.Meta.version == "v2"`."""
    passing_only: bool = True
    """Only instances whose checks all pass (`?passing`). False also takes instances with a
    `warning` check, at their `Weights.Warning` (as Consul DNS does); `critical` never."""
    wait: float = Field(60.0, gt=0, le=MAX_WAIT_S)
    """Seconds a blocking query may hang at the agent before it answers unchanged."""
    min_interval: float = Field(1.0, ge=0, le=60.0)
    """Seconds between queries once two came back to back (the token bucket's refill); 0 turns
    the limit off, for tests."""

    @field_validator("tags", mode="before")
    @classmethod
    def _one_tag(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class ConsulAgent:
    """Where the agent is and how to talk to it, from a `consul://` URL and Consul's own
    environment variables (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ...)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    scheme: str = "http"
    datacenter: str | None = None
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    timeout: float = REQUEST_TIMEOUT_S

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, environ: Mapping[str, str] | None = None) -> ConsulAgent:
        """`consul://HOST:PORT?dc=&token=&tls=&ca=&cert=&key=&insecure=&timeout=` (the scheme is
        the provider's kind, so TLS is `tls=1`). No host: CONSUL_HTTP_ADDR (then
        127.0.0.1:8500). The URL's token, else CONSUL_HTTP_TOKEN."""
        env = os.environ if environ is None else environ
        parts = urlsplit(url)
        if parts.scheme != "consul":
            raise ValueError(f"a Consul URL starts with consul://, not {parts.scheme}://")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - {"dc", "token", "tls", "ca", "cert", "key", "insecure", "timeout"}
        if unknown:
            raise ValueError(f"unknown Consul URL parameter(s): {', '.join(sorted(unknown))}")
        tls = _flag(query, "tls") or env.get("CONSUL_HTTP_SSL", "").lower() == "true"
        if not tls and ({"ca", "cert", "key", "insecure"} & set(query)):
            raise ValueError("ca, cert, key and insecure are for TLS to the agent: add tls=1")
        scheme = "https" if tls else "http"
        host, port = parts.hostname, parts.port
        if not host:
            host, port, scheme = _from_env_addr(env, scheme)
        timeout = float(query.get("timeout", REQUEST_TIMEOUT_S))
        if not 0 < timeout <= 300:
            raise ValueError("timeout must be between 0 and 300 seconds")
        verify = not _flag(query, "insecure") and env.get("CONSUL_HTTP_SSL_VERIFY", "true").lower() != "false"
        return cls(
            host=host,
            port=port or DEFAULT_PORT,
            scheme=scheme,
            datacenter=query.get("dc") or None,
            token=query.get("token") or env.get("CONSUL_HTTP_TOKEN") or None,
            ca_file=query.get("ca") or env.get("CONSUL_CACERT") or None,
            cert_file=query.get("cert") or env.get("CONSUL_CLIENT_CERT") or None,
            key_file=query.get("key") or env.get("CONSUL_CLIENT_KEY") or None,
            verify=verify,
            timeout=timeout,
        )

    def connect(self) -> Any:
        """A `consul.aio.Consul` for this agent (call on the event loop that will use it)."""
        client = _client_class()(self)
        client.token = self.token  # py-consul would let CONSUL_HTTP_TOKEN override the URL's
        return client


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").lower() in ("1", "true", "yes")


def _from_env_addr(env: Mapping[str, str], scheme: str) -> tuple[str, int | None, str]:
    addr = env.get("CONSUL_HTTP_ADDR", "")
    if not addr:
        return "127.0.0.1", DEFAULT_PORT, scheme
    parts = urlsplit(addr if "//" in addr else f"//{addr}")
    if parts.scheme == "https":
        scheme = "https"
    return parts.hostname or "127.0.0.1", parts.port, scheme


@functools.cache
def _client_class() -> type:
    """consul.aio.Consul whose HTTP client has our aiohttp connector: TLS by `ssl=` (not the
    deprecated `verify_ssl`/`ssl_context`), no cap on connections (each watch holds one for its
    long poll), no total timeout (the provider bounds each query by its own wait)."""
    import ssl

    import aiohttp
    import consul.aio
    import consul.base

    class HTTPClient(consul.aio.HTTPClient):
        def __init__(self, agent: ConsulAgent) -> None:
            consul.base.HTTPClient.__init__(self, agent.host, agent.port, agent.scheme, agent.verify)
            self.loop = None
            tls: ssl.SSLContext | bool = True
            if agent.scheme == "https":
                tls = ssl.create_default_context(cafile=agent.ca_file)
                if agent.cert_file:
                    tls.load_cert_chain(agent.cert_file, agent.key_file)
                if not agent.verify:
                    tls.check_hostname = False
                    tls.verify_mode = ssl.CERT_NONE
            connector = aiohttp.TCPConnector(limit=0, ssl=tls)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=agent.timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    class Consul(consul.aio.Consul):
        def __init__(self, agent: ConsulAgent) -> None:
            self._agent = agent
            super().__init__(
                host=agent.host, port=agent.port, scheme=agent.scheme, dc=agent.datacenter, verify=True
            )

        def http_connect(self, *args: Any, **kwargs: Any) -> HTTPClient:
            return HTTPClient(self._agent)

    return Consul


class _TokenBucket:
    """Two queries back to back, then one per `interval`: HashiCorp's advice for a blocking loop
    (no delay while changes are rare, polling at a bounded rate while they churn)."""

    def __init__(self, interval: float, burst: int = 2) -> None:
        self.interval = interval
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def delay(self) -> float:
        """Take a token; the seconds to wait before the query it pays for."""
        if self.interval <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.interval)
        self.stamp = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens * self.interval


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, by HashiCorp's rules: an index below 1 is never
    valid (a bug of the agent) and is reset to 1, which always blocks until there is news
    (0 would not block, and a negative one could never be caught up with); a valid one lower
    than the last is a restore or another server: 0, start over; else the returned one."""
    if returned < 1:
        return 1
    if returned < previous:
        return 0
    return returned


def endpoint_set(
    entries: list[dict[str, Any]] | None, options: Options, memo: dict[tuple[Any, ...], Any] | None = None
) -> EndpointSet:
    """The endpoints of a health/service answer, in the agent's order, one per address.

    `memo` (kept by one watch across answers) maps what an instance's endpoint depends on to
    the endpoint made for it, so an answer in which 10% of 1,000 instances changed validates
    100 endpoints, not 1,000. It is left holding this answer's instances only."""
    seen: dict[str, EndpointSpec] = {}
    fresh: dict[tuple[Any, ...], Any] = {}
    for entry in entries or ():
        key = _memo_key(entry) if memo is not None else None
        if key is not None and memo is not None and key in memo:
            spec = memo[key]
        else:
            spec = _endpoint(entry, options)
        if key is not None:
            fresh[key] = spec
        if spec is not None and spec.address not in seen:
            seen[spec.address] = spec
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return tuple(seen.values())


def _memo_key(entry: dict[str, Any]) -> tuple[Any, ...] | None:
    """Every field `_endpoint` reads, hashable; None when one is not (never memoized)."""
    node = entry.get("Node") or {}
    service = entry.get("Service") or {}
    locality = service.get("Locality") or {}
    try:
        key = (
            frozenset(check.get("Status") for check in entry.get("Checks") or ()),
            service.get("ID"),
            service.get("Address"),
            service.get("Port"),
            tuple(service.get("Tags") or ()),
            tuple((service.get("Meta") or {}).items()),
            tuple((service.get("Weights") or {}).items()),
            locality.get("Region"),
            locality.get("Zone"),
            node.get("Node"),
            node.get("Address"),
            node.get("Datacenter"),
        )
        hash(key)
    except TypeError:
        return None
    return key


def _endpoint(entry: dict[str, Any], options: Options) -> EndpointSpec | None:
    node = entry.get("Node") or {}
    service = entry.get("Service") or {}
    statuses = {check.get("Status") for check in entry.get("Checks") or ()}
    if statuses - {"passing", "warning"} or (options.passing_only and "warning" in statuses):
        return None  # the server filters on ?passing too; this also covers passing_only=False
    host = service.get("Address") or node.get("Address") or ""
    port = service.get("Port") or 0
    weights = service.get("Weights") or {}
    weight = weights.get("Warning" if "warning" in statuses else "Passing", 1)
    if not isinstance(weight, int) or weight <= 0:
        return None  # Weights.Warning 0: no traffic while a check warns
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return EndpointSpec(address=address, labels=labels_of(node, service), weight=min(weight, MAX_WEIGHT))
    except ValidationError:
        log.debug("skipping Consul instance %r: no usable address (%r)", service.get("ID"), address)
        return None


def labels_of(node: Mapping[str, Any], service: Mapping[str, Any]) -> dict[str, str]:
    """Labels of one instance, later ones winning: `consul/node`, `consul/datacenter`,
    `consul/service-id`; `zone` and `region` from the service's Locality; each tag `k=v` as
    label k: v and any other tag as label TAG: ""; each Service.Meta pair as it is. A tag or
    key that is no valid label name is left out."""
    labels: dict[str, str] = {}
    for key, value in (
        (NODE_LABEL, node.get("Node")),
        (DATACENTER_LABEL, node.get("Datacenter")),
        (SERVICE_ID_LABEL, service.get("ID")),
        ("region", (service.get("Locality") or {}).get("Region")),
        ("zone", (service.get("Locality") or {}).get("Zone")),
    ):
        if value:
            _put(labels, key, str(value))
    for tag in service.get("Tags") or ():
        key, _, value = str(tag).partition("=")
        _put(labels, key, value)
    for key, value in (service.get("Meta") or {}).items():
        _put(labels, str(key), str(value))
    return labels


def _put(labels: dict[str, str], key: str, value: str) -> None:
    try:
        check_labels({key: value})
    except ValueError:
        return
    labels[key] = value


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulProvider:
    """Endpoints of services registered in Consul, through one agent (see module docstring)."""

    kind: ClassVar[str] = "consul"

    def __init__(self, agent: ConsulAgent) -> None:
        import consul.aio  # noqa: F401  (fail here, when made, if py-consul is missing)

        self.agent = agent
        self._client: Any = None
        self._closing: asyncio.Event | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> ConsulProvider:
        return cls(ConsulAgent.from_url(url))

    def __repr__(self) -> str:
        return f"ConsulProvider({self.agent.scheme}://{self.agent.address})"

    async def watch(self, target: Target) -> AsyncIterator[EndpointSet]:
        options = Options.model_validate(dict(target.options))
        bucket = _TokenBucket(options.min_interval)
        index = 0
        junk = False  # the agent answers indexes below 1 (logged once while it lasts)
        last: EndpointSet | None = None
        memo: dict[tuple[Any, ...], Any] = {}
        while not self._closed:
            pause = bucket.delay()
            if pause and await self._closed_within(pause):
                return
            answer = await self._query(target.name, options, index)
            if answer is None:
                return
            returned, entries = answer
            if returned < 1:
                log.log(
                    logging.DEBUG if junk else logging.WARNING,
                    "Consul agent %s answered X-Consul-Index %d for %r (never valid below 1: an agent "
                    "bug); blocking at index 1 instead, logged once while it lasts",
                    self.agent.address,
                    returned,
                    target.name,
                )
                junk = True
            else:
                if junk:
                    log.info(
                        "Consul agent %s answers valid indexes for %r again", self.agent.address, target.name
                    )
                    junk = False
                if returned < index:
                    log.info(
                        "Consul index for %r went back (%d < %d): starting over", target.name, returned, index
                    )
            index = next_index(index, returned)
            endpoints = endpoint_set(entries, options, memo)
            if endpoints != last:
                last = endpoints
                yield endpoints

    async def _query(self, name: str, options: Options, index: int) -> tuple[int, Any] | None:
        """One health query: (X-Consul-Index, entries), None once the provider closes."""
        client = self._connect()
        dc = options.datacenter or self.agent.datacenter
        call = client.health.service(
            name,
            index=str(index) if index else None,
            wait=_duration(options.wait),
            passing=options.passing_only,
            tag=list(options.tags) or None,
            dc=dc,
            node_meta=options.node_meta or None,
            filter_expr=options.filter,
            token=self.agent.token,
        )
        limit = self.agent.timeout + (options.wait * 17 / 16 if index else 0.0)
        where = f"Consul agent {self.agent.address}, service {name!r}"
        query = asyncio.ensure_future(call)
        assert self._closing is not None
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait({query, closing}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (query, closing):
                task.cancel()
        if query not in done:
            if closing in done:
                return None
            raise ConsulError(f"{where}: no answer within {limit:.1f} s")
        try:
            header, entries = query.result()
        except Exception as exc:  # aiohttp's and py-consul's errors; the token is in no message
            raise ConsulError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(entries, list):  # py-consul's None for a 404: not "no instances"
            raise ConsulError(f"{where}: no list of instances in the answer ({type(entries).__name__})")
        try:
            return int(header), entries
        except ValueError:
            raise ConsulError(f"{where}: X-Consul-Index {str(header)[:40]!r} is not a number") from None

    async def _closed_within(self, seconds: float) -> bool:
        self._connect()
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _connect(self) -> Any:
        if self._closed:
            raise ConsulError(f"Consul provider for {self.agent.address} is closed")
        if self._client is None:
            self._client = self.agent.connect()
            self._closing = asyncio.Event()
        return self._client

    async def aclose(self) -> None:
        self._closed = True
        if self._closing is not None:
            self._closing.set()
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.sleep(0)  # let the watches see `closing` before the session goes
            await client.close()
