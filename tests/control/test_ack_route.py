"""The fast way in for acks and watches: POST /v1/ack and GET/HEAD /v1/watch are answered without
the app behind it; anything else goes on to the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshlib.control import ControlPlane, ControlSettings
from meshlib.control.ack_route import AckFastPath


class Behind:
    def __init__(self) -> None:
        self.paths: list[tuple[str, str]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.paths.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(app: AckFastPath, method: str, path: str, body: bytes = b"") -> int:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 7070),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


async def test_acks_are_answered_in_front_of_the_app(tmp_path: Path) -> None:
    plane = ControlPlane(ControlSettings(tmp_path))
    behind = Behind()
    app = AckFastPath(behind, plane)
    try:
        assert await call(app, "POST", "/v1/ack", b'{"client": "c1", "revision": 0}') == 204
        assert await call(app, "POST", "/v1/ack", b'{"client": ""}') == 422
        assert behind.paths == []
        assert [r["client"] for r in plane.hub.clients()] == ["c1"]
        assert await call(app, "GET", "/v1/ack") == 299
        assert await call(app, "POST", "/v1/ack/x") == 299
        assert behind.paths == [("GET", "/v1/ack"), ("POST", "/v1/ack/x")]
    finally:
        plane.close()


async def test_watches_are_answered_in_front_of_the_app(tmp_path: Path) -> None:
    plane = ControlPlane(ControlSettings(tmp_path))
    behind = Behind()
    app = AckFastPath(behind, plane)
    try:
        assert await call(app, "HEAD", "/v1/watch") == 200  # the headers, and no stream
        assert plane.hub.clients() == []
        # a GET streams (the snapshot first) until the client goes away (`call` then says so)
        assert await call(app, "GET", "/v1/watch") == 200
        assert plane.hub.subscribers == 0
        assert [r["connected"] for r in plane.hub.clients()] == [False]
        assert behind.paths == []
        assert await call(app, "POST", "/v1/watch") == 299
        assert behind.paths == [("POST", "/v1/watch")]
    finally:
        plane.close()
