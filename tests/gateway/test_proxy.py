"""Bodies stream through the gateway both ways: each direction is held in lock step with the
other end, so a gateway that waited for a whole body before passing it on would hang and fail."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from meshlib.testing import serve
from tests.conftest import Fleet
from tests.gateway.conftest import SHOP, Edge

MB = 1024 * 1024
TOTAL = 8 * MB
WAIT = 5.0


class Files:
    """POST /upload counts what arrives; GET /download sends 1 MB, waits for the client to say
    it has it, then sends the rest."""

    def __init__(self) -> None:
        self.first_chunk = threading.Event()  # the first upload bytes reached the service
        self.client_has_first = threading.Event()  # the client read the first download bytes
        self.waited: bool | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/files/upload":
            received, more = 0, True
            while more:
                message = await receive()
                received += len(message.get("body", b""))
                more = message.get("more_body", False)
                if received:
                    self.first_chunk.set()
            body = json.dumps({"received": received}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(TOTAL).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"a" * MB, "more_body": True})
        self.waited = await asyncio.to_thread(self.client_has_first.wait, WAIT)
        for _ in range(TOTAL // MB - 1):
            await send({"type": "http.response.body", "body": b"b" * MB, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def files(fleet: Fleet) -> Iterator[tuple[Files, str]]:
    app = Files()
    server = serve(app)
    fleet.servers.append(server)
    yield app, server.address


@pytest.fixture
def extra_routes() -> list[dict]:
    return [{"match": {"hosts": [SHOP], "path": {"prefix": "/files/"}}, "to": [{"service": "files"}]}]


def _with_files(edge: Edge, address: str) -> None:
    def add(docs: list[dict]) -> None:
        docs.append({"kind": "Endpoints", "service": "files", "endpoints": [{"address": address}]})

    edge.change(add, lambda rules: rules.endpoints("files") is not None, "files' endpoint")


def test_a_large_upload_streams_through(edge: Edge, files: tuple[Files, str]) -> None:
    app, address = files
    _with_files(edge, address)
    waited: list[bool] = []

    def body() -> Iterator[bytes]:
        yield b"x" * MB
        # a gateway holding the body whole would never pass this first MB on while we wait
        waited.append(app.first_chunk.wait(WAIT))
        for _ in range(TOTAL // MB - 1):
            yield b"y" * MB

    r = httpx.post(edge.url() + "/files/upload", headers={"host": SHOP}, content=body(), timeout=30.0)
    assert waited == [True]
    assert r.status_code == 200 and r.json() == {"received": TOTAL}


def test_a_large_download_streams_through(edge: Edge, files: tuple[Files, str]) -> None:
    app, address = files
    _with_files(edge, address)
    received = 0
    with httpx.stream("GET", edge.url() + "/files/download", headers={"host": SHOP}, timeout=30.0) as r:
        assert r.status_code == 200 and r.headers["content-length"] == str(TOTAL)
        for chunk in r.iter_raw():
            received += len(chunk)
            if received >= MB:
                app.client_has_first.set()  # the service sends the rest only now
    assert received == TOTAL
    assert app.waited is True  # the first MB reached the client before the service sent the rest
