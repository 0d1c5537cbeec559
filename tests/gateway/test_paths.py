"""Dot-segments resolved in the path as sent (RFC 3986 5.2.4), `%2e` read as a dot."""

from __future__ import annotations

import pytest

from meshlib.gateway.paths import normalized


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/orders/1", b"/orders/1"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/..", b"/"),
        (b"/../../etc", b"/etc"),
        (b"/a/%2e%2E/b", b"/b"),
        (b"/a/.%2e/b", b"/b"),
        (b"/a/%2E/b", b"/a/b"),
        (b"/a//../b", b"/a/b"),
        (b"/a/...", b"/a/..."),
        (b"/a/.b/..c/b..", b"/a/.b/..c/b.."),
        (b"/a/%2e%2e.json", b"/a/%2e%2e.json"),
        (b"/a%2Fb/c", b"/a%2Fb/c"),
        (b"/a/..%2fb", None),
        (b"/a/%2e%2e%2fb", None),
        (b"/a%2f..%2fb", None),
        (b"/a%2f.", None),
    ],
)
def test_dot_segments(raw: bytes, expected: bytes | None) -> None:
    assert normalized(raw) == expected


def test_a_path_without_dots_is_returned_as_is() -> None:
    raw = b"/orders/%20x"
    assert normalized(raw) is raw
