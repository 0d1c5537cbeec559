"""Telling an `http://` URL that points at a TLS server (a `--secure` control service).

Spoken to in plain HTTP, a TLS server closes the connection or answers with an alert, which
httpx reports as a bare protocol error. When that happens on an http URL, `tls_hint(url)`
sends one TLS ClientHello to the same address and looks at the first bytes of the answer: a
TLS record header (handshake or alert, version 3.x) means the server speaks TLS, and the hint
names the https URL to use. Nothing is verified, sent or trusted beyond the hello: this only
chooses the wording of an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from urllib.parse import urlsplit, urlunsplit

import httpx

_TLS_RECORD_TYPES = (0x15, 0x16)  # alert, handshake


def worth_probing(url: str, exc: BaseException) -> bool:
    """An http URL whose server was reached but did not answer in HTTP."""
    if urlsplit(url).scheme.lower() != "http" or not isinstance(exc, httpx.TransportError):
        return False
    # a TLS server answers plaintext at once (an alert, a close): refused connections and timeouts are not it
    return not isinstance(exc, (httpx.ConnectError, httpx.TimeoutException, httpx.UnsupportedProtocol))


def speaks_tls(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at the URL's host and port answers a TLS ClientHello in TLS."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or 80
    except ValueError:  # a port out of range: nothing to probe
        return False
    if not host:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):  # the hello is written; the answer comes below
        tls.do_handshake()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(outgoing.read())
            head = b""
            while len(head) < 3:
                chunk = sock.recv(3 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return len(head) == 3 and head[0] in _TLS_RECORD_TYPES and head[1] == 3


def https_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(("https", *parts[1:]))


def tls_hint(url: str, exc: BaseException) -> str | None:
    """ "the control service at URL speaks TLS: use https://..." when that explains `exc`."""
    if not worth_probing(url, exc) or not speaks_tls(url):
        return None
    return f"the control service at {url} speaks TLS: use {https_url(url)}"


async def atls_hint(url: str, exc: BaseException) -> str | None:
    """`tls_hint` for a coroutine: the probe runs on a worker thread, and only when worth it."""
    if not worth_probing(url, exc):
        return None
    return await asyncio.to_thread(tls_hint, url, exc)
