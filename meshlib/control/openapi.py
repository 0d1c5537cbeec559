"""The control API's OpenAPI 3.1 document, served at `GET /openapi.json`.

It is generated, not written: `OPERATIONS` names each route's method, path, parameters,
request model, answers (status -> model) and who may call it, and `document()` turns that
table into OpenAPI with the JSON Schemas (2020-12, which OpenAPI 3.1 uses as is) that pydantic
derives from the very models the handlers validate with. The errors every route shares (a bad
body, a missing token) are added from what the route declares, so the table stays short.

The table is checked against the app's routes by the tests, and the answers against the
document by a fuzz test against a live service (tests/control/test_fuzz_api.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter
from starlette.responses import JSONResponse, Response

from meshlib.control import graph, models
from meshlib.control.parsing import AckBatch, AckBody, HeartbeatBody, RegisterBody
from meshlib.control.security_api import MAX_CSR, RotateBody, SignBody, TokenBody
from meshlib.control.store import MAX_VERSION
from meshlib.rules import Document

if TYPE_CHECKING:
    from starlette.requests import Request

    from meshlib.control.plane import ControlPlane

Security = Literal["none", "admin", "caller", "service"]
"""Who may call: anyone; the operator (admin token); with security on, a caller identity
(join token, mesh certificate or admin token); with security on, a service's identity only
(join token or mesh certificate: `POST /v1/ca/sign`)."""

JSON = "application/json"
YAML = "application/yaml"
_ID = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[^\s]+$"}
_SERVICE = {"type": "string", "minLength": 1, "maxLength": 253}
_VERSION = {"type": "integer", "minimum": 0, "maximum": MAX_VERSION}


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter (checked by hand in the handler)."""

    name: str
    where: Literal["path", "query", "header"]
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Body:
    """A request body: the type it is validated as, and the media types accepted."""

    type: Any
    media: tuple[str, ...] = (JSON,)
    required: bool = True


@dataclass(frozen=True)
class Reply:
    """An answer: its status, and the type of its body (None: no body) in `media`."""

    status: int
    description: str
    type: Any = models.Error
    media: tuple[str, ...] = (JSON,)


@dataclass(frozen=True)
class Operation:
    """One route and method: the row of the table the document is generated from."""

    method: str
    path: str
    summary: str
    tag: str
    replies: tuple[Reply, ...]
    security: Security = "none"
    params: tuple[Param, ...] = ()
    body: Body | None = None
    secure_only: bool = False
    """Only with security on (`--secure`); a 404 otherwise."""
    description: str = ""


def _path(name: str, schema: dict[str, Any], description: str = "") -> Param:
    return Param(name, "path", schema, description)


def _query(name: str, schema: dict[str, Any], description: str = "") -> Param:
    return Param(name, "query", schema, description)


def _err(status: int, description: str) -> Reply:
    return Reply(status, description)


