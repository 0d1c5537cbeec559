"""The inbound sequence without a socket: `meshlib.inbound.Gate` on neutral requests, and the
rate-limit check on an event loop through the ASGI shell."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import meshlib
from meshlib import context
from meshlib.asgi import MeshMiddleware
from meshlib.balancing.orca import HEADER, parse_report
from meshlib.headers import SOURCE, TIMEOUT
from meshlib.inbound import Gate, Pending, Refusal, Request
from meshlib.rules import parse_documents
from meshlib.security import certificates
from meshlib.security.authorization import current_peer
from meshlib.telemetry.server import Inbound
from meshlib.wsgi import MeshMiddleware as WsgiMesh

LIMIT = [{"kind": "RateLimit", "service": "orders", "requests_per_second": 1, "burst": 1}]


class Recording:
    """A limiter that notes the thread asking it; `blocking` as a Redis-backed one says."""

    def __init__(self, blocking: bool) -> None:
        self.blocking = blocking
        self.threads: list[int] = []

    def try_acquire(self) -> float:
        self.threads.append(threading.get_ident())
        return 0.0 if len(self.threads) == 1 else 2.5


async def ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def verdict(middleware: MeshMiddleware) -> int | None:
    """None if the middleware let a request through to the app, else its 429's retry-after."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware({"type": "http", "method": "GET", "path": "/", "headers": []}, receive, send)
    if sent[0]["status"] == 200:
        return None
    assert sent[0]["status"] == 429
    return int(dict(sent[0]["headers"])[b"retry-after"])


def check_twice(blocking: bool) -> tuple[Recording, list[int | None], int]:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(LIMIT), "1")
        limiter = Recording(blocking)
        mesh.resilience.limiter = lambda doc: limiter  # type: ignore[method-assign]
        middleware = MeshMiddleware(ok, mesh=mesh)

        async def main() -> tuple[list[int | None], int]:
            return [await verdict(middleware), await verdict(middleware)], threading.get_ident()

        verdicts, loop_thread = asyncio.run(main())
        return limiter, verdicts, loop_thread


def test_a_blocking_limiter_is_asked_off_the_event_loop() -> None:
    limiter, verdicts, loop_thread = check_twice(blocking=True)
    assert verdicts == [None, 3]  # admitted, then refused with retry-after rounded up
    assert loop_thread not in limiter.threads


def test_a_local_limiter_is_asked_on_the_loop_itself() -> None:
    limiter, verdicts, loop_thread = check_twice(blocking=False)
    assert verdicts == [None, 3]
    assert limiter.threads == [loop_thread, loop_thread]  # no thread hop for a local bucket


# --------------------------------------------------------------------------------------------
# The neutral sequence


def request(
    path: str = "/orders/1",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    peer: str | None = None,
    secure: bool = False,
) -> Request:
    return Request(method, path, "http", peer, secure, headers or {}, [], None)


def test_an_admitted_request_runs_in_the_callers_context_until_finished() -> None:
    with meshlib.Mesh("orders") as mesh:
        admitted = request(headers={SOURCE: "checkout", TIMEOUT: "1500"})
        assert Gate(mesh).admit(admitted) is None
        ctx = context.current()
        assert ctx is not None
        assert (ctx.service, ctx.source, ctx.method, ctx.path) == ("orders", "checkout", "GET", "/orders/1")
        remaining = ctx.remaining()
        assert remaining is not None and 1.0 < remaining <= 1.5
        admitted.finish(503)
        assert context.current() is None
        assert mesh.stats.edge("in", "checkout").by_class == {"5xx": 1}


def test_a_refusal_is_counted_and_never_enters_the_app_context() -> None:
    docs = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(docs), "1")
        refusal = Gate(mesh).admit(request(headers={SOURCE: "checkout"}))
        assert isinstance(refusal, Refusal)
        assert refusal.status == 403
        assert refusal.reason == "RBAC: access denied: source checkout may not GET /orders/1"
        assert refusal.body == refusal.reason.encode()
        assert dict(refusal.headers)["content-length"] == str(len(refusal.body))
        assert dict(refusal.headers)["x-content-type-options"] == "nosniff"
        assert context.current() is None
        assert mesh.stats.counter("denied", "orders") == 1
        assert mesh.stats.edge("in", "checkout").by_class == {"4xx": 1}


def test_a_rules_update_applies_to_the_next_request() -> None:
    """The gate decides per rules snapshot what applies: a new snapshot is seen at once."""
    docs = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]
    with meshlib.Mesh("orders") as mesh:
        gate = Gate(mesh)
        first = request(headers={SOURCE: "checkout"})
        assert gate.admit(first) is None
        first.finish(200)
        mesh.apply_rules(parse_documents(docs), "1")
        assert isinstance(gate.admit(request(headers={SOURCE: "checkout"})), Refusal)
        mesh.apply_rules(parse_documents(LIMIT), "2")
        second = request(headers={SOURCE: "checkout"})
        assert gate.admit(second) is None
        second.finish(200)
        assert isinstance(gate.admit(request(headers={SOURCE: "checkout"})), Refusal)  # the limit now


