"""The dashboard at `/`: a static page that polls the control service's read endpoints.

The page (static/index.html, app.js, style.css) is plain HTML, JavaScript and SVG with no
framework, build step or CDN, so it works offline and ships inside the wheel. It only reads:
`/healthz`, `/v1/config`, `/v1/history`, `/v1/clients`, `/v1/registry`, `/v1/graph`, and
`/v1/diff` (defined here) for the unified diff between two rules versions; it renders every
value with textContent, and the page is served with a Content-Security-Policy that allows
nothing but this origin's own script and style.

The files are read once, at import, and served from memory with an ETag.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import re
from typing import TYPE_CHECKING, Any

import yaml
from starlette.responses import JSONResponse, Response

from meshlib.control.parsing import ApiError

if TYPE_CHECKING:
    from starlette.requests import Request

    from meshlib.control.plane import ControlPlane

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_VERSION_RE = re.compile(r"^[0-9]{1,19}$")
MAX_DIFF_LINES = 20_000


def _load() -> dict[str, tuple[bytes, str, str]]:
    files = {}
    for item in importlib.resources.files(__name__).joinpath("static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _TYPES:
            data = item.read_bytes()
            files[item.name] = (data, _TYPES[suffix], '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
    return files


_FILES = _load()


def _serve(request: Request, name: str) -> Response:
    data, media_type, etag = _FILES[name]
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": _CSP,
        "Referrer-Policy": "no-referrer",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


async def index(plane: ControlPlane, request: Request) -> Response:
    """`GET /`: the page."""
    return _serve(request, "index.html")


async def static_file(plane: ControlPlane, request: Request) -> Response:
    """`GET /dashboard/{name}`: the page's script and style sheet (nothing else is served)."""
    name = request.path_params["name"]
    if name not in _FILES or name == "index.html":
        return JSONResponse({"error": "Not Found"}, 404)
    return _serve(request, name)


def _version(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not _VERSION_RE.match(text.strip()):
        raise ApiError(400, f"query parameter {name} must be a version number, got {text[:40]!r}")
    return int(text.strip())


async def _documents(plane: ControlPlane, version: int) -> list[dict[str, Any]]:
    if version == 0:
        return []  # before the first change: no documents
    if version == plane.version:
        return plane.documents
    return (await plane.get_version(version))["documents"]


def as_yaml(documents: list[dict[str, Any]]) -> list[str]:
    """Documents as multi-document YAML lines (the way they are written in a rules file)."""
    if not documents:
        return []
    text = yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return text.splitlines(keepends=True)


async def get_diff(plane: ControlPlane, request: Request) -> Response:
    """`GET /v1/diff?from=A&to=B`: the unified diff of the rules of two versions, as YAML.

    `to` defaults to the current version, `from` to the one before it; version 0 is the empty
    rule set every store starts from. Versions stored under rules this meshlib no longer
    accepts raise RulesError: the handler answers 422 with the problems.
    """
    to = _version(request, "to", plane.version)
    start = _version(request, "from", max(0, to - 1))
    before, after = [await _documents(plane, version) for version in (start, to)]
    lines = list(
        difflib.unified_diff(as_yaml(before), as_yaml(after), f"version {start}", f"version {to}", n=3)
    )
    truncated = len(lines) > MAX_DIFF_LINES
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines[:MAX_DIFF_LINES])
    return JSONResponse(
        {"from": start, "to": to, "changed": bool(lines), "truncated": truncated, "diff": text.rstrip("\n")}
    )
