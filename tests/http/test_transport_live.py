"""The httpx transports against real servers: the path they send for a rewritten route, what
becomes of a mirrored copy once the Mesh is closed, and injected aborts that have no body."""

from __future__ import annotations

import gc
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.rules import RuleSet
from meshlib.testing import RunningServer, serve
from tests.conftest import wait_until


class RawPaths:
    """Answers 200 with an empty body (503 to the first `fail` requests) and keeps each request
    target as it came on the wire: (raw path, query, whether it is a mirrored copy)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bytes, bool]] = []
        self.fail = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        mirrored = (b"x-mesh-mirror", b"1") in scope["headers"]
        self.seen.append((scope["raw_path"], scope["query_string"], mirrored))
        status = 200
        if self.fail and not mirrored:
            self.fail -= 1
            status = 503
        headers = [(b"content-length", b"0")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    def sent(self) -> list[tuple[bytes, bytes]]:
        """What the service itself got, mirrored copies left out."""
        return [(path, query) for path, query, mirrored in self.seen if not mirrored]


@pytest.fixture
def raw() -> Iterator[tuple[RawPaths, RunningServer]]:
    app = RawPaths()
    server = serve(app)
    yield app, server
    server.stop()


def rules(address: str, *routes: dict) -> RuleSet:
    return RuleSet(
        [
            {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": address}]},
            {"kind": "Route", "service": "orders", "routes": [*routes, {"name": "rest"}]},
        ]
    )


REWRITES = (
    {"match": {"path": {"prefix": "/api"}}, "rewrite": {"prefix": "/v2"}},
    {"match": {"path": {"prefix": "/café/"}}, "rewrite": {"prefix": "/shop/"}},
)
CASES = [  # (what the caller asks for, the path and query the service gets)
    ("/api/files/a%2Fb%25c?q=%2F", (b"/v2/files/a%2Fb%25c", b"q=%2F")),
    ("/%61pi/x%2Fy", (b"/v2/x%2Fy", b"")),  # the prefix matched decoded, sent encoded
    ("/caf%C3%A9/a%2Fb", (b"/shop/a%2Fb", b"")),
    ("/other/a%2Fb", (b"/other/a%2Fb", b"")),  # no rewrite: as it always was
]


def test_a_rewrite_replaces_the_prefix_and_sends_the_rest_as_the_caller_encoded_it(
    raw: tuple[RawPaths, RunningServer],
) -> None:
    app, server = raw
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(server.address, *REWRITES), "t1")
        for asked, _ in CASES:
            r = client.get(f"http://orders{asked}")
            assert r.status_code == 200
            assert r.url == httpx.URL(f"http://orders{asked}")  # the caller's, for redirects and cookies
    assert app.sent() == [sent for _, sent in CASES]


async def test_the_async_client_rewrites_the_path_as_sent_too(raw: tuple[RawPaths, RunningServer]) -> None:
    app, server = raw
    async with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(rules(server.address, *REWRITES), "t1")
        async with mesh.client() as client:
            for asked, _ in CASES:
                assert (await client.get(f"http://orders{asked}")).status_code == 200
    assert app.sent() == [sent for _, sent in CASES]


@pytest.mark.parametrize("rewrite", ["/v2/", "/v%32/"])  # the rule's prefix is sent as written
def test_a_retried_and_a_mirrored_rewritten_request_keep_the_encoded_path(
    raw: tuple[RawPaths, RunningServer], rewrite: str
) -> None:
    app, server = raw
    app.fail = 1
    route = {
        "match": {"path": {"prefix": "/api/"}},
        "rewrite": {"prefix": rewrite},
        "retries": {"attempts": 2, "on": ["5xx"]},
        "mirror": {"percent": 100},
    }
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(rules(server.address, route), "t1")
        assert client.get("http://orders/api/a%2Fb").status_code == 200
        wait_until(lambda: len(app.seen) == 3, what="the mirrored copy")
    sent = f"{rewrite}a%2Fb".encode()
    assert sorted(app.seen) == [(sent, b"", False)] * 2 + [(sent, b"", True)]


def mirror_rules(address: str) -> RuleSet:
    return rules(address, {"match": {"path": {"prefix": "/copied"}}, "mirror": {"percent": 100}})


def test_a_mirror_after_the_mesh_is_closed_is_skipped_and_the_request_answered(
    raw: tuple[RawPaths, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    app, server = raw
    mesh = meshlib.Mesh("checkout")
    mesh.apply_rules(mirror_rules(server.address), "t1")
    with mesh.sync_client() as client:
        assert client.get("http://orders/copied").status_code == 200
        wait_until(lambda: len(app.seen) == 2, what="the mirrored copy")
        mesh.close()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            assert [client.get("http://orders/copied").status_code for _ in range(2)] == [200, 200]
            gc.collect()  # a copy made and never sent would say "never awaited" now
    assert [w.message for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert app.seen[2:] == [(b"/copied", b"", False)] * 2  # no copy
    assert mesh.stats.counter("mirror_skipped", "orders") == 2
    assert [r.message for r in caplog.records if "mirror" in r.message] == [
        "mirrored copies are skipped from now on: the Mesh is closed"
    ]  # once


async def test_an_async_mirror_after_close_is_skipped_and_starts_no_runtime(
    raw: tuple[RawPaths, RunningServer],
) -> None:
    app, server = raw
    mesh = meshlib.Mesh("checkout")  # no rules file, no control service: no runtime until a copy
    mesh.apply_rules(mirror_rules(server.address), "t1")
    mesh.close()
    before = {t.name for t in threading.enumerate()}
    async with mesh.client() as client:
        assert (await client.get("http://orders/copied")).status_code == 200
    assert {t.name for t in threading.enumerate()} - before == set()  # no loop started for it
    assert app.seen == [(b"/copied", b"", False)]
    assert mesh.stats.counter("mirror_skipped", "orders") == 1


def fault_rules(address: str) -> RuleSet:
    return rules(
        address,
        *(
            {"match": {"path": {"prefix": f"/{status}"}}, "fault": {"abort": {"status": status}}}
            for status in (204, 304, 503)
        ),
    )


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/204", b""),
        ("GET", "/304", b""),
        ("HEAD", "/503", b""),  # no answer to HEAD has a body
        ("GET", "/503", b"fault injected"),
    ],
)
def test_an_injected_abort_has_a_body_only_where_http_allows_one(
    raw: tuple[RawPaths, RunningServer], method: str, path: str, body: bytes
) -> None:
    app, server = raw
    with meshlib.Mesh("checkout") as mesh, mesh.sync_client() as client:
        mesh.apply_rules(fault_rules(server.address), "t1")
        r = client.request(method, f"http://orders{path}")
    assert (r.status_code, r.content, r.headers["x-mesh-fault"]) == (int(path[1:]), body, "abort")
    assert r.headers.get("content-length") == (str(len(body)) if body else None)
    assert app.seen == []
