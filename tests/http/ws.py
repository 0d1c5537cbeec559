"""A WebSocket handshake over a raw socket: what a server answers, and its first text frame."""

from __future__ import annotations

import base64
import os
import socket


def handshake(url: str, headers: dict[str, str] | None = None, path: str = "/ws/x") -> tuple[int, bytes]:
    """(status of the handshake's answer, the first text frame's payload if it was accepted)."""
    host, port = url.removeprefix("http://").split(":")
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
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
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            rest += sock.recv(4096)
        return status, rest[2 : 2 + (rest[1] & 0x7F)]  # a short unmasked text frame