def test_the_rate_limit_refuses_with_retry_after_once_authorized() -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(LIMIT), "1")
        gate = Gate(mesh)
        first = request()
        assert gate.admit(first) is None
        first.finish(200)
        second = gate.admit(request())
        assert isinstance(second, Refusal)
        assert (second.status, second.body) == (429, b"rate limited")
        assert dict(second.headers)["retry-after"] == "1"
        assert mesh.stats.counter("rate_limited", "orders") == 1
        assert mesh.stats.edge("in", "unknown").by_class == {"2xx": 1, "4xx": 1}


def test_a_blocking_limiter_is_left_to_the_shell_and_nothing_enters_before_its_answer() -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(LIMIT), "1")
        limiter = Recording(blocking=True)
        mesh.resilience.limiter = lambda doc: limiter  # type: ignore[method-assign]
        first = request(headers={SOURCE: "checkout"})
        pending = Gate(mesh).admit(first)
        assert isinstance(pending, Pending) and pending.limiter is limiter
        assert limiter.threads == [] and context.current() is None  # the gate did not ask
        assert first.limit(pending.limiter.try_acquire()) is None
        ctx = context.current()
        assert ctx is not None and ctx.source == "checkout"
        first.finish(200)
        second = request()
        pending = Gate(mesh).admit(second)
        assert isinstance(pending, Pending)
        assert second.limit(pending.limiter.try_acquire()) == (
            429,
            "rate limited",
            b"rate limited",
            (("content-type", "text/plain"), ("content-length", "12"), ("retry-after", "3")),
        )
        assert context.current() is None


def test_a_verified_peer_names_the_caller_and_a_header_never_does_over_tls() -> None:
    billing = certificates.spiffe_id(certificates.DEFAULT_TRUST_DOMAIN, "billing")
    with meshlib.Mesh("orders") as mesh:
        gate = Gate(mesh)
        by_certificate = request(headers={SOURCE: "checkout"}, peer=billing, secure=True)
        assert gate.admit(by_certificate) is None
        ctx = context.current()
        assert ctx is not None and ctx.source == "billing" and current_peer() == billing
        by_certificate.finish(200)
        assert current_peer() is None
        over_tls = request(headers={SOURCE: "checkout"}, secure=True)
        assert gate.admit(over_tls) is None and over_tls.source is None
        over_tls.finish(200)
        plaintext = request(headers={SOURCE: "checkout"})
        assert gate.admit(plaintext) is None and plaintext.source == "checkout"
        plaintext.finish(200)


def test_a_grpc_shaped_request_goes_through_the_same_sequence() -> None:
    """What a gRPC interceptor would fill in: POST, the full method name, metadata as headers."""
    docs = [
        {
            "kind": "Authorization",
            "service": "orders",
            "allow": [{"from": ["checkout"], "methods": ["POST"], "paths": ["/orders.v1.Orders/*"]}],
        }
    ]
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(docs), "1")
        gate = Gate(mesh)
        allowed = request("/orders.v1.Orders/Get", "POST", {SOURCE: "checkout"})
        assert gate.admit(allowed) is None
        allowed.finish(200)
        denied = gate.admit(request("/admin.v1.Admin/Drop", "POST", {SOURCE: "checkout"}))
        assert isinstance(denied, Refusal) and denied.status == 403


def test_a_finished_request_leaves_no_cycle_for_the_garbage_collector() -> None:
    """The request and its telemetry are freed by reference counting as soon as it is done:
    a cycle would keep every request (and its headers) until a GC pass, and cost a pass."""
    with meshlib.Mesh("orders", tracing=False, metrics_path="/metrics") as mesh:
        gate = Gate(mesh)
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                admitted = request(headers={SOURCE: "checkout"})
                assert gate.admit(admitted) is None and admitted.observed is not None
                admitted.finish(200)
            del admitted
            # only requests and their telemetry count: the rest of a test run makes garbage too
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            assert [o for o in gc.garbage if type(o) in (Request, Inbound)] == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()


# --------------------------------------------------------------------------------------------
# The shells translate the same answer


DENY = [{"kind": "Authorization", "service": "orders", "allow": [{"from": ["billing"]}]}]


