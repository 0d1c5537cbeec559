"""A response whose body is cut short after a good status (the peer resets mid-body) counts
against its endpoint, as a reset before the status would: the breaker opens and outlier
detection ejects, through a real Mesh against a real socket server on 127.0.0.1."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.errors import CircuitOpenError, NoEndpointsError
from tests.conftest import write_rules

# one endpoint: no panic mode, and an ejection budget that lets the breaker take the pool out
ALONE = {"panic_threshold": 0}
BUDGET = {"consecutive_5xx": 1000, "max_ejection_percent": 100}


class CutShort:
    """Answers 200 with a Content-Length of 1,000 and sends 10 bytes, then resets (`cut`);
    or answers whole (`cut = False`). Counts the requests it saw."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.cut = True
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests += 1
            if not self.cut:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[CutShort]:
    s = CutShort()
    yield s
    s.close()


def mesh_for(tmp_path: Path, server: CutShort, **dest: object) -> meshlib.Mesh:
    docs = [
        {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": server.address}]},
        {"kind": "Destination", "service": "orders", **ALONE, **dest},
    ]
    return meshlib.Mesh("checkout", config=write_rules(tmp_path / "mesh.yaml", docs))


def test_a_body_cut_short_opens_the_breaker(tmp_path: Path, server: CutShort) -> None:
    breaker = {"consecutive_failures": 2, "open_for": "30s"}
    docs = {"circuit_breaker": breaker, "outlier_detection": BUDGET}
    with mesh_for(tmp_path, server, **docs) as mesh, mesh.sync_client() as client:
        for _ in range(2):
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                client.get("http://orders/")  # the status was 200; the body broke off
        with pytest.raises(CircuitOpenError):
            client.get("http://orders/")
        assert server.requests == 2  # the third call never left


def test_whole_bodies_keep_the_breaker_closed(tmp_path: Path, server: CutShort) -> None:
    server.cut = False
    breaker = {"consecutive_failures": 2, "open_for": "30s"}
    docs = {"circuit_breaker": breaker, "outlier_detection": BUDGET}
    with mesh_for(tmp_path, server, **docs) as mesh, mesh.sync_client() as client:
        for _ in range(5):
            assert client.get("http://orders/").text == "ok"
        assert server.requests == 5


async def test_a_streamed_body_cut_short_ejects_the_endpoint(tmp_path: Path, server: CutShort) -> None:
    outliers = {"consecutive_5xx": 2, "base_ejection": "30s", "max_ejection_percent": 100}
    with mesh_for(tmp_path, server, outlier_detection=outliers) as mesh:
        async with mesh.client() as client:
            for _ in range(2):
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    async with client.stream("GET", "http://orders/") as r:
                        assert r.status_code == 200
                        async for _chunk in r.aiter_bytes():
                            pass
            with pytest.raises(NoEndpointsError):  # the only endpoint is out
                await client.get("http://orders/")
        assert server.requests == 2
