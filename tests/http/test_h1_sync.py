"""The mesh's HTTP/1.1 sync transport against real peers on 127.0.0.1: uvicorn for what a
server does right, raw sockets for what a peer can do wrong."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from meshlib.http.bounded_io import Bound, until
from meshlib.http.h1_sync import H1Transport
from meshlib.testing import RunningServer, serve
from tests.backend import dead_address
from tests.http.test_h1 import BIG, EARLY, KEPT_THEN_CLOSED, RawPeer, _echo, _mesh


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = serve(_echo)
    yield running
    running.stop()


@pytest.fixture
def peers() -> Iterator[Callable[..., RawPeer]]:
    made: list[RawPeer] = []

    def make(reply: Callable[[bytes], bytes | None], linger: float = 0.0) -> RawPeer:
        made.append(RawPeer(reply, linger))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


def client(**limits: Any) -> httpx.Client:
    return httpx.Client(transport=H1Transport(limits=httpx.Limits(**limits) if limits else None))


class Trickler:
    """Answers with a head, then sends the body a byte every `every` seconds (keeps going for
    far longer than any timeout in these tests)."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                while not self._stop.wait(self.every):
                    conn.sendall(b"x")
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_requests_share_one_kept_alive_connection(server: RunningServer) -> None:
    with client() as c:
        first = c.get(f"http://{server.address}/").json()
        second = c.post(f"http://{server.address}/", content=b"abc").json()
        head = c.head(f"http://{server.address}/")
        third = c.get(f"http://{server.address}/").json()
    assert first["port"] == second["port"] == third["port"]
    assert second["method"] == "POST" and second["size"] == 3
    assert head.status_code == 200 and head.content == b""


def test_threads_reuse_connections_up_to_the_limit(server: RunningServer) -> None:
    with client(max_connections=4) as c, ThreadPoolExecutor(16) as pool:
        ports = list(pool.map(lambda _: c.get(f"http://{server.address}/").json()["port"], range(200)))
    assert len(ports) == 200 and 1 <= len(set(ports)) <= 4


def test_an_expired_idle_connection_is_not_used_again(server: RunningServer) -> None:
    with client(keepalive_expiry=0) as c:
        ports = {c.get(f"http://{server.address}/").json()["port"] for _ in range(3)}
    assert len(ports) == 3


def test_a_streamed_upload_is_sent_chunked_and_whole(server: RunningServer) -> None:
    def parts() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 10_000

    with client() as c:
        got = c.post(f"http://{server.address}/", content=parts()).json()
    assert got["size"] == 200_000 and got["headers"]["transfer-encoding"] == "chunked"


def test_a_chunked_response_streams_in_parts_and_frees_its_connection(server: RunningServer) -> None:
    with client() as c:
        with c.stream("GET", f"http://{server.address}/chunks") as r:
            parts = list(r.iter_raw())
        assert b"".join(parts) == b"part0;part1;part2;"
        assert len(parts) >= 2  # it came as it was sent, not gathered
        port = c.get(f"http://{server.address}/").json()["port"]
        assert c.get(f"http://{server.address}/").json()["port"] == port


def test_large_and_empty_bodies(server: RunningServer) -> None:
    with client() as c:
        assert c.get(f"http://{server.address}/bytes/3000000").content == b"x" * 3_000_000
        empty = c.get(f"http://{server.address}/empty")
        assert empty.status_code == 204 and empty.content == b""
        assert c.get(f"http://{server.address}/bytes/5").content == b"xxxxx"


def test_a_held_connection_makes_the_next_request_time_out_in_the_pool(server: RunningServer) -> None:
    with client(max_connections=1) as c:
        with c.stream("GET", f"http://{server.address}/chunks"), pytest.raises(httpx.PoolTimeout):
            c.get(f"http://{server.address}/", timeout=httpx.Timeout(5, pool=0.1))
        assert c.get(f"http://{server.address}/").status_code == 200  # the slot came back


def test_an_idle_connection_of_another_endpoint_makes_room(
    server: RunningServer, peers: Callable[..., RawPeer]
) -> None:
    other = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", linger=2.0)
    transport = H1Transport(limits=httpx.Limits(max_connections=1))
    with httpx.Client(transport=transport) as c:
        assert c.get(f"http://{other.address}/", timeout=httpx.Timeout(5, pool=0.1)).content == b"ok"
        assert c.get(f"http://{server.address}/", timeout=httpx.Timeout(5, pool=0.1)).status_code == 200
        assert transport._connections.open == 1 and transport._connections.idle_count == 1


