"""A route's prefix found in the path as sent (still percent-encoded).

Routes match the decoded path; a rewrite or a redirect replaces the matched prefix in the path
as sent, so that the rest goes on as the caller encoded it (an encoded `/`, `a%2Fb`, stays one).
The client transport, its redirects and the gateway all cut the path here.
"""

from __future__ import annotations

_HEX = frozenset("0123456789abcdefABCDEF")


def prefix_end(raw: str, prefix: str) -> int | None:
    """Where the part of the encoded path `raw` that decodes (UTF-8, as `httpx.URL.path` and
    ASGI servers decode) to `prefix` ends; None if `raw` does not start with one that does."""
    if "%" not in prefix and raw.startswith(prefix):
        return len(prefix)  # the usual case: a prefix sent as it is written
    i, end = 0, len(raw)
    for byte in prefix.encode("utf-8"):
        if i >= end:
            return None
        pair = raw[i + 1 : i + 3] if raw[i] == "%" else ""
        if len(pair) == 2 and pair[0] in _HEX and pair[1] in _HEX:
            value, i = int(pair, 16), i + 3
        else:  # raw is ASCII: one character, one byte
            value, i = ord(raw[i]), i + 1
        if value != byte:
            return None
    return i