def asgi_answer(mesh: meshlib.Mesh, path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": [(b"x-mesh-source", b"checkout")]}
    asyncio.run(MeshMiddleware(ok, mesh=mesh)(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, sent[1]["body"]


def wsgi_answer(mesh: meshlib.Mesh, script_name: str, path_info: str) -> tuple[int, dict[str, str], bytes]:
    started: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        ctx = context.current()
        start_response("200 OK", [])
        return [ctx.path.encode() if ctx is not None else b"no context"]

    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path_info,
        "wsgi.url_scheme": "http",
        "HTTP_X_MESH_SOURCE": "checkout",
    }
    body = WsgiMesh(app, mesh=mesh)(
        environ, lambda status, headers, exc_info=None: started.append((status, headers))
    )
    try:
        content = b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()
    status, headers = started[0]
    return int(status.split()[0]), {k.lower(): v for k, v in headers}, content


def test_the_asgi_and_wsgi_shells_send_the_same_refusal() -> None:
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents(DENY), "1")
        asgi = asgi_answer(mesh, "/orders/1")
        wsgi = wsgi_answer(mesh, "", "/orders/1")
        assert asgi == wsgi
        assert asgi[0] == 403 and asgi[2] == b"RBAC: access denied: source checkout may not GET /orders/1"
        assert mesh.stats.counter("denied", "orders") == 2


def test_the_wsgi_context_path_is_the_path_rules_match() -> None:
    """Mount point included, as the ASGI scope's `path` is: one meaning on both shells."""
    with meshlib.Mesh("orders") as mesh:
        assert wsgi_answer(mesh, "/api", "/orders/1") == (200, {}, b"/api/orders/1")


def test_a_token_whose_keys_are_being_fetched_waits_and_enters_only_in_then() -> None:
    from meshlib.security import jwks as jwks_module
    from meshlib.security.jwks import JwksSource
    from meshlib.security.users import current_user
    from meshlib.telemetry.tracing import WSGI_HEADERS
    from tests.security.issuer import jwks, request_authentication, rsa_key, token

    key = rsa_key("k1")
    release = threading.Event()

    def slow(uri: str) -> tuple[bytes, str | None]:  # the issuer's answer, once the test says so
        release.wait(5.0)
        import json

        return json.dumps(jwks(key)).encode(), None

    source = JwksSource("https://auth.example.com/jwks", fetch=slow)
    jwks_module._sources[source.uri] = source  # the process's source for the URL: this one
    source.start()
    allow = {"kind": "Authorization", "service": "orders", "allow": [{"from_users": ["*"]}]}
    with meshlib.Mesh("orders") as mesh:
        mesh.apply_rules(parse_documents([request_authentication(jwks_uri=source.uri), allow]), "1")
        environ = {"HTTP_AUTHORIZATION": f"Bearer {token(key)}"}
        waiting = Request("GET", "/orders/1", "http", None, False, {}, environ, WSGI_HEADERS)
        pending = Gate(mesh).admit(waiting)
        assert isinstance(pending, Pending) and pending.limiter is None
        assert context.current() is None and current_user() is None
        worker = threading.Thread(target=pending.wait)
        worker.start()
        release.set()
        worker.join(5.0)
        assert context.current() is None  # the wait changed no context
        assert pending.then() is None  # verified, authorized, entered: here, not in the worker
        user = current_user()
        assert user is not None and user.principal == "https://auth.example.com/alice"
        waiting.finish(200)
        assert current_user() is None


WEIGHED = [{"kind": "Destination", "service": "orders", "load_balancer": "weighted_round_robin"}]


def test_load_reports_are_on_while_the_services_destination_weighs_by_them() -> None:
    """Unset, `load_reports` follows the rules: the servers of a weighted_round_robin service
    report, on both shells; others send nothing and count nothing."""
    with meshlib.Mesh("orders") as mesh:
        assert HEADER not in asgi_answer(mesh, "/")[1]
        assert HEADER not in wsgi_answer(mesh, "", "/")[1]
        assert not mesh.load.tracking
        mesh.apply_rules(parse_documents(WEIGHED), "2")
        mesh.load.set_application_utilization(0.5)
        for headers in (asgi_answer(mesh, "/")[1], wsgi_answer(mesh, "", "/")[1]):
            report = parse_report(headers[HEADER])
            assert report is not None and report.application_utilization == 0.5
            assert report.named_metrics["rif"] == 1.0  # the request itself, still in flight
        assert mesh.load.in_flight == 0  # both ended
        assert mesh.load.latency() is not None
        mesh.apply_rules(parse_documents([]), "3")
        assert HEADER not in asgi_answer(mesh, "/")[1]


def test_load_reports_as_configured_whatever_the_rules() -> None:
    with meshlib.Mesh("orders", load_reports=False) as mesh:
        mesh.apply_rules(parse_documents(WEIGHED), "2")
        assert HEADER not in asgi_answer(mesh, "/")[1]
    with meshlib.Mesh("orders", load_reports=True) as mesh:
        assert HEADER in wsgi_answer(mesh, "", "/")[1]
