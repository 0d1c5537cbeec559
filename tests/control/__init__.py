"""Helpers for the control service tests: a real server on 127.0.0.1 and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from meshlib.control import ControlPlane, ControlSettings, create_app
from meshlib.headers import RULES_VERSION
from meshlib.testing import RunningServer, serve

DESTINATION = {"kind": "Destination", "service": "orders", "subsets": {"v1": {"version": "v1"}}}
ROUTE = {"kind": "Route", "service": "orders", "routes": [{"to": [{"subset": "v1"}]}]}


_STORE_TOKENS: dict[tuple[tuple[str, ...], str], str] = {}
"""The admin token of each etcd store prefix, as the replica that created it printed it."""


def admin_token(plane: ControlPlane) -> str:
    """The admin token a control service accepts: its data dir's, or on etcd the one the
    first replica on the store created (replicas after it have none in their data dir)."""
    etcd = plane.settings.etcd
    key = (etcd.endpoints, etcd.prefix) if etcd is not None else None
    if key is not None and plane.new_admin_token is not None:
        _STORE_TOKENS[key] = plane.new_admin_token
    path = plane.data_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    assert key is not None and key in _STORE_TOKENS, f"no admin token for {plane.data_dir}"
    return _STORE_TOKENS[key]


class Control:
    """A control service on a real port, with an admin-authorised sync client."""

    def __init__(self, data_dir: Path, **options: Any) -> None:
        self.data_dir = data_dir
        self.app = create_app(ControlSettings(data_dir, **options))
        self.plane: ControlPlane = self.app.state.control
        self.server: RunningServer = serve(self.app, lifespan="on")
        self.url = self.server.url
        self.token = admin_token(self.plane)
        self.admin = {"Authorization": f"Bearer {self.token}"}
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def apply(self, docs: list[dict[str, Any]], **params: Any) -> httpx.Response:
        return self.http.put("/v1/config", json=docs, headers=self.admin, params=params)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll with a deadline (async tests); returns the first truthy value of `predicate`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Watcher:
    """One watch stream read by a task; events are collected in order."""

    def __init__(
        self,
        url: str,
        client: str = "w",
        service: str = "checkout",
        last_event_id: str | None = None,
        *,
        delta: bool = False,
        rules_version: int | None = None,
    ) -> None:
        self.url = url
        self.delta = delta
        self.rules_version = rules_version
        self.client = client
        self.service = service
        self.last_event_id = last_event_id
        self.events: list[ServerSentEvent] = []
        self.status: int | None = None
        self.ended = False
        self.error: BaseException | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        headers = {"last-event-id": self.last_event_id} if self.last_event_id else {}
        params = {"client": self.client, "service": self.service}
        if self.delta:  # `rules` events as deltas (meshlib.control.rules_delta)
            params["delta"] = "1"
        if self.rules_version is not None:
            headers[RULES_VERSION] = str(self.rules_version)
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http,
                aconnect_sse(http, "GET", f"{self.url}/v1/watch", params=params, headers=headers) as source,
            ):
                self.status = source.response.status_code
                self._connected.set()
                async for sse in source.aiter_sse():
                    self.events.append(sse)
            self.ended = True
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            self._connected.set()

    def data(self, index: int) -> dict[str, Any]:
        return json.loads(self.events[index].data)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(e.data) for e in self.events if e.event == kind]

    async def next_event(self, kind: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first event of `kind` whose data has the given values."""

        def found() -> dict[str, Any] | None:
            for data in self.of(kind):
                if all(data.get(k) == v for k, v in match.items()):
                    return data
            return None

        return await wait_for(found, timeout, f"a {kind} event with {match}")


class ErrorRecords(logging.Handler):
    """Collects ERROR records: the hostile-input tests assert the service logged none."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
