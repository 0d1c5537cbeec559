"""The httpx transport's shortcuts agree with httpx's own public behaviour."""

from __future__ import annotations

import httpx
import pytest

from meshlib.http.transport import _HeaderView, _set_source, _with_endpoint
from meshlib.raw_path import prefix_end


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [("X-User", "alice")],
        [("x-user", "alice"), ("X-USER", "bob")],  # repeated: joined as httpx joins them
        [("x-user", "zoë".encode())],  # UTF-8
        [("x-user", b"caf\xe9")],  # not UTF-8: Latin-1
        [("cookie", "a=1; b=2"), ("x-canary", "true")],
    ],
)
@pytest.mark.parametrize("name", ["x-user", "cookie", "x-canary", "absent"])
def test_header_view_reads_what_httpx_reads(raw: list, name: str) -> None:
    headers = httpx.Headers(raw)
    assert _HeaderView(headers).get(name) == headers.get(name)
    assert _HeaderView(headers).get(name, "dflt") == headers.get(name, "dflt")


def test_set_source_appends_or_replaces_like_setitem() -> None:
    fresh = httpx.Headers({"Accept": "*/*"})
    _set_source(fresh, "checkout")
    assert fresh["x-mesh-source"] == "checkout"
    assert fresh.raw[-1] == (b"x-mesh-source", b"checkout")

    spoofed = httpx.Headers([("X-Mesh-Source", "admin"), ("x-mesh-source", "root")])
    _set_source(spoofed, "checkout")
    assert spoofed.get_list("x-mesh-source") == ["checkout"]  # no claim of the caller's survives


@pytest.mark.parametrize(
    "url", ["http://orders/a/b?x=1&y=%20#frag", "http://user:pw@orders:8080/", "https://orders/"]
)
def test_with_endpoint_equals_copy_with(url: str) -> None:
    u = httpx.URL(url)
    fast = _with_endpoint(u, "127.0.0.1", 9000)
    assert fast == u.copy_with(host="127.0.0.1", port=9000)
    assert (fast.host, fast.port, fast.raw_path, fast.scheme) == ("127.0.0.1", 9000, u.raw_path, u.scheme)


def test_with_endpoint_can_switch_to_https() -> None:
    u = httpx.URL("http://orders/a?x=1")
    assert _with_endpoint(u, "127.0.0.1", 8443, "https") == u.copy_with(
        scheme="https", host="127.0.0.1", port=8443
    )


@pytest.mark.parametrize(
    ("raw", "prefix", "end"),
    [
        ("/api/a%2Fb", "/api", 4),
        ("/%61pi/x", "/api", 6),  # an unreserved letter sent encoded
        ("/caf%C3%A9/a", "/café/", 11),
        ("/caf%c3%a9", "/café", 10),
        ("/a%25b/c", "/a%b", 6),  # a literal % in the prefix: never matched as written
        ("/a%2541", "/a%41", 7),
        ("/a%41", "/a%41", None),  # that is /aA
        ("/ap", "/api", None),
        ("/api%2", "/api%2", 6),  # not an escape: a % as it is
    ],
)
def test_raw_prefix_end_finds_the_encoded_part_that_decodes_to_the_prefix(
    raw: str, prefix: str, end: int | None
) -> None:
    assert prefix_end(raw, prefix) == end
    if end is not None:
        assert httpx.URL(f"http://a{raw}").path.startswith(prefix)
        assert httpx.URL(f"http://a{raw[:end]}").path == prefix
