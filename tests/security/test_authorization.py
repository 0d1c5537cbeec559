"""Authorization without sockets: the compiled matcher, caller identity, and the middleware
called directly with hand-built ASGI scopes (TLS ones included) and WSGI environs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import meshlib
from meshlib import context
from meshlib.asgi import MeshMiddleware as AsgiMesh
from meshlib.rules import AuthorizationDoc, RulesError, parse_documents, validate_document
from meshlib.security import certificates
from meshlib.security.authorization import (
    Authorizer,
    Policy,
    asgi_caller,
    current_peer,
    policy_for,
    wsgi_caller,
)
from meshlib.security.peer import PEER_EXTENSION
from meshlib.wsgi import MeshMiddleware as WsgiMesh


def authz(*allow: dict[str, Any], service: str = "orders") -> AuthorizationDoc:
    doc = validate_document({"kind": "Authorization", "service": service, "allow": list(allow)})
    assert isinstance(doc, AuthorizationDoc)
    return doc


def policy(*allow: dict[str, Any]) -> Policy:
    return Policy(authz(*allow))


def mesh_with(*docs: dict[str, Any], service: str = "orders") -> meshlib.Mesh:
    mesh = meshlib.Mesh(service)
    mesh.apply_rules(parse_documents(docs), "1")
    return mesh


# --------------------------------------------------------------------------------------------
# The matcher


def test_empty_allow_list_denies_everything() -> None:
    p = policy()
    assert not p.allows("checkout", "GET", "/")
    assert not p.allows(None, "GET", "/")
    assert p.denial("checkout", "GET", "/") == "RBAC: access denied: source checkout may not GET /"


def test_empty_rule_allows_everything_including_anonymous() -> None:
    p = policy({})
    assert p.allows("checkout", "DELETE", "/anything/at/all")
    assert p.allows(None, "GET", "/")
    assert p.denial(None, "GET", "/") is None


def test_from_names_services_and_star_needs_an_identity() -> None:
    named = policy({"from": ["checkout", "billing"]})
    assert named.allows("checkout", "GET", "/x") and named.allows("billing", "GET", "/x")
    assert not named.allows("orders", "GET", "/x")
    assert not named.allows(None, "GET", "/x")
    star = policy({"from": "*"})
    assert star.allows("anyone", "GET", "/x")
    assert not star.allows(None, "GET", "/x")
    assert star.denial(None, "PUT", "/x") == "RBAC: access denied: a caller without identity may not PUT /x"
    anyone = policy({"from": []})  # an empty list is the same as no `from`
    assert anyone.allows(None, "GET", "/x")


def test_methods_are_case_insensitive_on_both_sides() -> None:
    p = policy({"methods": ["get", "Post"]})
    assert p.allows("a", "GET", "/") and p.allows("a", "get", "/") and p.allows("a", "POST", "/")
    assert not p.allows("a", "DELETE", "/")
    assert not p.allows("a", "HEAD", "/")  # HEAD is its own method, as in Istio
    assert p.denial("a", "delete", "/o") == "RBAC: access denied: source a may not DELETE /o"


@pytest.mark.parametrize(
    ("pattern", "allowed", "denied"),
    [
        ("/orders", ["/orders"], ["/orders/", "/orders/1", "/order", "/ORDERS"]),
        ("/orders/*", ["/orders/", "/orders/1", "/orders/1/items"], ["/orders", "/ordersx", "/x/orders/1"]),
        ("/orders*", ["/orders", "/orders/1", "/ordersx"], ["/order", "/x/orders"]),
        ("*/status", ["/status", "/a/b/status"], ["/status/", "/statusx", "/a/stat"]),
        ("*.json", ["/a.json", "/x/y/z.json"], ["/a.jsonx", "/json"]),
        ("*", ["/", "/anything", "/a/b/c"], []),
        ("/orders/*/items", ["/orders/1/items", "/orders/a/b/items"], ["/orders/1", "/orders/1/items/2"]),
        ("/a.b/*", ["/a.b/c"], ["/aXb/c"]),  # regex characters are literal
        ("/a+*/x*", ["/a+1/x", "/a+/xyz"], ["/aa/x", "/a+1/y"]),
    ],
)
def test_path_patterns(pattern: str, allowed: list[str], denied: list[str]) -> None:
    p = policy({"paths": [pattern]})
    for path in allowed:
        assert p.allows("a", "GET", path), path
    for path in denied:
        assert not p.allows("a", "GET", path), path


def test_several_patterns_in_one_rule_any_matches() -> None:
    p = policy({"paths": ["/health", "/api/*", "*.css", "/v*/x/*"]})
    assert all(p.allows(None, "GET", x) for x in ("/health", "/api/1", "/s/site.css", "/v2/x/1"))
    assert not any(p.allows(None, "GET", x) for x in ("/healthz", "/apix", "/site.js", "/v2/y/1"))


def test_fields_of_a_rule_must_all_match_and_rules_are_alternatives() -> None:
    p = policy(
        {"from": "checkout", "methods": "GET", "paths": "/orders/*"},
        {"from": "admin"},
        {"paths": "/health"},
    )
    assert p.allows("checkout", "GET", "/orders/1")
    assert not p.allows("checkout", "POST", "/orders/1")  # method
    assert not p.allows("checkout", "GET", "/payments/1")  # path
    assert not p.allows("billing", "GET", "/orders/1")  # source
    assert p.allows("admin", "DELETE", "/anything")
    assert p.allows(None, "GET", "/health") and p.allows("billing", "POST", "/health")
    assert not p.allows(None, "GET", "/orders/1")


def test_dot_segments_cannot_step_out_of_or_into_an_allowed_prefix() -> None:
    p = policy({"paths": ["/public/*"]})
    assert p.allows(None, "GET", "/public/a/../b")  # stays inside under every reading
    assert not p.allows(None, "GET", "/public/../admin")
    assert not p.allows(None, "GET", "/public//../admin")  # an app merging slashes lands in /admin
    admin = policy({"paths": ["/admin"]})
    assert not admin.allows(None, "GET", "/public/../admin")  # raw path routes elsewhere
    assert admin.allows(None, "GET", "/admin")


def test_long_paths_are_cut_in_the_reason() -> None:
    reason = policy().denial("a", "GET", "/" + "x" * 1000)
    assert reason is not None and len(reason) < 300 and reason.endswith("...")


def test_path_patterns_validate_with_suffixes() -> None:
    assert authz({"paths": ["*.json", "*/status", "/a/*"]}).allow[0].paths == ("*.json", "*/status", "/a/*")
    with pytest.raises(RulesError) as exc:
        authz({"paths": ["orders"]})
    assert "must start with '/', or with '*'" in str(exc.value)


# --------------------------------------------------------------------------------------------
# Compiling once, following the live snapshot


def test_policy_is_cached_by_document_identity() -> None:
    doc = authz({"from": "checkout"})
    assert policy_for(doc) is policy_for(doc)
    equal_but_new = authz({"from": "checkout"})
    assert policy_for(equal_but_new) is not policy_for(doc)
    assert policy_for(equal_but_new).doc is equal_but_new


def test_authorizer_without_a_document_allows_all_and_follows_updates() -> None:
    mesh = mesh_with({"kind": "Authorization", "service": "billing"})  # someone else's document
    checker = Authorizer(mesh)
    assert checker.denial(None, "POST", "/x") is None
    mesh.apply_rules(
        parse_documents([{"kind": "Authorization", "service": "orders", "allow": [{"from": "checkout"}]}]),
        "2",
    )
    assert checker.denial("checkout", "POST", "/x") is None
    assert checker.denial("billing", "POST", "/x") == "RBAC: access denied: source billing may not POST /x"
    assert mesh.stats.counter("denied", "orders") == 1
    mesh.apply_rules(
        parse_documents([{"kind": "Authorization", "service": "orders", "allow": [{"from": "billing"}]}]),
        "3",
    )
    assert checker.denial("billing", "POST", "/x") is None
    assert checker.denial("checkout", "POST", "/x") is not None
    mesh.apply_rules(parse_documents([]), "4")  # document removed: allow all again
    assert checker.denial("anyone", "POST", "/x") is None
    assert mesh.stats.counter("denied", "orders") == 2
    mesh.close()


def test_a_mesh_without_a_service_name_enforces_nothing() -> None:
    mesh = meshlib.Mesh()
    mesh.apply_rules(parse_documents([{"kind": "Authorization", "service": "orders"}]), "1")
    assert Authorizer(mesh).denial(None, "GET", "/") is None
    mesh.close()


# --------------------------------------------------------------------------------------------
# Who is calling


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return certificates.create_ca(certificates.DEFAULT_TRUST_DOMAIN)


def leaf(ca: tuple[bytes, bytes], spiffe: str) -> str:
    key = certificates.generate_key()
    return certificates.issue(
        ca[0], ca[1], certificates.make_csr(key, "x"), spiffe_id=spiffe, lifetime=timedelta(hours=1)
    ).decode()


def svc(name: str, domain: str = certificates.DEFAULT_TRUST_DOMAIN) -> str:
    return certificates.spiffe_id(domain, name)


def tls_ext(spiffe: str | None) -> dict[str, Any]:
    """The scope extensions of a request on an mTLS connection, as `uvicorn_tls` sets them:
    the ASGI TLS extension, plus the verified peer when the client sent a SPIFFE certificate."""
    ext: dict[str, Any] = {
        "tls": {
            "server_cert": None,
            "client_cert_chain": [],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": 0x0304,
            "cipher_suite": None,
        }
    }
    if spiffe is not None:
        domain = certificates.DEFAULT_TRUST_DOMAIN
        ext[PEER_EXTENSION] = {"spiffe_id": spiffe, "service": certificates.service_of(spiffe, domain)}
    return ext


def http_scope(
    path: str = "/orders/1",
    method: str = "GET",
    source: str | None = None,
    tls: dict[str, Any] | None = None,
    kind: str = "http",
) -> dict[str, Any]:
    headers = [(b"host", b"orders")]
    if source is not None:
        headers.append((b"x-mesh-source", source.encode()))
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": ("https" if tls is not None else "http").replace(
            "http", "ws" if kind == "websocket" else "http"
        ),
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8443),
        "extensions": dict(tls) if tls is not None else {},
    }
    if kind == "http":
        scope["method"] = method
    return scope


def test_plaintext_caller_is_the_header() -> None:
    mesh = meshlib.Mesh("orders")
    assert asgi_caller(http_scope(source="checkout"), "checkout", mesh) == (None, "checkout")
    assert asgi_caller(http_scope(), None, mesh) == (None, None)
    assert asgi_caller(http_scope(), "", mesh) == (None, None)
    mesh.close()


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
def test_with_mtls_on_a_plaintext_header_names_nobody(mode: str) -> None:
    mesh = meshlib.Mesh("orders")
    mesh.mtls = mode  # as Mesh(mtls=..., credentials=...) sets it
    assert asgi_caller(http_scope(source="checkout"), "checkout", mesh) == (None, None)
    assert wsgi_caller({"wsgi.url_scheme": "http", "HTTP_X_MESH_SOURCE": "checkout"}, mesh) == (None, None)
    # a certificate still names its service
    assert asgi_caller(http_scope(tls=tls_ext(svc("billing"))), "checkout", mesh) == (
        svc("billing"),
        "billing",
    )
    mesh.mtls = "DISABLE"
    assert asgi_caller(http_scope(source="checkout"), "checkout", mesh) == (None, "checkout")
    mesh.close()


def test_the_trust_domain_is_the_meshs() -> None:
    mesh = meshlib.Mesh("orders", trust_domain="prod.example")
    ours, default = svc("billing", domain="prod.example"), svc("billing")
    assert asgi_caller(http_scope(tls=tls_ext(ours)), None, mesh) == (ours, "billing")
    assert asgi_caller(http_scope(tls=tls_ext(default)), None, mesh) == (default, None)
    mesh.close()


def test_tls_caller_is_the_certificate_and_never_the_header() -> None:
    mesh = meshlib.Mesh("orders")
    scope = http_scope(source="checkout", tls=tls_ext(svc("billing")))
    assert asgi_caller(scope, "checkout", mesh) == (svc("billing"), "billing")
    # TLS without a client certificate: no identity, and the header is ignored
    assert asgi_caller(http_scope(tls=tls_ext(None)), "checkout", mesh) == (None, None)
    # https without any extension (a server that passes nothing on): same
    bare = http_scope()
    bare["scheme"] = "https"
    assert asgi_caller(bare, "checkout", mesh) == (None, None)
    # an identity of another trust domain names no service of this mesh
    foreign = svc("checkout", domain="elsewhere.example")
    assert asgi_caller(http_scope(tls=tls_ext(foreign)), "checkout", mesh) == (foreign, None)
    mesh.close()


def test_wsgi_caller(ca) -> None:
    mesh = meshlib.Mesh("orders")
    plain = {"wsgi.url_scheme": "http", "HTTP_X_MESH_SOURCE": "checkout"}
    assert wsgi_caller(plain, mesh) == (None, "checkout")
    assert wsgi_caller({"wsgi.url_scheme": "http"}, mesh) == (None, None)
    assert wsgi_caller({"wsgi.url_scheme": "https", "HTTP_X_MESH_SOURCE": "checkout"}, mesh) == (None, None)
    cert = leaf(ca, svc("billing"))
    secure = {"wsgi.url_scheme": "https", "HTTP_X_MESH_SOURCE": "checkout", "SSL_CLIENT_CERT": cert}
    assert wsgi_caller(secure, mesh) == (svc("billing"), "billing")
    adapted = {"wsgi.url_scheme": "https", "HTTP_X_MESH_SOURCE": "checkout", "meshlib.peer": svc("billing")}
    assert wsgi_caller(adapted, mesh) == (svc("billing"), "billing")
    mesh.close()


# --------------------------------------------------------------------------------------------
# The ASGI middleware, called directly


class Recorder:
    """An ASGI app noting what the mesh told it; answers 200."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        ctx = context.current()
        self.calls.append(
            {
                "source": ctx.source if ctx else None,
                "peer": current_peer(),
                "scope_peer": scope.get("meshlib.peer", "missing"),
            }
        )
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, scope: dict[str, Any]) -> tuple[int | None, bytes, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "websocket.connect"} if scope["type"] == "websocket" else {"type": "http.request"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next((m["status"] for m in sent if m["type"].endswith("http.response.start")), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"].endswith("http.response.body"))
    return status, body, sent


ORDERS_ONLY = {"kind": "Authorization", "service": "orders", "allow": [{"from": "orders", "methods": "GET"}]}


async def test_header_cannot_override_the_certificate() -> None:
    mesh = mesh_with(ORDERS_ONLY)
    app = Recorder()
    mw = AsgiMesh(app, mesh=mesh)
    as_orders = tls_ext(svc("orders"))
    as_checkout = tls_ext(svc("checkout"))

    # the certificate says orders, the header says checkout: judged, and seen by the app, as orders
    status, _, _ = await call(mw, http_scope(source="checkout", tls=as_orders))
    assert status == 200
    assert app.calls[-1] == {"source": "orders", "peer": svc("orders"), "scope_peer": svc("orders")}

    # the certificate says checkout, the header claims orders: denied as checkout
    status, body, sent = await call(mw, http_scope(source="orders", tls=as_checkout))
    assert status == 403
    assert body == b"RBAC: access denied: source checkout may not GET /orders/1"
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/plain")
    assert len(app.calls) == 1  # the app never ran

    # TLS without a certificate: the header grants nothing
    status, body, _ = await call(mw, http_scope(source="orders", tls=tls_ext(None)))
    assert status == 403 and b"a caller without identity" in body

    # plaintext in a mesh without mTLS: the header is all there is
    status, _, _ = await call(mw, http_scope(source="orders"))
    assert status == 200 and app.calls[-1] == {"source": "orders", "peer": None, "scope_peer": None}
    # plaintext in a PERMISSIVE mesh: the header grants nothing either
    mesh.mtls = "PERMISSIVE"
    status, body, _ = await call(mw, http_scope(source="orders"))
    assert status == 403 and b"a caller without identity" in body
    assert mesh.stats.counter("denied", "orders") == 3
    assert mesh.stats.edge("in", "checkout").by_class == {"4xx": 1}
    assert current_peer() is None  # nothing leaks out of the request
    mesh.close()


async def test_no_document_means_no_check_but_identity_still_reaches_the_app() -> None:
    mesh = meshlib.Mesh("orders")
    app = Recorder()
    mw = AsgiMesh(app, mesh=mesh)
    status, _, _ = await call(mw, http_scope(source="checkout", tls=tls_ext(svc("billing"))))
    assert status == 200
    assert app.calls[-1] == {"source": "billing", "peer": svc("billing"), "scope_peer": svc("billing")}
    assert mesh.stats.counter("denied", "orders") == 0
    mesh.close()


async def test_authorization_runs_before_the_rate_limit() -> None:
    mesh = mesh_with(
        ORDERS_ONLY, {"kind": "RateLimit", "service": "orders", "requests_per_second": 0.001, "burst": 1}
    )
    mw = AsgiMesh(Recorder(), mesh=mesh)
    for _ in range(5):  # refused callers do not spend the bucket's one token
        assert (await call(mw, http_scope(source="checkout")))[0] == 403
    assert (await call(mw, http_scope(source="orders")))[0] == 200
    assert (await call(mw, http_scope(source="orders")))[0] == 429
    mesh.close()


async def test_websocket_handshake_is_authorized() -> None:
    mesh = mesh_with(ORDERS_ONLY)
    app = Recorder()
    mw = AsgiMesh(app, mesh=mesh)
    denied = http_scope(source="checkout", kind="websocket")
    status, body, sent = await call(mw, denied)
    assert [m["type"] for m in sent] == ["websocket.close"]  # closed before accept: the server says 403
    assert status is None and app.calls == []
    denied = http_scope(source="checkout", kind="websocket")
    denied["extensions"]["websocket.http.response"] = {}
    status, body, _ = await call(mw, denied)
    assert status == 403 and body == b"RBAC: access denied: source checkout may not GET /orders/1"
    _, _, sent = await call(mw, http_scope(source="orders", kind="websocket"))
    assert [m["type"] for m in sent] == ["websocket.accept"]
    assert app.calls == [{"source": "orders", "peer": None, "scope_peer": None}]  # the caller, as over HTTP
    _, _, sent = await call(mw, http_scope(kind="websocket", tls=tls_ext(svc("orders"))))
    assert [m["type"] for m in sent] == ["websocket.accept"]
    assert app.calls[-1]["peer"] == svc("orders")
    assert mesh.stats.counter("denied", "orders") == 2
    mesh.close()


# --------------------------------------------------------------------------------------------
# The WSGI middleware, called directly


def wsgi_call(app: Any, environ: dict[str, Any]) -> tuple[str, bytes]:
    got: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got.append(status)

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return got[0], data


def environ_for(path: str, method: str = "GET", **extra: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "wsgi.url_scheme": "http",
        **extra,
    }


def test_wsgi_middleware_enforces_and_exposes_the_peer(ca) -> None:
    mesh = mesh_with(
        {
            "kind": "Authorization",
            "service": "orders",
            "allow": [{"from": "orders", "paths": ["/api/*", "/caf\u00e9"]}],
        }
    )
    seen: list[tuple[str | None, str | None, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ctx = context.current()
        seen.append((ctx.source if ctx else None, current_peer(), environ["meshlib.peer"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    mw = WsgiMesh(app, mesh=mesh)
    assert wsgi_call(mw, environ_for("/api/1", HTTP_X_MESH_SOURCE="orders")) == ("200 OK", b"ok")
    status, body = wsgi_call(mw, environ_for("/api/1", "POST", HTTP_X_MESH_SOURCE="checkout"))
    assert (status, body) == ("403 Forbidden", b"RBAC: access denied: source checkout may not POST /api/1")
    # the mount point is part of the path the rules see
    assert wsgi_call(mw, environ_for("/1", SCRIPT_NAME="/api", HTTP_X_MESH_SOURCE="orders"))[0] == "200 OK"
    assert wsgi_call(mw, environ_for("/1", SCRIPT_NAME="/other", HTTP_X_MESH_SOURCE="orders"))[0] == (
        "403 Forbidden"
    )
    # PEP 3333 paths are latin-1 characters of the UTF-8 bytes
    raw = "/caf\u00e9".encode().decode("latin-1")
    assert wsgi_call(mw, environ_for(raw, HTTP_X_MESH_SOURCE="orders"))[0] == "200 OK"
    # under TLS the certificate decides
    cert = leaf(ca, svc("checkout"))
    tls = {"wsgi.url_scheme": "https", "SSL_CLIENT_CERT": cert, "HTTP_X_MESH_SOURCE": "orders"}
    status, body = wsgi_call(mw, environ_for("/api/1", **tls))
    assert (status, body) == ("403 Forbidden", b"RBAC: access denied: source checkout may not GET /api/1")
    ok = {"wsgi.url_scheme": "https", "SSL_CLIENT_CERT": leaf(ca, svc("orders"))}
    assert wsgi_call(mw, environ_for("/api/2", **ok))[0] == "200 OK"
    assert seen[-1] == ("orders", svc("orders"), svc("orders"))
    assert seen[0] == ("orders", None, None)
    assert mesh.stats.counter("denied", "orders") == 3
    assert current_peer() is None
    mesh.close()