_NOT_FOUND = _err(404, "no such thing")
_BAD_PARAM = _err(400, "a malformed path or query parameter")
_STORE_DOWN = _err(503, "the registry's store (etcd) did not take the change; try again (Retry-After)")
_RULES_STORE_DOWN = _err(
    503, "the rules store (SQLite busy, etcd unreachable) did not take the change; try again (Retry-After)"
)
_FLAG = {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no", "on", "off", ""]}
_RULES_BODY = list[Document] | models.ConfigBody

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET",
        "/",
        "The dashboard page",
        "dashboard",
        (Reply(200, "the page", str, ("text/html",)), Reply(304, "not modified (ETag)", None)),
    ),
    Operation(
        "GET",
        "/dashboard/{name}",
        "The dashboard's script and style sheet",
        "dashboard",
        (
            Reply(200, "the file", str, ("text/javascript", "text/css")),
            Reply(304, "not modified (ETag)", None),
            _NOT_FOUND,
        ),
        params=(_path("name", {"type": "string", "minLength": 1}),),
    ),
    Operation(
        "GET", "/v1/graph", "The live service graph", "telemetry", (Reply(200, "the graph", models.Graph),)
    ),
    Operation(
        "GET",
        "/v1/diff",
        "The unified diff of two rules versions, as YAML",
        "rules",
        (
            Reply(200, "the diff", models.DiffOut),
            _BAD_PARAM,
            _err(404, "no such version"),
            _err(422, "invalid rules"),
        ),
        params=(
            _query("from", {"type": "string"}, "a version (default: the one before `to`)"),
            _query("to", {"type": "string"}, "a version (default: the current one)"),
        ),
    ),
    Operation("GET", "/healthz", "Health", "service", (Reply(200, "up", models.Health),)),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics",
        "service",
        (Reply(200, "Prometheus text", str, ("text/plain",)),),
    ),
    Operation(
        "GET",
        "/openapi.json",
        "This document",
        "service",
        (Reply(200, "OpenAPI 3.1", dict[str, Any]),),
    ),
    Operation(
        "GET",
        "/v1/config",
        "Every document and the current version",
        "rules",
        (Reply(200, "", models.ConfigOut),),
    ),
    Operation(
        "PUT",
        "/v1/config",
        "Apply documents (upserted by kind and service) as one version",
        "rules",
        (Reply(200, "committed (or, dry run, valid)", models.ApplyResult), _BAD_PARAM, _RULES_STORE_DOWN),
        security="admin",
        params=(_query("dry_run", _FLAG, "validate only"),),
        body=Body(_RULES_BODY, (JSON, YAML)),
        description='A list of documents or `{"documents": [...], "message": ...}`, as JSON or YAML '
        "(a YAML body may also be a stream of documents). Invalid rules: 422 with `problems`.",
    ),
    Operation(
        "DELETE",
        "/v1/config/{kind}/{service}",
        "Remove one document",
        "rules",
        (
            Reply(200, "committed", models.VersionOut),
            _NOT_FOUND,
            _err(422, "others refer to it"),
            _RULES_STORE_DOWN,
        ),
        security="admin",
        params=(_path("kind", {"type": "string"}), _path("service", {"type": "string"})),
    ),
    Operation(
        "GET",
        "/v1/history",
        "Stored versions, newest first",
        "rules",
        (Reply(200, "", list[models.HistoryEntry]), _BAD_PARAM),
        params=(_query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000}),),
    ),
    Operation(
        "GET",
        "/v1/history/{version}",
        "One stored version with its documents",
        "rules",
        (
            Reply(200, "", models.VersionDocuments),
            _BAD_PARAM,
            _err(404, "no such version"),
            _err(422, "stored under rules this version of meshlib refuses"),
            _RULES_STORE_DOWN,
        ),
        params=(_path("version", _VERSION),),
    ),
    Operation(
        "POST",
        "/v1/rollback/{version}",
        "Commit an old version's documents as a new version",
        "rules",
        (
            Reply(200, "committed", models.ApplyResult),
            _BAD_PARAM,
            _err(404, "no such version"),
            _err(422, "stored under rules this version of meshlib refuses"),
        ),
        security="admin",
        params=(_path("version", _VERSION),),
    ),
    Operation(
        "GET",
        "/v1/watch",
        "The rules and endpoints as Server-Sent Events (a stream that does not end)",
        "watch",
        (Reply(200, "events: snapshot, rules, endpoints, bundle", str, ("text/event-stream",)), _BAD_PARAM),
        security="caller",
        params=(
            _query("service", _ID, "the service watching (default: the caller's)"),
            _query("client", _ID, "the watching process's id"),
            _query(
                "applied",
                _FLAG,
                "Last-Event-ID is the state the client applied: a resume with nothing to send is its ack",
            ),
            Param("Last-Event-ID", "header", {"type": "string"}, "resume after this event (EPOCH:REVISION)"),
        ),
    ),
    Operation(
        "POST",
        "/v1/ack",
        "A client reports the revision it applied (or refused); several clients' acks in one batch",
        "watch",
        (Reply(204, "noted", None),),
        security="caller",
        body=Body(AckBody | AckBatch),
    ),
    Operation("GET", "/v1/clients", "Known clients", "watch", (Reply(200, "", list[models.ClientInfo]),)),
    Operation(
        "GET",
        "/v1/registry",
        "Every registered instance",
        "registry",
        (Reply(200, "instances by service", dict[str, list[models.Instance]]),),
    ),
    Operation(
        "GET",
        "/v1/registry/{service}",
        "One service's instances",
        "registry",
        (Reply(200, "instances by service", dict[str, list[models.Instance]]), _BAD_PARAM),
        params=(_path("service", _SERVICE),),
    ),
    Operation(
        "POST",
        "/v1/registry/{service}",
        "Register an instance",
        "registry",
        (
            Reply(201, "registered", models.InstanceOut),
            _BAD_PARAM,
            _err(429, "the registry is full"),
            _STORE_DOWN,
        ),
        security="caller",
        params=(_path("service", _SERVICE),),
        body=Body(RegisterBody),
    ),
    Operation(
        "PUT",
        "/v1/registry/{service}/{id}",
        "Heartbeat an instance (optionally with a new TTL)",
        "registry",
        (
            Reply(200, "alive", models.InstanceOut),
            _err(404, "no such instance (expired? register again)"),
            _STORE_DOWN,
        ),
        security="caller",
        params=(_path("service", _SERVICE), _path("id", _ID)),
        body=Body(HeartbeatBody, required=False),
    ),
    Operation(
        "DELETE",
        "/v1/registry/{service}/{id}",
        "Deregister an instance",
        "registry",
        (Reply(204, "gone", None), _err(404, "no such instance"), _STORE_DOWN),
        security="caller",
        params=(_path("service", _SERVICE), _path("id", _ID)),
    ),
    Operation(
        "POST",
        "/v1/telemetry",
        "A process's traffic report for the service graph",
        "telemetry",
        (Reply(204, "kept", None),),
        security="caller",
        body=Body(graph.Report),
    ),
    Operation(
        "POST",
        "/v1/ca/sign",
        "A certificate for a service, from a CSR",
        "security",
        (Reply(200, "signed", models.SignOut),),
        security="service",
        body=Body(SignBody),
        secure_only=True,
        description=f"The CSR is PEM (at most {MAX_CSR} bytes); only its public key is used.",
    ),
    Operation(
        "GET",
        "/v1/ca/bundle",
        "The roots to trust",
        "security",
        (Reply(200, "", models.BundleOut),),
        secure_only=True,
    ),
    Operation(
        "POST",
        "/v1/ca/rotate",
        "A new root (the old one stays trusted for `overlap` seconds)",
        "security",
        (Reply(200, "rotated", models.RotateOut), _err(409, "an operator's CA is not rotated here")),
        security="admin",
        body=Body(RotateBody, required=False),
        secure_only=True,
    ),
    Operation(
        "GET",
        "/v1/tokens",
        "Live join tokens, without their secrets",
        "security",
        (Reply(200, "", list[models.TokenInfo]),),
        security="admin",
        secure_only=True,
    ),
    Operation(
        "POST",
        "/v1/tokens",
        "A join token for a service",
        "security",
        (Reply(201, "created: the secret appears only here", models.TokenCreated),),
        security="admin",
        body=Body(TokenBody),
        secure_only=True,
    ),
    Operation(
        "DELETE",
        "/v1/tokens/{id}",
        "Revoke a join token",
        "security",
        (Reply(204, "revoked", None), _err(400, "not a token id"), _err(404, "no such token")),
        security="admin",
        params=(_path("id", {"type": "string", "pattern": "^[0-9a-f]{16}$"}),),
        secure_only=True,
    ),
)


