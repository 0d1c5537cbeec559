"""The path a gateway route sees is the path it sends: dot-segments resolved first.

A route for `/shop/` matched `/shop/../admin` as written, and the URL sent on resolved the
`..`, so the backend got `/admin`, a path no route exposed. As Envoy's `normalize_path` does,
the gateway now resolves dot-segments (RFC 3986 section 5.2.4) in the path as sent, `%2e` read
as the dot it encodes (section 6.2.2.2), then matches and forwards the result. A dot-segment
that only appears once `%2f` is decoded (`/shop/..%2fadmin`) cannot be resolved in the path as
sent without changing what the backend decodes, so such a request is refused.
"""

from __future__ import annotations

from urllib.parse import unquote


def _dots(segment: bytes) -> bytes | None:
    """`.` or `..` when `segment` is one, percent-encoded or not, else None."""
    if len(segment) > 6 or (b"." not in segment and b"%" not in segment):
        return None
    plain = segment.lower().replace(b"%2e", b".")
    return plain if plain in (b".", b"..") else None


def normalized(raw: bytes) -> bytes | None:
    """`raw`, the path as sent (still percent-encoded, no query), with its dot-segments removed;
    `raw` itself when it has none. None when the decoded path would still hold one."""
    if b"." not in raw and b"%2e" not in raw and b"%2E" not in raw:  # no dot: the usual path
        return raw
    parts = raw.split(b"/")
    out: list[bytes] = []
    last = len(parts) - 1
    for i, segment in enumerate(parts):
        dots = _dots(segment)
        if dots is None:
            out.append(segment)
            continue
        if dots == b".." and len(out) > 1:
            out.pop()
        if i == last:  # `/a/..` is `/`, `/a/.` is `/a/`: the last segment stays, empty
            out.append(b"")
    path = b"/".join(out) if out != [b""] else b"/"
    if b"%" in path and any(s in (".", "..") for s in unquote(path.decode("latin-1")).split("/")):
        return None  # `..%2f`: a dot-segment once decoded
    return path
