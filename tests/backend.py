"""A test backend that tells who it is and misbehaves on command.

Pure ASGI (no framework) so that its own cost stays out of the measurements. Behaviour is
set per instance through `Backend` attributes, or per request through query parameters:
  /whoami            -> {"name", "labels", "path", "headers"}
  /sleep?ms=N        -> answers after N ms
  /status/CODE       -> answers with that status
  /stream?chunks=N&ms=M -> N chunks, M ms apart
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any
from urllib.parse import parse_qs


class Backend:
    def __init__(self, name: str, labels: dict[str, str] | None = None) -> None:
        self.name = name
        self.labels = labels or {}
        self.delay = 0.0  # seconds added to every request
        self.fail_status: int | None = None  # answer every request with this status
        self.fail_times: int | None = None  # with fail_status: only the next N fail (None: all)
        self.fail_headers: dict[str, str] = {}  # extra headers on failed answers (retry-after)
        self.hits = 0
        self.seen: list[dict[str, Any]] = []  # method, path, headers of each request
        self.in_flight = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        with self.lock:
            self.hits += 1
            self.in_flight += 1
            self.seen.append({"method": scope["method"], "path": path, "headers": headers})
        try:
            body = b""
            more = True
            while more:
                msg = await receive()
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
            if self.delay:
                await asyncio.sleep(self.delay)
            if path == "/stream":
                await self._stream(send, int(query.get("chunks", "3")), float(query.get("ms", "10")))
                return
            status, extra = 200, {}
            if self.fail_status is not None:
                with self.lock:
                    failing = self.fail_times is None or self.fail_times > 0
                    if self.fail_times:
                        self.fail_times -= 1
                if failing:
                    status, extra = self.fail_status, self.fail_headers
            if path.startswith("/status/"):
                status = int(path.rsplit("/", 1)[1])
            if path == "/sleep":
                await asyncio.sleep(float(query.get("ms", "0")) / 1000)
            payload = {
                "name": self.name,
                "labels": self.labels,
                "path": path,
                "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),  # as sent, still encoded
                "headers": headers,
                "body": body.decode(errors="replace"),
            }
            data = json.dumps(payload).encode()
            headers_out = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ]
            headers_out += [(k.encode(), v.encode()) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": headers_out})
            await send({"type": "http.response.body", "body": data})
        finally:
            with self.lock:
                self.in_flight -= 1

    async def _stream(self, send: Any, chunks: int, ms: float) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for i in range(chunks):
            await asyncio.sleep(ms / 1000)
            await send(
                {"type": "http.response.body", "body": f"{self.name}:{i}\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b""})


class RudeServer:
    """Reads a request and hangs up without answering: a connection reset, as the client sees it."""

    def __init__(self) -> None:
        import socket

        self.hits = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    if conn.recv(65536):
                        self.hits += 1
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def dead_address() -> str:
    """An address on 127.0.0.1 where nothing listens (connection refused)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"
