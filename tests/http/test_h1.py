"""The mesh's HTTP/1.1 async transport against real peers on 127.0.0.1: uvicorn for what a
server does right, raw sockets for what a peer can do wrong."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.http.bounded_io import Bound, until
from meshlib.http.h1 import AsyncH1Transport
from meshlib.rules import parse_documents
from meshlib.testing import RunningServer, serve
from tests.backend import dead_address


async def _echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Says which client port the request came from, and what it got."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    path = scope["path"]
    if path.startswith("/bytes/"):  # a body of N bytes with a Content-Length
        data = b"x" * int(path.rsplit("/", 1)[1])
        headers = [(b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        return
    if path == "/chunks":  # no length: uvicorn sends it chunked
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": f"part{i};".encode(), "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    data = json.dumps(
        {"port": scope["client"][1], "method": scope["method"], "size": len(body), "headers": headers}
    ).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": out})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else data})


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve(_echo)
    yield running
    running.stop()


def client(**limits: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AsyncH1Transport(limits=httpx.Limits(**limits) if limits else None))


class RawPeer:
    """Answers every connection with `reply(request_bytes)` (None: say nothing), then closes;
    counts connections."""

    def __init__(self, reply: Callable[[bytes], bytes | None], linger: float = 0.0) -> None:
        self.reply = reply
        self.linger = linger
        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                data = conn.recv(65536)
                answer = self.reply(data)
                if answer is None:
                    self._stop.wait(self.linger or 2)
                    return
                conn.sendall(answer)
                if self.linger:
                    self._stop.wait(self.linger)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[Callable[..., RawPeer]]:
    made: list[RawPeer] = []

    def make(reply: Callable[[bytes], bytes | None], linger: float = 0.0) -> RawPeer:
        made.append(RawPeer(reply, linger))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


async def test_requests_share_one_kept_alive_connection(server: RunningServer) -> None:
    async with client() as c:
        first = (await c.get(f"http://{server.address}/")).json()
        second = (await c.post(f"http://{server.address}/", content=b"abc")).json()
        head = await c.head(f"http://{server.address}/")
        third = (await c.get(f"http://{server.address}/")).json()
    assert first["port"] == second["port"] == third["port"]
    assert second["method"] == "POST" and second["size"] == 3
    assert head.status_code == 200 and head.content == b""


async def test_a_streamed_upload_is_sent_chunked_and_whole(server: RunningServer) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 10_000
            await asyncio.sleep(0)

    async with client() as c:
        r = await c.post(f"http://{server.address}/", content=parts())
    got = r.json()
    assert got["size"] == 200_000 and got["headers"]["transfer-encoding"] == "chunked"


async def test_a_chunked_response_streams_in_parts_and_frees_its_connection(server: RunningServer) -> None:
    async with client() as c:
        async with c.stream("GET", f"http://{server.address}/chunks") as r:
            parts = [part async for part in r.aiter_raw()]
        assert b"".join(parts) == b"part0;part1;part2;"
        assert len(parts) >= 2  # it came as it was sent, not gathered
        port = (await c.get(f"http://{server.address}/")).json()["port"]
        assert (await c.get(f"http://{server.address}/")).json()["port"] == port


async def test_large_and_empty_bodies(server: RunningServer) -> None:
    async with client() as c:
        big = await c.get(f"http://{server.address}/bytes/3000000")  # past the flow-control mark
        assert big.content == b"x" * 3_000_000
        empty = await c.get(f"http://{server.address}/empty")
        assert empty.status_code == 204 and empty.content == b""
        assert (await c.get(f"http://{server.address}/bytes/5")).content == b"xxxxx"


async def test_max_connections_queues_requests_on_one_connection(server: RunningServer) -> None:
    async with client(max_connections=1) as c:
        answers = await asyncio.gather(*(c.get(f"http://{server.address}/") for _ in range(8)))
    assert len({a.json()["port"] for a in answers}) == 1


async def test_a_held_connection_makes_the_next_request_time_out_in_the_pool(server: RunningServer) -> None:
    async with client(max_connections=1) as c:
        async with c.stream("GET", f"http://{server.address}/chunks"):
            with pytest.raises(httpx.PoolTimeout):
                await c.get(f"http://{server.address}/", timeout=httpx.Timeout(5, pool=0.1))
        assert (await c.get(f"http://{server.address}/")).status_code == 200  # the slot came back


async def test_a_request_failing_on_a_kept_connection_gives_its_slot_back(server: RunningServer) -> None:
    url = f"http://{server.address}/"
    async with client(max_connections=1) as c:
        assert (await c.get(url)).status_code == 200  # its connection is kept
        with pytest.raises(httpx.LocalProtocolError):  # fails on the kept one, not sent again
            await c.get(url, headers={"x-a": "1\r\nx-injected: 2"})
        assert (await c.get(url, timeout=httpx.Timeout(5, pool=0.5))).status_code == 200


async def test_a_cancelled_request_gives_its_connection_slot_back(peers: Callable[..., RawPeer]) -> None:
    silent = peers(lambda request: None)
    async with client(max_connections=1) as c:
        task = asyncio.ensure_future(c.get(f"http://{silent.address}/"))
        deadline = time.monotonic() + 5
        while silent.accepted < 1:  # the request holds the one slot, connected and waiting
            assert time.monotonic() < deadline, "the request never reached the peer"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(httpx.ReadTimeout):  # reaches the peer again: no slot was kept
            await c.get(f"http://{silent.address}/", timeout=httpx.Timeout(5, read=0.1, pool=0.1))
    assert silent.accepted == 2


async def test_a_body_cut_short_is_a_protocol_error(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await c.get(f"http://{peer.address}/")


async def test_a_peer_that_hangs_up_without_answering(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"")
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await c.get(f"http://{peer.address}/")


async def test_a_body_until_close_and_connection_close_are_not_reused(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
    async with client() as c:
        assert (await c.get(f"http://{peer.address}/")).content == b"all of it"
        assert (await c.get(f"http://{peer.address}/")).content == b"all of it"
    assert peer.accepted == 2


KEPT_THEN_CLOSED = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
"""Answered with keep-alive; the peer reads nothing more on that connection and closes it 0.3 s
later: the next request on it meets the close a kept connection can meet as it is taken."""


async def test_an_idempotent_request_a_kept_connection_never_answered_goes_on_a_new_one(
    peers: Callable[..., RawPeer],
) -> None:
    peer = peers(lambda request: KEPT_THEN_CLOSED, linger=0.3)
    url = f"http://{peer.address}/"
    async with client() as c:
        assert (await c.get(url)).content == b"ok"
        assert (await c.get(url)).content == b"ok"  # the kept one closes unanswered: a new one
        assert peer.accepted == 2
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await c.post(url, content=b"x")  # not idempotent: never sent twice
    assert peer.accepted == 2


EARLY = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo big!"
"""What a peer says after reading only the start of an upload (then it stops reading)."""
BIG = b"x" * (8 * 1024 * 1024)


async def _chunks() -> AsyncIterator[bytes]:
    for _ in range(128):
        yield b"y" * 65536


@pytest.mark.parametrize("linger", [0.0, 0.3])
@pytest.mark.parametrize("streamed", [False, True])
async def test_an_answer_before_the_whole_upload_is_the_response(
    peers: Callable[..., RawPeer], streamed: bool, linger: float
) -> None:
    # answers, stops reading, and closes (at once, or 0.3 s later): with the rest of the upload
    # unread, its close is a reset, and the next send fails; what it said is still the response
    peer = peers(lambda request: EARLY, linger=linger)
    async with client() as c:
        for _ in range(2):
            r = await c.post(f"http://{peer.address}/", content=_chunks() if streamed else BIG)
            assert (r.status_code, r.content) == (413, b"too big!")
    assert peer.accepted == 2  # a connection whose request was not sent whole is not reused


async def test_an_upload_stops_writing_once_a_send_failed(
    peers: Callable[..., RawPeer], caplog: pytest.LogCaptureFixture
) -> None:
    peer = peers(lambda request: EARLY)  # answers and closes at once: the next sends fail
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        async with client() as c:
            r = await c.post(f"http://{peer.address}/", content=_chunks())
            assert r.status_code == 413  # read as the loop closed the connection the send failed on
    assert not [rec for rec in caplog.records if "socket.send()" in rec.getMessage()]


async def test_chunk_extensions_and_trailers_are_read_past(peers: Callable[..., RawPeer]) -> None:
    body = b"5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nx-digest: abc\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n"
    peer = peers(lambda request: head + body, linger=1.0)
    async with client() as c:
        assert (await c.get(f"http://{peer.address}/")).content == b"hello world"


@pytest.mark.parametrize("size", [b"-5", b"+5", b"0x5", b"5_0", b"", b"1" * 17])
async def test_a_chunk_size_of_anything_but_hex_digits_is_a_protocol_error(
    peers: Callable[..., RawPeer], size: bytes
) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    peer = peers(lambda request: head + size + b"\r\nhello\r\n0\r\n\r\n", linger=1.0)
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="bad chunk size"):
            await c.get(f"http://{peer.address}/")


async def test_a_response_framed_both_ways_is_read_chunked_and_its_connection_dropped(
    peers: Callable[..., RawPeer],
) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n"
    peer = peers(lambda request: head + b"5\r\nhello\r\n0\r\n\r\n", linger=1.0)
    async with client() as c:
        assert (await c.get(f"http://{peer.address}/")).content == b"hello"
        assert (await c.get(f"http://{peer.address}/")).content == b"hello"
    assert peer.accepted == 2  # a message that may be smuggling: its connection is not reused


async def test_an_http_1_0_answer_is_read_to_the_close(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
    async with client() as c:
        assert (await c.get(f"http://{peer.address}/")).content == b"ok"
        assert (await c.get(f"http://{peer.address}/")).content == b"ok"
    assert peer.accepted == 2  # HTTP/1.0 without keep-alive: not reused


async def test_a_kept_connection_the_peer_closed_is_not_used_again(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # then hangs up
    transport = AsyncH1Transport()
    async with httpx.AsyncClient(transport=transport) as c:
        assert (await c.get(f"http://{peer.address}/")).content == b"ok"
        idle = [conn for conns in transport._connections.idle.values() for conn in conns]
        assert len(idle) == 1  # kept: the answer said nothing of closing
        deadline = time.monotonic() + 5
        while not idle[0].eof:  # the peer's close arrives as connection_lost, no poll of ours
            assert time.monotonic() < deadline, "the peer's close was never seen"
            await asyncio.sleep(0.01)
        assert (await c.get(f"http://{peer.address}/")).content == b"ok"  # on a new connection
    assert peer.accepted == 2


async def test_an_interim_response_is_skipped(peers: Callable[..., RawPeer]) -> None:
    peer = peers(
        lambda r: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    )
    async with client() as c:
        r = await c.post(f"http://{peer.address}/", content=b"x")
    assert r.status_code == 201 and r.content == b"ok" and r.reason_phrase == "Created"


async def test_garbage_is_a_protocol_error(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"SSH-2.0-OpenSSH\r\n\r\n")
    async with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="status line"):
            await c.get(f"http://{peer.address}/")


async def test_connect_failures_are_connect_errors() -> None:
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://{dead_address()}/")


async def test_a_line_break_in_a_header_is_refused_before_sending(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    async with client() as c:
        with pytest.raises(httpx.LocalProtocolError):
            await c.get(f"http://{peer.address}/", headers={"x-a": "1\r\nx-injected: 2"})


async def test_reads_are_held_to_the_bound_of_an_until_timeout(peers: Callable[..., RawPeer]) -> None:
    silent = peers(lambda request: None)
    transport = AsyncH1Transport()
    request = httpx.Request("GET", f"http://{silent.address}/")
    bound = Bound(time.monotonic() + 0.3)
    request.extensions["timeout"] = {k: until(30, bound) for k in ("connect", "read", "write", "pool")}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await transport.handle_async_request(request)
    assert 0.2 < time.monotonic() - started < 2  # the bound, not the 30 s timeout
    await transport.aclose()


# -- as the mesh's default -------------------------------------------------------------------


def _mesh(address: str, **kwargs: Any) -> meshlib.Mesh:
    mesh = meshlib.Mesh("caller", **kwargs)
    docs = [{"kind": "Endpoints", "service": "echo", "endpoints": [{"address": address}]}]
    mesh.apply_rules(parse_documents(docs, source="test"), "test")
    return mesh


async def test_the_mesh_sends_to_its_endpoints_over_h1_and_can_fall_back(server: RunningServer) -> None:
    mesh = _mesh(server.address)
    try:
        async with mesh.client() as c:
            assert isinstance(c._transport._endpoints, AsyncH1Transport)  # type: ignore[attr-defined]
            assert (await c.get("http://echo/")).json()["headers"]["host"] == "echo"
        async with mesh.client(http2=True) as c:
            assert not isinstance(c._transport._endpoints, AsyncH1Transport)  # type: ignore[attr-defined]
            assert (await c.get("http://echo/")).status_code == 200
    finally:
        await mesh.aclose()
    fallback = _mesh(server.address, http_transport="httpcore")
    try:
        async with fallback.client() as c:
            assert isinstance(c._transport._endpoints, httpx.AsyncHTTPTransport)  # type: ignore[attr-defined]
            assert (await c.get("http://echo/")).status_code == 200
    finally:
        await fallback.aclose()


def test_the_setting_takes_only_known_transports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_HTTP_TRANSPORT", "HTTPCORE")
    assert meshlib.Mesh("caller").http_transport == "httpcore"
    with pytest.raises(ValueError, match="http_transport"):
        meshlib.Mesh("caller", http_transport="curl")


async def test_proxies_of_the_environment_are_not_used_for_mesh_hosts(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = dead_address()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://{dead}")
    mesh = _mesh(server.address)
    try:
        async with mesh.client() as c:
            assert (await c.get("http://echo/")).status_code == 200
    finally:
        await mesh.aclose()


async def test_https_to_a_mesh_endpoint_without_mtls_verifies_as_the_caller_said() -> None:
    import ssl

    from tests.security.test_tls import PKI

    pki = PKI()
    site = pki.identity("site")
    server = serve(_echo, ssl_context_factory=lambda config, default: site.server_context(False))
    mesh = _mesh(server.address)
    try:
        trust = ssl.create_default_context(cadata=pki.cert.decode())
        trust.check_hostname = False
        async with mesh.client(verify=trust) as c:
            assert isinstance(c._transport._endpoints, AsyncH1Transport)  # type: ignore[attr-defined]
            assert (await c.get("https://echo/")).json()["method"] == "GET"
        async with mesh.client() as c:  # the system's CAs do not know this server: fails closed
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await c.get("https://echo/")
    finally:
        await mesh.aclose()
        server.stop()


async def test_bodies_stream_both_ways_through_the_mesh(server: RunningServer) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 5000

    mesh = _mesh(server.address)
    try:
        async with mesh.client() as c:
            sent = (await c.post("http://echo/", content=parts())).json()
            assert sent["size"] == 50_000 and sent["headers"]["transfer-encoding"] == "chunked"
            async with c.stream("GET", "http://echo/chunks") as r:
                got = [part async for part in r.aiter_raw()]
            assert b"".join(got) == b"part0;part1;part2;" and len(got) >= 2
        assert mesh.stats.edge("out", "echo").total == 2
    finally:
        await mesh.aclose()
