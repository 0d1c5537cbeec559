"""Where a redirect rule sends a request: the Location of the answer, from the rule and the URL.

Pure and protocol-neutral: the HTTP clients' redirect stage and the gateway both call
`location`, so a rule means the same wherever it is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.rules import RedirectSpec


def location(
    spec: RedirectSpec, *, scheme: str, authority: str, path: str, query: str, matched_prefix: str | None
) -> str:
    """The absolute URL a request to `scheme://authority path?query` is redirected to.

    Each part the rule gives replaces that part of the request's: `scheme`, `authority`, the
    whole path (`uri`), or the matched path prefix (`prefix`; `matched_prefix` is the literal
    prefix of the rule's path match, as `CompiledMatch.prefix` holds it). `path` and `query`
    are as sent (percent-encoded); the query is kept unless `uri` carries one of its own.
    """
    new_path = path
    new_query = query
    if spec.uri is not None:
        new_path, sep, own = spec.uri.partition("?")
        if sep:
            new_query = own
    elif spec.prefix is not None:
        if matched_prefix is None or not path.startswith(matched_prefix):
            raise ValueError(f"redirect.prefix needs the matched path prefix (got {matched_prefix!r})")
        rest = path[len(matched_prefix) :]
        if spec.prefix.endswith("/") and rest.startswith("/"):
            rest = rest[1:]  # the same join as rewrite.prefix: /v1/ -> /v2/ keeps one slash
        new_path = spec.prefix + rest
    url = f"{spec.scheme or scheme}://{spec.authority or authority}{new_path or '/'}"
    return f"{url}?{new_query}" if new_query else url
