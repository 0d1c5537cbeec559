"""meshlib.testing: the in-thread server runner used by tests, benchmarks and the demo."""

from __future__ import annotations

import socket

import httpx

from meshlib.testing import bind, serve
from tests.backend import Backend


def test_bound_socket_is_tcp_so_asyncio_disables_nagle() -> None:
    # With protocol 0 asyncio leaves Nagle on for accepted connections, and every response
    # then waits ~40 ms for the peer's delayed ACK.
    sock = bind()
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_serve_starts_and_stops_a_real_server() -> None:
    backend = Backend("t")
    server = serve(backend)
    with httpx.Client() as c:
        assert c.get(f"{server.url}/whoami").json()["name"] == "t"
    server.stop()
    assert not server.thread.is_alive()
