"""Registering this process's instance with the control service's registry, and keeping it there.

Heartbeats every third of the TTL; a 404 (the registry forgot us: we were partitioned past the
TTL, or, without etcd, the control service lost its data dir or the heartbeat went to another
replica, which keeps a registry of its own) registers again; cancellation deregisters, best
effort. Heartbeats go to the replica in use (`ControlEndpoints`); one that fails (unreachable,
or a 5xx) moves them on to the next. The address and labels are checked against the registry's
bounds up front (ValueError), so a registration the control service would refuse fails where
it is made, not in a retry loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx

from meshlib.control.endpoints import ControlEndpoints
from meshlib.control.outage import Outage
from meshlib.control.registry import check_address, check_labels

log = logging.getLogger("meshlib.control")


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
                    self._refused = False
                    self.endpoints.ok(url)
                    pause = self.ttl / 3
                except httpx.HTTPError as exc:
                    self.registered.clear()
                    self._failed(url, exc)
                    pause = self.endpoints.pause(self.ttl / 3)
                if await self._pause(pause):
                    break
        finally:
            await self._deregister(http)
            if own:
                await http.aclose()

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
            r = await http.put(f"{base}/{self.instance_id}")
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
