"""The client side of the control service's watch stream (see docs/control-api.md).

One `Subscriber` per process keeps one SSE stream open, folds its events into a
`ControlState`, hands each new state to a sink (the Mesh builds and swaps a Snapshot), and
acks what the sink accepted. A dropped stream is reopened with jittered backoff and resumed
with `Last-Event-ID`; while the control service is away nothing changes in the process. With
several replicas (`ControlEndpoints`) a failed connection, or a stream that breaks off, moves
the watch to the next one with the same `Last-Event-ID`: a replica sharing the store resumes
it, one that cannot sends a `snapshot`. While it watches another replica than its preferred
(first) one, it checks the preferred one's health, and once that has held for a while
(`ControlEndpoints.settle`) it closes the stream and resumes there, the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError

from meshlib.control import rules_delta
from meshlib.control.endpoints import PROBE_EVERY, ControlEndpoints
from meshlib.control.outage import Outage, _brief
from meshlib.control.sse_reader import SSEReader
from meshlib.control.tls_probe import atls_hint
from meshlib.headers import RULES_VERSION
from meshlib.http.h1 import AsyncH1Transport

log = logging.getLogger("meshlib.control")

EMPTY: Mapping[str, tuple[dict[str, Any], ...]] = MappingProxyType({})
NO_IDS: Mapping[str, Mapping[str, str]] = MappingProxyType({})


def _ids(raw: Any) -> Mapping[str, str]:
    """The registry's instance ids of one service (address -> id); anything else is no ids
    (an older control service sends none)."""
    if not isinstance(raw, Mapping):
        return MappingProxyType({})
    return MappingProxyType({str(k): str(v) for k, v in raw.items()})


@dataclass(frozen=True)
class ControlState:
    """What the control service has said so far: rules of one version and every endpoint."""

    epoch: str
    revision: int
    version: int
    documents: tuple[dict[str, Any], ...] = ()
    endpoints: Mapping[str, tuple[dict[str, Any], ...]] = field(default_factory=lambda: EMPTY)
    instances: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: NO_IDS)
    """Service -> address -> registry instance id (a new id at an address is a new process)."""

    @property
    def event_id(self) -> str:
        return f"{self.epoch}:{self.revision}"

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "revision": self.revision,
            "version": self.version,
            "documents": list(self.documents),
            "endpoints": {k: list(v) for k, v in self.endpoints.items()},
            "instances": {k: dict(v) for k, v in self.instances.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControlState:
        return cls(
            epoch=str(data["epoch"]),
            revision=int(data["revision"]),
            version=int(data["version"]),
            documents=tuple(data.get("documents") or ()),
            endpoints=MappingProxyType({k: tuple(v) for k, v in (data.get("endpoints") or {}).items()}),
            instances=MappingProxyType({str(k): _ids(v) for k, v in _ids_by_service(data.get("instances"))}),
        )


def _ids_by_service(raw: Any) -> list[tuple[Any, Any]]:
    return list(raw.items()) if isinstance(raw, Mapping) else []


def fold(state: ControlState | None, event: str, data: Mapping[str, Any]) -> ControlState | None:
    """The state after one event (None: the event cannot be applied to this state)."""
    if event == "snapshot":
        return ControlState.from_json(data)
    if state is None or data.get("epoch") != state.epoch:
        return None
    revision = int(data["revision"])
    if event == "rules":
        return replace(
            state, revision=revision, version=int(data["version"]), documents=tuple(data["documents"])
        )
    if event == "endpoint":  # one instance came, changed or went (endpoint: null)
        service, address, endpoint = str(data["service"]), data["address"], data.get("endpoint")
        items = [e for e in state.endpoints.get(service, ()) if e.get("address") != address]
        ids = {k: v for k, v in state.instances.get(service, {}).items() if k != address}
        if endpoint is not None:
            items.append(endpoint)
            items.sort(key=lambda e: str(e.get("address")))  # the registry's (and snapshot's) order
            if data.get("id"):  # the registry's id of the process there (older services send none)
                ids[str(address)] = str(data["id"])
        return replace(
            state,
            revision=revision,
            endpoints=MappingProxyType({**state.endpoints, service: tuple(items)}),
            instances=MappingProxyType({**state.instances, service: MappingProxyType(ids)}),
        )
    if event == "endpoints":  # one service's whole list (control services before `endpoint`)
        service = str(data["service"])
        return replace(
            state,
            revision=revision,
            endpoints=MappingProxyType({**state.endpoints, service: tuple(data.get("endpoints") or ())}),
            instances=MappingProxyType({**state.instances, service: _ids(data.get("instances"))}),
        )
    # another kind (a trust bundle, or one this client does not know): nothing to apply, but
    # the revision moves on, so the ack says this client is current and resume ids stay right
    return replace(state, revision=revision)


KEEPALIVE_EXPIRY = 60.0
"""Seconds the subscriber's own HTTP client keeps its ack connection idle (httpx's default of 5
would open a new connection for nearly every ack); under the control service's 75."""

