from meshlib.gateway.forwarding import inward, outward


def _dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in headers}


REQUEST = [
    (b"host", b"shop.example.com:8443"),
    (b"Connection", b"keep-alive, X-Secret"),
    (b"x-secret", b"1"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"trailer", b"x-sum"),
    (b"transfer-encoding", b"chunked"),
    (b"upgrade", b"websocket"),
    (b"proxy-authorization", b"Basic eDp5"),
    (b"x-mesh-source", b"payments"),
    (b"x-forwarded-for", b"6.6.6.6, 10.0.0.1"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"evil.example"),
    (b"accept", b"*/*"),
    (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


def test_hop_by_hop_and_mesh_headers_do_not_cross_inward() -> None:
    out = _dict(inward(REQUEST, client="192.0.2.7", scheme="http"))
    assert set(out) == {
        "accept",
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }


def test_forwarded_headers_from_outside_are_not_trusted_by_default() -> None:
    out = _dict(inward(REQUEST, client="192.0.2.7", scheme="http"))
    assert out["x-forwarded-for"] == "192.0.2.7"
    assert out["x-forwarded-proto"] == "http"
    assert out["x-forwarded-host"] == "shop.example.com:8443"


def test_trusted_hops_keep_what_those_proxies_wrote() -> None:
    out = _dict(inward(REQUEST, client="192.0.2.7", scheme="http", trusted_hops=1))
    assert out["x-forwarded-for"] == "10.0.0.1, 192.0.2.7"  # 6.6.6.6 is the client's own claim
    assert out["x-forwarded-proto"] == "https" and out["x-forwarded-host"] == "evil.example"
    out = _dict(inward(REQUEST, client="192.0.2.7", scheme="http", trusted_hops=5))
    assert out["x-forwarded-for"] == "6.6.6.6, 10.0.0.1, 192.0.2.7"


def test_hop_by_hop_headers_do_not_cross_outward() -> None:
    response = [
        (b"content-type", b"text/plain"),
        (b"connection", b"close, x-hop"),
        (b"x-hop", b"1"),
        (b"transfer-encoding", b"chunked"),
        (b"proxy-authenticate", b"Basic"),
        (b"x-mesh-error", b"kept"),
    ]
    assert _dict(outward(response)) == {"content-type": "text/plain", "x-mesh-error": "kept"}


def test_connection_cannot_name_the_body_length_away() -> None:
    """A body sent on without its length would be lost (no Transfer-Encoding crosses either)."""
    request = [(b"connection", b"Content-Length, x-hop"), (b"content-length", b"5"), (b"x-hop", b"1")]
    assert _dict(inward(request, client="192.0.2.7", scheme="http"))["content-length"] == "5"
    assert "x-hop" not in _dict(inward(request, client="192.0.2.7", scheme="http"))
    response = [(b"connection", b"content-length"), (b"content-length", b"2")]
    assert _dict(outward(response)) == {"content-length": "2"}
