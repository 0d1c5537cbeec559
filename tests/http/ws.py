"""A WebSocket handshake over a raw socket: what a server answers, and its first text frame."""

from __future__ import annotations

import base64
import os
import socket
import ssl


def handshake(
    url: str,
    headers: dict[str, str] | None = None,
    path: str = "/ws/x",
    tls: ssl.SSLContext | None = None,
    sni: str | None = None,
) -> tuple[int, bytes]:
    """(status of the handshake's answer, the first text frame's payload if it was accepted);
    over TLS with `tls` (`sni`: the name sent)."""
    host, port = url.split("://")[-1].split(":")
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    raw = socket.create_connection((host, int(port)), timeout=10)
    with tls.wrap_socket(raw, server_hostname=sni or host) if tls is not None else raw as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            return status, b""
        return status, _first_frame(sock, rest)


def _first_frame(sock: socket.socket, rest: bytes) -> bytes:
    """The payload of the first frame (unmasked, as a server sends it; up to 64 KiB)."""

    def at_least(n: int) -> bytes:
        nonlocal rest
        while len(rest) < n:
            chunk = sock.recv(4096)
            assert chunk, rest
            rest += chunk
        return rest

    length, start = at_least(2)[1] & 0x7F, 2
    if length == 126:
        length, start = int.from_bytes(at_least(4)[2:4], "big"), 4
    return at_least(start + length)[start : start + length]