# --------------------------------------------------------------------------------------------
# The document


_SCHEMES = {
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The admin token (`admin.token` in the data dir).",
    },
    "joinToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "A join token (`mjt_...`) bound to one service (`POST /v1/tokens`).",
    },
    "meshCertificate": {
        "type": "mutualTLS",
        "description": "A mesh certificate of the service, presented in the TLS handshake.",
    },
}


def _replies(op: Operation, security: bool) -> list[Reply]:
    """The operation's own answers, then the refusals it shares with others (from what it
    declares); an endpoint of the CA or the tokens only answers 404 with security off."""
    if op.secure_only and not security:
        return [_err(404, "security is off (start the control service with --secure)")]
    out = list(op.replies)
    if op.body is not None:
        out += [
            _err(400, "not JSON (or YAML), or a bad Content-Length"),
            _err(413, "body too large"),
            _err(415, "unsupported Content-Type"),
            _err(422, "the body fails validation (`problems` says where)"),
        ]
    if op.security == "admin" or (security and op.security in ("caller", "service")):
        out.append(_err(401, "no caller identity, or a wrong token"))
    if security and op.security in ("caller", "service"):
        out.append(_err(403, "an identity of another service"))
    if any(p.where == "path" for p in op.params):
        out.append(_err(404, "no such path"))
    return out


