"""The meshed httpx clients: cookies work as httpx's with the quicker cookie handling."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.http.clients import _Cookies, _quick_cookies
from meshlib.rules import parse_documents
from meshlib.testing import RunningServer, serve


async def _cookie_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/set sets a cookie; any path answers with the Cookie header it got."""
    if scope["type"] != "http":
        return
    got = dict(scope["headers"]).get(b"cookie", b"")
    headers = [(b"content-length", str(len(got)).encode())]
    if scope["path"] == "/set":
        headers.append((b"set-cookie", b"session=abc; Path=/"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": got})


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve(_cookie_app)
    yield running
    running.stop()


def _mesh(address: str) -> meshlib.Mesh:
    mesh = meshlib.Mesh("caller")
    docs = [{"kind": "Endpoints", "service": "shop", "endpoints": [{"address": address}]}]
    mesh.apply_rules(parse_documents(docs, source="test"), "test")
    return mesh


async def test_the_quicker_cookies_keep_what_httpx_does(server: RunningServer) -> None:
    async with _quick_cookies(httpx.AsyncClient()) as client:
        assert isinstance(client.cookies, _Cookies)
        assert (await client.get(f"http://{server.address}/none")).content == b""
        assert not client.cookies  # a response without Set-Cookie sets nothing
        await client.get(f"http://{server.address}/set")
        assert client.cookies.get("session") == "abc"
        assert (await client.get(f"http://{server.address}/again")).content == b"session=abc"


def test_meshed_clients_extract_cookies(server: RunningServer) -> None:
    # (stored for the endpoint's address the request went to, as before the quicker jar)
    with _mesh(server.address) as mesh, mesh.sync_client(cookies={"pre": "1"}) as client:
        assert isinstance(client.cookies, _Cookies)
        assert client.get("http://shop/none").content == b"pre=1"
        client.get("http://shop/set")
        assert client.cookies.get("session") == "abc"
        client.cookies = httpx.Cookies({"other": "2"})  # httpx's own jar again: still works
        assert client.get("http://shop/x").content == b"other=2"
