"""Registering this process's instance with the control service's registry, and keeping it there.

Heartbeats every third of the TTL; a 404 (the registry forgot us: we were partitioned past the
TTL, or, without etcd, the control service lost its data dir or the heartbeat went to another
replica, which keeps a registry of its own) registers again; cancellation deregisters, best
effort. Heartbeats go to the replica in use (`ControlEndpoints`); one that fails (unreachable,
or a 5xx other than the 503 below) moves them on to the next. The address and labels are
checked against the registry's bounds up front (ValueError), so a registration the control
service would refuse fails where it is made, not in a retry loop.

A heartbeat waits a third of the TTL for its answer (1 to 5 s, `BEAT_TIMEOUT`): a replica gone
silent is left in time for the next one to keep the lease, which runs out a TTL after the last
heartbeat. A `503` with `Retry-After` is the replica saying its registry's store (etcd) did not
take the change: the replica is up, the watch on it is fine, so the process stays and tries
again after Retry-After (doubling while it lasts, at most a third of the TTL); one WARNING for
the streak, one INFO when a heartbeat lands again. From the second such answer on, each retry
also sends the heartbeat once to another replica (in turn), without moving there: a replica
cut off from etcd alone does not cost the instance its lease, while one that lost etcd with
the others costs nothing more than a refused request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx

from meshlib.control.endpoints import ControlEndpoints
from meshlib.control.outage import Outage, _brief
from meshlib.control.registry import check_address, check_labels
from meshlib.resilience.retry import retry_after as parse_retry_after

log = logging.getLogger("meshlib.control")

BEAT_TIMEOUT = (1.0, 5.0)
"""Seconds a heartbeat waits for its answer: a third of the TTL within these bounds (a replica
on etcd answers one it cannot make within half of that: meshlib.control.etcd_registry)."""


def beat_timeout(ttl: float) -> float:
    """Seconds a heartbeat of an instance with `ttl` waits for its answer."""
    low, high = BEAT_TIMEOUT
    return min(high, max(low, ttl / 3))


def retry_after(exc: httpx.HTTPError) -> float | None:
    """Seconds a `503` with Retry-After asks to wait (the replica is up, its store did not take
    the change: try again later, there); None for any other failure."""
    response = exc.response if isinstance(exc, httpx.HTTPStatusError) else None
    if response is None or response.status_code != 503:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return None
    wait = parse_retry_after(value)  # delta-seconds or an HTTP date, as the client's retries read it
    return wait if wait is not None else 1.0


class Registration:
    def __init__(
        self,
        url: str | ControlEndpoints,
        service: str,
        address: str,
        *,
        labels: Mapping[str, str] | None = None,
        weight: int = 1,
        ttl: float = 10.0,
        http: httpx.AsyncClient | None = None,
        http_options: Mapping[str, Any] | None = None,
    ) -> None:
        # the replicas, the one in use, and reachability (shared with the link's watch)
        self.endpoints = url if isinstance(url, ControlEndpoints) else ControlEndpoints(url)
        self.service = service
        self.address = check_address(address)
        self.labels = dict(check_labels(labels or {}))
        self.weight = weight
        self.ttl = ttl
        self.instance_id: str | None = None
        self.registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._http = http
        self._http_options = dict(http_options or {})  # join token, TLS verification (https)
        self._refused = False  # a refusal (4xx) is logged once until a heartbeat lands
        self._busy_since: float | None = None  # the replica's store refuses changes (503) since
        self._busy_answers = 0  # 503s with Retry-After in a row
        self._elsewhere = 0  # which of the other replicas the next heartbeat sent elsewhere goes to
        self._landed_elsewhere = False  # one did, in this streak of 503s (logged once)

    @property
    def url(self) -> str:
        """The replica in use."""
        return self.endpoints.current

    @property
    def outage(self) -> Outage:
        return self.endpoints.outage

    def stop(self) -> None:
        """Ask `run` to deregister and return (call on the loop running it)."""
        self._stopping.set()

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless asked to stop first; True when stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        own = self._http is None
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(5.0), **self._http_options)
        try:
            while not self._stopping.is_set():
                url = self.url
                try:
                    await self._beat(http, url)
                    self._landed(url)
                    pause = self.ttl / 3
                except httpx.HTTPError as exc:
                    wait = retry_after(exc)
                    if wait is None:
                        self.registered.clear()
                        self._failed(url, exc)
                        pause = self.endpoints.pause(self.ttl / 3)
                    else:
                        pause = await self._busy(http, url, exc, wait)
                if await self._pause(pause):
                    break
        finally:
            await self._deregister(http)
            if own:
                await http.aclose()

    def _landed(self, url: str) -> None:
        self._refused = False
        if self._busy_since is not None:
            log.info(
                "registry at %s takes the heartbeats of %s at %s again after %.1fs",
                url,
                self.service,
                self.address,
                time.monotonic() - self._busy_since,
            )
        self._busy_since, self._busy_answers, self._landed_elsewhere = None, 0, False
        self.endpoints.ok(url)

    async def _busy(self, http: httpx.AsyncClient, url: str, exc: httpx.HTTPError, wait: float) -> float:
        """The replica in use answered 503 with Retry-After (its store did not take the change):
        no move, no failure counted (the watch stays where it is); the pause before trying there
        again: Retry-After, doubling while it lasts, at most a third of the TTL. The first of a
        streak is one WARNING; from the second on, the heartbeat also goes once to another
        replica (in turn), in case only this one is cut off from the store."""
        self._busy_answers += 1
        pause = min(self.ttl / 3, max(0.1, wait) * 2 ** min(self._busy_answers - 1, 10))
        response = exc.response if isinstance(exc, httpx.HTTPStatusError) else None
        said = response.text[:300] if response is not None else str(exc)
        if self._busy_since is None:
            self._busy_since = time.monotonic()
            log.warning(
                "registry at %s cannot take %s at %s now (503: %s); staying on it and retrying, "
                "logged once until a heartbeat lands; the registry drops the instance %gs after its "
                "last heartbeat",
                url,
                self.service,
                self.address,
                said,
                self.ttl,
            )
            return pause
        log.debug("registry at %s still cannot take %s at %s (503)", url, self.service, self.address)
        others = [u for u in self.endpoints.order if u != url]
        if not others:
            return pause
        other = others[self._elsewhere % len(others)]
        self._elsewhere += 1
        try:
            await self._beat(http, other)
        except httpx.HTTPError as error:
            log.debug("%s at %s: a heartbeat sent to %s instead failed too: %s", self.service, self.address,
                      other, _brief(error))  # fmt: skip
            return pause
        log.log(
            logging.DEBUG if self._landed_elsewhere else logging.INFO,
            "heartbeat of %s at %s landed on %s while the registry at %s cannot take it (not moving)",
            self.service,
            self.address,
            other,
            url,
        )
        self._landed_elsewhere = True
        return self.ttl / 3

    def _failed(self, url: str, exc: httpx.HTTPError) -> None:
        """Log a failed heartbeat once per outage (or per streak of refusals), not per retry."""
        response = exc.response if isinstance(exc, httpx.HTTPStatusError) else None
        if response is not None and response.status_code < 500:  # reachable, but it refuses us
            level = logging.DEBUG if self._refused else logging.WARNING
            self._refused = True
            log.log(
                level,
                "registry at %s refused %s at %s: %s %s; retrying",
                url,
                self.service,
                self.address,
                response.status_code,
                response.text[:300],
            )
            return
        self.endpoints.failed(
            url,
            exc,
            f"the registry drops {self.service} at {self.address} {self.ttl:g}s after its last heartbeat",
        )

    async def _beat(self, http: httpx.AsyncClient, url: str) -> None:
        base = f"{url}/v1/registry/{self.service}"
        if self.instance_id is not None:
            r = await http.put(f"{base}/{self.instance_id}", timeout=beat_timeout(self.ttl))
            if r.status_code != 404:
                r.raise_for_status()
                return
            log.info("registry forgot %s/%s; registering again", self.service, self.instance_id)
        body = {"address": self.address, "labels": self.labels, "weight": self.weight, "ttl": self.ttl}
        r = await http.post(base, json=body)
        r.raise_for_status()
        self.instance_id = r.json()["id"]
        self.registered.set()
        log.info("registered %s at %s as %s", self.service, self.address, self.instance_id)

    async def _deregister(self, http: httpx.AsyncClient) -> None:
        if self.instance_id is None:
            return
        try:
            await http.delete(f"{self.url}/v1/registry/{self.service}/{self.instance_id}")
        except httpx.HTTPError as exc:
            log.info("could not deregister %s/%s: %s", self.service, self.instance_id, exc)
        self.instance_id = None
        self.registered.clear()