def _security(op: Operation, security: bool) -> list[dict[str, list[str]]] | None:
    if op.secure_only and not security:
        return None
    if op.security == "admin":
        return [{"adminToken": []}]
    if not security or op.security == "none":
        return [] if op.security != "none" else None
    if op.security == "service":  # signing: a live join token always, the certificate as well if any
        return [{"joinToken": []}, {"joinToken": [], "meshCertificate": []}]
    callers: list[dict[str, list[str]]] = [{"joinToken": []}, {"meshCertificate": []}]
    return callers + ([{"adminToken": []}] if op.security == "caller" else [])


def _operation_id(op: Operation) -> str:
    words = [w.strip("{}") for w in op.path.strip("/").replace(".", "_").split("/") if w and w != "v1"]
    return "_".join([op.method.lower(), *words]) if words else f"{op.method.lower()}_index"


@functools.cache
def document(security: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API (`security`: as served with `--secure`).

    Built once per mode; do not modify the result."""
    from meshlib import __version__

    # Every type's schema, in one pass so that models used by several routes are shared.
    inputs: list[tuple[tuple[str, int, str], Literal["validation", "serialization"], TypeAdapter[Any]]] = []
    for i, op in enumerate(OPERATIONS):
        if op.body is not None:
            inputs.append(((op.path, i, "body"), "validation", TypeAdapter(op.body.type)))
        for reply in _replies(op, security):
            if reply.type is not None and reply.type is not str:
                key = (op.path, i, f"{reply.status}")
                inputs.append((key, "serialization", TypeAdapter(reply.type)))
    schemas, defs = TypeAdapter.json_schemas(inputs, ref_template="#/components/schemas/{model}")

    paths: dict[str, dict[str, Any]] = {}
    for i, op in enumerate(OPERATIONS):
        item: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
        }
        if op.description:
            item["description"] = op.description
        if op.params:
            item["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.where == "path",
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                }
                for p in op.params
            ]
        if op.body is not None:
            body_schema = schemas[((op.path, i, "body"), "validation")]
            item["requestBody"] = {
                "required": op.body.required,
                "content": {media: {"schema": body_schema} for media in op.body.media},
            }
        responses: dict[str, Any] = {}
        for reply in _replies(op, security):
            status = str(reply.status)
            if status in responses:  # the route's own description wins over the shared one
                continue
            answer: dict[str, Any] = {"description": reply.description or "OK"}
            if reply.type is str:
                answer["content"] = {media: {"schema": {"type": "string"}} for media in reply.media}
            elif reply.type is not None:
                schema = schemas[((op.path, i, status), "serialization")]
                answer["content"] = {media: {"schema": schema} for media in reply.media}
            responses[status] = answer
        item["responses"] = dict(sorted(responses.items()))
        needs = _security(op, security)
        if needs is not None:
            item["security"] = needs
        paths.setdefault(op.path, {})[op.method.lower()] = item

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshlib control service",
            "version": __version__,
            "description": "The control service's HTTP API (docs/control-api.md)."
            + (" Served with security on (--secure)." if security else ""),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": _SCHEMES,
        },
    }


async def get_openapi(plane: ControlPlane, request: Request) -> Response:
    """`GET /openapi.json`: the document, for the mode the service runs in."""
    return JSONResponse(document(plane.ca is not None))