def test_a_failed_connect_gives_its_slot_back() -> None:
    with client(max_connections=1) as c:
        for _ in range(3):  # a slot kept by a failure would make the second a PoolTimeout
            with pytest.raises(httpx.ConnectError):
                c.get(f"http://{dead_address()}/", timeout=httpx.Timeout(2, pool=0.1))


def test_a_body_cut_short_is_a_protocol_error(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    with client() as c, pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
        c.get(f"http://{peer.address}/")


def test_a_peer_that_hangs_up_without_answering(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"")
    with client() as c, pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        c.get(f"http://{peer.address}/")


def test_a_body_until_close_and_connection_close_are_not_reused(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
    with client() as c:
        assert c.get(f"http://{peer.address}/").content == b"all of it"
        assert c.get(f"http://{peer.address}/").content == b"all of it"
    assert peer.accepted == 2


def test_a_request_failing_on_a_kept_connection_gives_its_slot_back(server: RunningServer) -> None:
    url = f"http://{server.address}/"
    with client(max_connections=1) as c:
        assert c.get(url).status_code == 200  # its connection is kept
        with pytest.raises(httpx.LocalProtocolError):  # fails on the kept one, not sent again
            c.get(url, headers={"x-a": "1\r\nx-injected: 2"})
        assert c.get(url, timeout=httpx.Timeout(5, pool=0.5)).status_code == 200


def test_an_idempotent_request_a_kept_connection_never_answered_goes_on_a_new_one(
    peers: Callable[..., RawPeer],
) -> None:
    peer = peers(lambda request: KEPT_THEN_CLOSED, linger=0.3)
    url = f"http://{peer.address}/"
    with client() as c:
        assert c.get(url).content == b"ok"
        assert c.get(url).content == b"ok"  # the kept one closes unanswered: a new one
        assert peer.accepted == 2
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            c.post(url, content=b"x")  # not idempotent: never sent twice
    assert peer.accepted == 2


def _chunks() -> Iterator[bytes]:
    for _ in range(128):
        yield b"y" * 65536


@pytest.mark.parametrize("linger", [0.0, 0.3])
@pytest.mark.parametrize("streamed", [False, True])
def test_an_answer_before_the_whole_upload_is_the_response(
    peers: Callable[..., RawPeer], streamed: bool, linger: float
) -> None:
    peer = peers(lambda request: EARLY, linger=linger)  # answers, stops reading, closes
    with client() as c:
        for _ in range(2):
            r = c.post(f"http://{peer.address}/", content=_chunks() if streamed else BIG)
            assert (r.status_code, r.content) == (413, b"too big!")
    assert peer.accepted == 2  # a connection whose request was not sent whole is not reused


def test_chunk_extensions_and_trailers_are_read_past(peers: Callable[..., RawPeer]) -> None:
    body = b"5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nx-digest: abc\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n"
    peer = peers(lambda request: head + body, linger=1.0)
    with client() as c:
        assert c.get(f"http://{peer.address}/").content == b"hello world"


def test_a_kept_connection_the_peer_closed_is_not_used_again(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # then hangs up
    transport = H1Transport()
    with httpx.Client(transport=transport) as c:
        assert c.get(f"http://{peer.address}/").content == b"ok"
        idle = [conn for conns in transport._connections.idle.values() for conn in conns]
        assert len(idle) == 1  # kept: the answer said nothing of closing
        deadline = time.monotonic() + 5
        while peer.accepted < 1 or not _closed_by_peer(idle[0].sock):
            assert time.monotonic() < deadline, "the peer never closed"
            time.sleep(0.01)
        assert c.get(f"http://{peer.address}/").content == b"ok"  # on a new connection, no error
    assert peer.accepted == 2


def test_a_kept_connection_with_bytes_nobody_asked_for_is_not_used_again(
    peers: Callable[..., RawPeer],
) -> None:
    peer = peers(lambda request: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokjunk", linger=2.0)
    with client() as c:
        assert c.get(f"http://{peer.address}/").content == b"ok"
        assert c.get(f"http://{peer.address}/").content == b"ok"  # not "ju" read as a response
    assert peer.accepted == 2


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def test_an_interim_response_is_skipped(peers: Callable[..., RawPeer]) -> None:
    peer = peers(
        lambda r: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    )
    with client() as c:
        r = c.post(f"http://{peer.address}/", content=b"x")
    assert r.status_code == 201 and r.content == b"ok" and r.reason_phrase == "Created"


def test_garbage_and_line_breaks_are_protocol_errors(peers: Callable[..., RawPeer]) -> None:
    peer = peers(lambda request: b"SSH-2.0-OpenSSH\r\n\r\n")
    with client() as c:
        with pytest.raises(httpx.RemoteProtocolError, match="status line"):
            c.get(f"http://{peer.address}/")
        with pytest.raises(httpx.LocalProtocolError):
            c.get(f"http://{peer.address}/", headers={"x-a": "1\r\nx-injected: 2"})


def test_a_trickled_body_is_held_to_the_bound_of_an_until_timeout() -> None:
    trickle = Trickler()
    transport = H1Transport()
    try:
        request = httpx.Request("GET", f"http://{trickle.address}/")
        bound = Bound(time.monotonic() + 0.4)
        request.extensions["timeout"] = {k: until(30, bound) for k in ("connect", "read", "write", "pool")}
        started = time.monotonic()
        response = transport.handle_request(request)  # the head comes at once
        with pytest.raises(httpx.ReadTimeout):
            for _ in response.stream:
                pass
        assert 0.3 < time.monotonic() - started < 2  # the bound, not 30 s nor a byte's 50 ms
        assert transport._connections.open == 0  # the cut connection is not kept
    finally:
        transport.close()
        trickle.close()


def test_a_silent_peer_fails_at_the_read_timeout(peers: Callable[..., RawPeer]) -> None:
    silent = peers(lambda request: None)
    with client() as c:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            c.get(f"http://{silent.address}/", timeout=httpx.Timeout(5, read=0.2))
    assert time.monotonic() - started < 2


# -- as the mesh's default -------------------------------------------------------------------


def test_the_mesh_sends_to_its_endpoints_over_h1_sync_and_can_fall_back(server: RunningServer) -> None:
    mesh = _mesh(server.address)
    try:
        with mesh.sync_client() as c:
            assert isinstance(c._transport._endpoints, H1Transport)  # type: ignore[attr-defined]
            assert c.get("http://echo/").json()["headers"]["host"] == "echo"
        with mesh.sync_client(http2=True) as c:
            assert not isinstance(c._transport._endpoints, H1Transport)  # type: ignore[attr-defined]
            assert c.get("http://echo/").status_code == 200
        with mesh.sync_client(transport=httpx.HTTPTransport()) as c:
            assert isinstance(c._transport._endpoints, httpx.HTTPTransport)  # type: ignore[attr-defined]
    finally:
        mesh.close()
    fallback = _mesh(server.address, http_transport="httpcore")
    try:
        with fallback.sync_client() as c:
            assert isinstance(c._transport._endpoints, httpx.HTTPTransport)  # type: ignore[attr-defined]
            assert c.get("http://echo/").status_code == 200
    finally:
        fallback.close()


def test_bodies_stream_both_ways_through_the_mesh(server: RunningServer) -> None:
    def parts() -> Iterator[bytes]:
        for _ in range(10):
            yield b"z" * 5000

    mesh = _mesh(server.address)
    try:
        with mesh.sync_client() as c:
            sent = c.post("http://echo/", content=parts()).json()
            assert sent["size"] == 50_000 and sent["headers"]["transfer-encoding"] == "chunked"
            with c.stream("GET", "http://echo/chunks") as r:
                got = list(r.iter_raw())
            assert b"".join(got) == b"part0;part1;part2;" and len(got) >= 2
        assert mesh.stats.edge("out", "echo").total == 2
    finally:
        mesh.close()


def test_https_to_a_mesh_endpoint_without_mtls_verifies_as_the_caller_said() -> None:
    import ssl

    from tests.security.test_tls import PKI

    pki = PKI()
    site = pki.identity("site")
    server = serve(_echo, ssl_context_factory=lambda config, default: site.server_context(False))
    mesh = _mesh(server.address)
    try:
        trust = ssl.create_default_context(cadata=pki.cert.decode())
        trust.check_hostname = False
        with mesh.sync_client(verify=trust) as c:
            assert isinstance(c._transport._endpoints, H1Transport)  # type: ignore[attr-defined]
            first = c.get("https://echo/").json()
            assert first["method"] == "GET"
            assert c.get("https://echo/").json()["port"] == first["port"]  # the TLS connection kept
        with mesh.sync_client() as c, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get("https://echo/")  # the system's CAs do not know this server: fails closed
    finally:
        mesh.close()
        server.stop()