ACK_TIMEOUT = httpx.Timeout(15.0)
"""An ack is not urgent: a process whose event loop is busy (a push reaches every subscriber
at once) still lands it rather than timing out its connect and sending it again."""

MAX_ACK_WINDOW = 30.0
"""The widest ack window a control service's `ack_window` hint may ask for (seconds)."""


def control_transport(options: Mapping[str, Any], limits: httpx.Limits | None = None) -> AsyncH1Transport:
    """The transport of the subscriber's own client: meshlib's HTTP/1.1 over asyncio protocols
    (meshlib.http.h1), not httpcore's pool and anyio streams. A replica that dies moves every one
    of its subscribers at once, each opening a watch and an ack connection to another replica;
    through httpcore those cost the client about twice the CPU (docs/decisions.md, "A lean watch
    response"). `options` are the httpx.AsyncClient arguments of `Subscriber(http_options=)`
    (`verify`, `cert`, `trust_env` shape the TLS of an https control service)."""
    limits = limits or httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)
    verify = options.get("verify", True)
    if isinstance(verify, ssl.SSLContext) and "cert" not in options:
        return AsyncH1Transport(ssl_context=verify, limits=limits)
    tls = {k: options[k] for k in ("verify", "cert", "trust_env") if k in options}
    return AsyncH1Transport(tls=tls, limits=limits)


