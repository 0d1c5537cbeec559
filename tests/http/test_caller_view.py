"""What the caller's httpx client sees after a mesh call: the service's URL, not the endpoint's.

The transport points the request at the picked endpoint in place (a copy costs more than the
rest of the call); it must give the caller its URL back, or httpx files cookies under the
endpoint's IP (never sent again), shows that IP as `response.url`, and follows a relative
redirect straight to the endpoint, past the mesh."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.rules import parse_documents
from meshlib.testing import RunningServer, serve


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Sets a session cookie, echoes the cookie and Host it got, and redirects /old to /new."""
    if scope["type"] != "http":
        return
    headers = dict(scope["headers"])
    if scope["path"] == "/old":
        await send({"type": "http.response.start", "status": 302, "headers": [(b"location", b"/new")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"%s|%s|%s" % (scope["path"].encode(), headers.get(b"host", b""), headers.get(b"cookie", b""))
    out = [(b"set-cookie", b"sid=abc; Path=/"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": out})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve(_app)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def mesh(server: RunningServer) -> Iterator[meshlib.Mesh]:
    m = meshlib.Mesh("caller")
    docs = [{"kind": "Endpoints", "service": "shop", "endpoints": [{"address": server.address}]}]
    m.apply_rules(parse_documents(docs, source="test"), "test")
    yield m
    m.close()


async def test_async_cookies_come_back_and_response_url_is_the_services(mesh: meshlib.Mesh) -> None:
    async with mesh.client() as c:
        first = await c.get("http://shop/a")
        assert str(first.url) == "http://shop/a"
        assert first.text == "/a|shop|"  # no cookie yet
        assert (await c.get("http://shop/b")).text == "/b|shop|sid=abc"


def test_sync_cookies_come_back_and_response_url_is_the_services(mesh: meshlib.Mesh) -> None:
    with mesh.sync_client() as c:
        assert str(c.get("http://shop/a").url) == "http://shop/a"
        assert c.get("http://shop/b").text == "/b|shop|sid=abc"


async def test_a_relative_redirect_is_followed_through_the_mesh(mesh: meshlib.Mesh) -> None:
    async with mesh.client(follow_redirects=True) as c:
        r = await c.get("http://shop/old")
    assert [h.status_code for h in r.history] == [302]
    assert str(r.url) == "http://shop/new"
    assert r.text.startswith("/new|shop|")  # the Host the mesh sets, not the endpoint's address