def control_client(
    timeout: httpx.Timeout,
    options: Mapping[str, Any],
    wrap: Callable[[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport] | None = None,
) -> httpx.AsyncClient:
    """The subscriber's own client when it is given none: `control_transport` under httpx (with
    the mesh's cookie shortcut: no response of the control service sets one), the other options
    (the join token's header) as given. `wrap`: something around the transport (a benchmark's
    recorder)."""
    from meshlib.http.clients import _quick_cookies

    rest = {k: v for k, v in options.items() if k not in ("verify", "cert", "trust_env", "limits")}
    transport: httpx.AsyncBaseTransport = control_transport(options, options.get("limits"))
    if wrap is not None:
        transport = wrap(transport)
    return _quick_cookies(httpx.AsyncClient(timeout=timeout, transport=transport, **rest))


def ack_delay(jitter: float, window: float) -> float:
    """Seconds before acking a push: up to `jitter`, or with a control service's wider
    `ack_window` a delay as wide as that window, starting half a window late. The first half
    window is the push itself still going out to the service's other streams (at well under
    1 ms per stream, the window's rate): an ack landing then would take CPU from that very
    push. The acks keep the window's width, so they cost the service the same share of a core,
    and still come in time (the window is at most half of `stale_after`)."""
    if window <= jitter:
        return random.uniform(0, jitter)
    return random.uniform(window / 2, window * 1.5)


class _DeltaMissed(Exception):
    """A delta `rules` event this subscriber cannot apply (it holds another version)."""


Sink = Callable[[ControlState], "str | None"]
"""Applies a state; returns None when applied, or the reason it was refused."""


class Subscriber:
    def __init__(
        self,
        url: str | ControlEndpoints,
        *,
        service: str | None,
        client_id: str,
        sink: Sink,
        state: ControlState | None = None,
        http: httpx.AsyncClient | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
        read_timeout: float = 45.0,
        ack_jitter: float = 0.5,
        http_options: Mapping[str, Any] | None = None,
        on_bundle: Callable[[str], object] | None = None,
    ) -> None:
        # the replicas, the one in use, and reachability (shared with the link's other loops)
        self.endpoints = url if isinstance(url, ControlEndpoints) else ControlEndpoints(url, backoff=backoff)
        self._refused = False  # a refusal (4xx) of the watch is logged once until it connects
        self.service = service
        self.client_id = client_id
        self.sink = sink
        self.state = state  # the last state the sink accepted (or the cached one)
        # the rules received last, accepted or not: what a delta `rules` event applies to
        self._held: rules_delta.Held | None = (
            (state.epoch, state.version, state.documents) if state is not None else None
        )
        self._http = http
        self._own_http = http is None
        self._http_options = dict(http_options or {})  # join token, TLS verification (https)
        self.on_bundle = on_bundle  # the CA's trust bundle, from `snapshot` and `bundle` events
        self._tls_hinted = False
        self._backoff = backoff
        self._timeout = httpx.Timeout(5.0, read=read_timeout)
        self.connected = asyncio.Event()
        self.watching: str | None = None  # the URL of the stream open now
        self.applied = 0
        # Acks leave after a random delay, and only the latest one: a change reaches every
        # process at once, and a thousand acks landing together would slow the very push
        # they report on. A control service with many subscribers asks for a wider window
        # (`ack_window` in its events): it knows how many acks each push brings.
        self._ack_jitter = ack_jitter
        self._ack_window = 0.0  # the control service's hint: spread acks over this many seconds
        self._urls: dict[str, tuple[httpx.URL, httpx.URL]] = {}  # replica -> its watch and ack URLs
        self._pending_ack: tuple[ControlState, str | None] | None = None
        self._ack_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    async def run(self) -> None:
        """Watch forever (until cancelled), reconnecting with full-jitter backoff."""
        if self._http is None:
            self._http = control_client(self._timeout, self._http_options)
        try:
            while True:
                url = self.url
                try:
                    await self._watch_once(url)
                    # the server closed a healthy stream (a restart, or we were slow): at once, same URL
                    pause = random.uniform(0, self._backoff[0])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # a stream that was open spoke HTTP: no TLS mix-up to explain (and a replica
                    # that died is not probed by every one of its clients on the way out)
                    hinting = not self._tls_hinted and not self.connected.is_set()
                    if hinting and (hint := await atls_hint(url, exc)):
                        self._tls_hinted = True  # an http URL for a TLS control service: say so once
                        log.warning("%s", hint)
                    self._failed(url, exc)
                    pause = self.endpoints.pause(self._backoff[1])
                self.connected.clear()
                self.watching = None
                await asyncio.sleep(pause)
        finally:
            if self._ack_task is not None:
                self._ack_task.cancel()
            if self._own_http and self._http is not None:
                await self._http.aclose()

    def _failed(self, url: str, exc: Exception) -> None:
        """Log a failed watch and move on to another replica: a dropped stream once per drop,
        an unreachable control service or a refused watch once until the watch connects again,
        never once per retry."""
        if self.connected.is_set():  # it was up: the stream dropped (a reconnect follows at once)
            log.info("watch of %s interrupted (%s); reconnecting", url, _brief(exc))
            self.endpoints.leave(url, exc)  # to the next replica, if there is one
            return
        status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        if status is not None and status < 500:  # reachable, but it refuses us: a retry will not fix it
            level = logging.DEBUG if self._refused else logging.WARNING
            self._refused = True
            log.log(level, "control service at %s refused the watch (%s); retrying", url, _brief(exc))
            return
        if self.state is not None:
            consequence = f"keeping control version {self.state.version}"
        else:
            consequence = "no rules or endpoints from it yet (see Mesh.wait_for_control())"
        self.endpoints.failed(url, exc, consequence)

    @property
    def outage(self) -> Outage:
        """Reachability of the control service (every replica), logged once per outage."""
        return self.endpoints.outage

    async def _watch_once(self, url: str) -> None:
        """Watch `url` until the stream ends, or until this process moves to another replica
        (then return: `run` reopens the watch there at once, with the Last-Event-ID). Moves come
        from the other loops (an ack, a heartbeat or a report that found `url` dead: a machine
        that is gone ends no stream, it goes silent) and, away from the preferred replica, from
        the health checks that bring the process back to it."""
        stream = asyncio.create_task(self._stream(url))
        followed = False

        def moved() -> None:
            nonlocal followed
            if self.endpoints.current != url and not stream.done():
                followed = True
                stream.cancel()

        stop_following = self.endpoints.on_move(moved)
        back = asyncio.create_task(self._wait_to_go_back()) if self.endpoints.away else None
        try:
            await stream
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not followed or (task is not None and task.cancelling()):
                raise  # cancelled from outside, not by a move
            log.debug("watch of %s closed: this process moved to %s", url, self.endpoints.current)
        finally:
            stop_following()
            for t in (stream, back):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(*(t for t in (stream, back) if t is not None), return_exceptions=True)

    async def _wait_to_go_back(self) -> None:
        """Move this process back to its preferred replica once that one has answered every
        health check for `settle` seconds (a check every PROBE_EVERY s, jittered; twice as long
        after each failed one, up to `settle`) and is not behind the version this process has;
        the move ends the watch of the replica in use."""
        settle = self.endpoints.settle()
        every = min(PROBE_EVERY, max(settle / 4, 0.05))
        wait = every
        since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(wait * random.uniform(0.5, 1.0))
            if not self.endpoints.away:
                return  # another loop moved already: the watch follows it
            if not await self._healthy(self.endpoints.preferred):
                # A replica that stays down is asked less and less often, up to once per settle
                # period (it must be healthy that long anyway): a fleet that left a dead machine
                # does not keep thousands of connects a minute pending against it.
                since = None
                wait = min(wait * 2, max(settle, every))
                continue
            wait = every
            now = loop.time()
            since = now if since is None else since
            if now - since >= settle and self.endpoints.go_back(now - since):
                return

    async def _healthy(self, url: str) -> bool:
        """The replica answers /healthz, and serves this process's version or a later one."""
        assert self._http is not None
        try:
            reply = await self._http.get(f"{url}/healthz", timeout=2.0)
            version = int(reply.json()["version"]) if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return False
        return version is not None and (self.state is None or version >= self.state.version)

    def _urls_of(self, url: str) -> tuple[httpx.URL, httpx.URL]:
        """The watch URL (with this client's parameters) and the ack URL of a replica, parsed
        for every replica at the first call (httpx parses a URL in about 0.1 ms): every
        subscriber of a replica that dies sends both to another at once, with none to parse."""
        urls = self._urls.get(url)
        if urls is None:
            # applied: this client's Last-Event-ID is the state it applied (not only received),
            # so a resume with nothing to send counts as its ack (meshlib.control.stream.Hub.open)
            # delta: `rules` events name the documents that did not change (rules_delta)
            params = {"client": self.client_id, "applied": "1", "delta": "1"}
            if self.service:
                params["service"] = self.service
            for each in {*self.endpoints.urls, url}:
                self._urls[each] = (httpx.URL(f"{each}/v1/watch", params=params), httpx.URL(f"{each}/v1/ack"))
            urls = self._urls[url]
        return urls

    async def _stream(self, url: str) -> None:
        assert self._http is not None
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        if self.state is not None:
            headers["last-event-id"] = self.state.event_id
            held = self._held
            if held is not None and held[0] == self.state.epoch:
                headers[RULES_VERSION] = str(held[1])
        async with self._http.stream(
            "GET", self._urls_of(url)[0], headers=headers, timeout=self._timeout
        ) as response:
            response.raise_for_status()
            self.connected.set()
            self.watching = url
            self._refused = False
            self.endpoints.ok(url)
            content_type = response.headers.get("content-type", "").partition(";")[0]
            if "text/event-stream" not in content_type:
                raise SSEError(f"expected a text/event-stream response, got {content_type[:100]!r}")
            reader = SSEReader()
            try:
                async for chunk in response.aiter_bytes():
                    for sse in reader.feed(chunk):
                        await self._on_event(sse)
            except _DeltaMissed as exc:
                # not this replica's fault: watch again at once, taking the next rules whole
                log.info("%s; watching %s again", exc, url)
                self._held = None

    async def _on_event(self, sse: ServerSentEvent) -> None:
        if not sse.data:  # keep-alives and other empty events carry nothing to apply
            return
        try:
            data = json.loads(sse.data)
        except ValueError:
            log.warning("ignoring a malformed %r event from %s", sse.event, self.url)
            return
        window = data.get("ack_window") if isinstance(data, dict) else None
        if (
            isinstance(window, (int, float))
            and not isinstance(window, bool)
            and 0 <= window <= MAX_ACK_WINDOW
        ):
            self._ack_window = float(window)
        bundle = data.get("bundle") if isinstance(data, dict) else None
        if isinstance(bundle, str) and self.on_bundle is not None:
            try:
                self.on_bundle(bundle)
            except Exception:
                log.exception("applying the trust bundle from %s failed", self.url)
        if sse.event == "rules" and isinstance(data, dict) and "base" in data:
            documents = rules_delta.expand(data, self._held)
            if documents is None:
                held = self._held and self._held[1]
                raise _DeltaMissed(f"a rules delta against version {data.get('base')!r}, holding {held}")
            data["documents"] = documents
        new = fold(self.state, sse.event, data)
        if new is None:
            raise ConnectionError(
                f"{sse.event!r} event does not follow revision {self.state and self.state.event_id}"
            )
        if sse.event in ("rules", "snapshot"):
            self._held = (new.epoch, new.version, new.documents)
        error = self.sink(new)
        if error is None:
            self.state = new
            self.applied += 1
        else:
            log.error("refused control version %s: %s", new.version, error)
        self._pending_ack = (new, error)
        if self._ack_task is None or self._ack_task.done():
            self._ack_task = asyncio.create_task(self._ack_later())

    async def _ack_later(self) -> None:
        """Send the latest pending ack after a jittered delay; retry a failed one (with
        backoff) until it lands or a newer one replaces it: the control service lists a
        process that never acked as stale, and with no further change nothing else would."""
        await asyncio.sleep(ack_delay(self._ack_jitter, self._ack_window))
        failures = 0
        while True:
            pending, self._pending_ack = self._pending_ack, None
            if pending is None:
                return
            if await self._ack(*pending):
                failures = 0
                continue  # a newer ack may have arrived meanwhile
            failures += 1
            if self._pending_ack is None:
                self._pending_ack = pending  # unless a newer one is waiting already
            low, high = self.ACK_RETRY
            await asyncio.sleep(random.uniform(low, min(high, low * 2**failures)))

    ACK_RETRY = (0.25, 10.0)
    """Backoff bounds (seconds) between attempts of an ack that failed."""

    async def _ack(self, state: ControlState, error: str | None) -> bool:
        assert self._http is not None
        url = self.url  # the replica in use: a failure moves every loop on
        body = {
            "client": self.client_id,
            "service": self.service,
            "revision": state.revision,
            "version": state.version,
            "ok": error is None,
            "error": error,
            "epoch": state.epoch,  # the latest ack wins, on a control service that knows the epoch
        }
        try:
            response = await self._http.post(self._urls_of(url)[1], json=body, timeout=ACK_TIMEOUT)
        except httpx.HTTPError as exc:
            log.debug("ack to %s failed: %s", url, exc)
            self.endpoints.failed(url, exc, warn=False)  # the watch says when all are down
            return False
        if response.status_code >= 500:
            log.debug("ack to %s failed: %d", url, response.status_code)
            self.endpoints.failed(url, f"ack answered {response.status_code}", warn=False)
            return False
        self.endpoints.ok(url)  # an answer: the replica is reachable
        return True  # a 4xx would fail again: give up on this one
