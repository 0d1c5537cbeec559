"""Requests through a real gateway to real backends: routing, the target's own Route, headers,
deadline and trace carried inward, and the gateway's own answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

import meshlib
from meshlib.listening import bind
from tests.conftest import wait_until, write_rules
from tests.gateway.conftest import SHOP, Edge, ask, connection

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
N = 400  # v2's share of 400 draws at 20%: sd 2 points; 12..28% is 4 sd either side


def test_httpx_through_the_gateway_takes_the_services_own_split_and_header_route(edge: Edge) -> None:
    with httpx.Client(base_url=edge.url(), headers={"host": SHOP}, timeout=10.0) as client:
        names = Counter(client.get("/orders/1").json()["name"] for _ in range(N))
        canary = Counter(
            client.get("/orders/1", headers={"x-canary": "true"}).json()["name"] for _ in range(50)
        )
    assert set(names) == {"v1", "v2"}
    assert 0.12 <= names["v2"] / N <= 0.28, names
    assert canary == {"v2": 50}


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_through_the_gateway(edge: Edge) -> None:
    def names(*headers: str) -> Counter[str]:
        url = edge.url() + "/orders/1"
        args = ["curl", "-sS", "--max-time", "20", "-H", f"Host: {SHOP}"]
        for h in headers:
            args += ["-H", h]
        out = subprocess.run([*args, *([url] * 200)], capture_output=True, text=True, timeout=30, check=True)
        decoder, text, pos, seen = json.JSONDecoder(), out.stdout, 0, Counter[str]()
        while pos < len(text):
            answer, pos = decoder.raw_decode(text, pos)
            seen[answer["name"]] += 1
        return seen

    split = names()
    assert sum(split.values()) == 200 and 0.08 <= split["v2"] / 200 <= 0.32, (
        split
    )  # 200 draws: sd 2.8 points, 4 sd
    assert names("x-canary: true") == {"v2": 200}


def test_hosts_paths_and_rewrites(edge: Edge) -> None:
    r = edge.get("/api/orders/7", host="shop.example.org:8080")  # *.example.org, the port aside
    assert r.status_code == 200 and r.json()["path"] == "/orders/7"
    r = edge.get("/orders/1?a=1&b=%20", host="SHOP.example.com")
    assert r.status_code == 200 and r.json()["path"] == "/orders/1"
    assert edge.v1.seen[-1:] or edge.v2.seen[-1:]


def test_dot_segments_are_resolved_before_the_route_is_matched(edge: Edge) -> None:
    """The route matches the path the backend gets: `..` cannot step out of a route's prefix
    (httpx would resolve these itself: sent as written, over a plain connection)."""
    conn = connection(edge.gateway.addresses[8080])

    def path_seen(path: str, host: str = SHOP) -> tuple[int, str | None]:
        before = len(edge.v1.seen) + len(edge.v2.seen)
        status, body = ask(conn, path, host)
        after = edge.v1.seen + edge.v2.seen
        return status, (json.loads(body)["path"] if len(after) > before else None)

    org = "api.example.org"  # `/api/` rewritten to `/`
    assert path_seen("/api/orders/7", org) == (200, "/orders/7")
    assert path_seen("/api/../admin", org) == (404, None)  # `/admin`: no route
    assert path_seen("/api/x/%2e%2E/orders/8", org) == (200, "/orders/8")
    assert path_seen("/api/./orders/./9", org) == (200, "/orders/9")
    assert path_seen("/orders/../orders/2") == (200, "/orders/2")
    assert path_seen("/orders/1/..") == (200, "/orders/")
    status, body = ask(conn, "/api/..%2fadmin", org)  # a dot-segment only once decoded
    assert (status, body) == (400, b"a dot-segment in an encoded path\n")
    assert path_seen("/orders/a.b/%2e%2e.json") == (200, "/orders/a.b/...json")  # not dot-segments


def test_a_rewrite_and_a_redirect_keep_the_rest_of_the_path_as_sent(edge: Edge) -> None:
    """The prefix read off the path as sent is replaced, even written encoded (`/%61pi/` is
    `/api/`); what follows keeps its encoding (an encoded `/` stays one)."""
    conn = connection(edge.gateway.addresses[8080])
    org = "api.example.org"  # `/api/` rewritten to `/`
    for sent, raw in [("/api/files/a%2Fb", "/files/a%2Fb"), ("/%61pi/files/a%2Fb", "/files/a%2Fb")]:
        status, body = ask(conn, sent, org)
        assert (status, json.loads(body)["raw_path"]) == (200, raw), sent

    def add(docs: list[dict]) -> None:
        redirect = {"match": {"hosts": [SHOP], "path": {"prefix": "/old/"}}, "redirect": {"prefix": "/new/"}}
        docs[-1]["routes"].insert(0, redirect)

    edge.change(add, lambda rules: rules.route("edge").routes[0].redirect is not None, "the redirect rule")
    for sent in ("/old/a%2Fb", "/%6Fld/a%2Fb"):
        conn.request("GET", sent, headers={"Host": SHOP})
        response = conn.getresponse()
        response.read()
        assert response.status == 301 and response.getheader("location").endswith("/new/a%2Fb"), sent


def test_no_route_is_a_404_and_no_endpoint_a_503(edge: Edge) -> None:
    r = edge.get("/cart")
    assert r.status_code == 404 and "no route for shop.example.com/cart" in r.text
    r = edge.get("/orders/1", host="other.example.net")
    assert r.status_code == 404
    r = edge.get("/empty/1")
    assert r.status_code == 503 and r.text == "empty: no endpoint available\n"


def test_a_target_the_mesh_does_not_know_is_a_503_never_a_dns_lookup(edge: Edge) -> None:
    def unknown(docs: list[dict]) -> None:
        route = next(d for d in docs if d["kind"] == "Route" and d["service"] == "edge")
        route["routes"][1]["to"] = [{"service": "payments.example.com"}]

    edge.change(
        unknown, lambda rules: rules.route("edge").routes[1].to[0].service != "empty", "unknown target"
    )
    r = edge.get("/empty/1")
    assert r.status_code == 503 and r.text == "payments.example.com: no endpoint available\n"


def test_deadline_and_trace_are_carried_inward(edge: Edge) -> None:
    r = edge.get("/orders/1", headers={"traceparent": TRACEPARENT})
    seen = r.json()["headers"]
    assert 4000 <= int(seen["x-mesh-timeout"]) <= 5000  # the route's 5s, less the time spent
    assert seen["traceparent"].split("-")[1] == TRACE_ID
    # a caller's own shorter deadline wins over the route's
    r = edge.get("/orders/1", headers={"x-mesh-timeout": "1500"})
    assert 1000 <= int(r.json()["headers"]["x-mesh-timeout"]) <= 1500
    # a route without a timeout: no deadline unless the caller gives one
    r = edge.get("/api/orders/1", host="a.example.org")
    assert "x-mesh-timeout" not in r.json()["headers"]


def test_hop_by_hop_headers_dropped_and_forwarded_for_set(edge: Edge) -> None:
    headers = {
        "connection": "keep-alive, x-secret",
        "x-secret": "1",
        "keep-alive": "timeout=5",
        "te": "trailers",
        "proxy-authorization": "Basic eDp5",
        "x-forwarded-for": "6.6.6.6",
        "x-forwarded-host": "evil.example",
        "x-mesh-source": "payments",
        "x-kept": "yes",
    }
    seen = edge.get("/orders/1", headers=headers).json()["headers"]
    for name in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's claim is not believed
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == SHOP
    assert seen["x-mesh-source"] == "edge"  # the gateway's own name, never the caller's claim
    assert seen["host"] == "orders"


def test_trusted_hops_keep_the_proxies_entries(edge: Edge) -> None:
    def trust(docs: list[dict]) -> None:
        next(d for d in docs if d["kind"] == "Gateway")["trusted_hops"] = 1

    edge.change(trust, lambda rules: rules.gateway("edge").trusted_hops == 1, "trusted_hops: 1")
    seen = edge.get("/orders/1", headers={"x-forwarded-for": "6.6.6.6, 10.1.2.3"}).json()["headers"]
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


def test_the_gateways_own_authorization_applies(edge: Edge) -> None:
    def allow_orders(docs: list[dict]) -> None:
        docs.append({"kind": "Authorization", "service": "edge", "allow": [{"paths": ["/orders/*"]}]})

    edge.change(allow_orders, lambda rules: rules.authorization("edge") is not None, "Authorization/edge")
    assert edge.get("/orders/1").status_code == 200
    r = edge.get("/api/orders/1", host="a.example.org")
    assert r.status_code == 403


def test_the_target_services_retries_apply(edge: Edge) -> None:
    edge.v1.fail_status, edge.v1.fail_times = 503, 1

    def retry(docs: list[dict]) -> None:
        route = next(d for d in docs if d["kind"] == "Route" and d["service"] == "orders")
        route["routes"] = [
            {"to": [{"subset": "v1"}], "retries": {"attempts": 2, "backoff": {"base": "1ms", "max": "1ms"}}}
        ]

    edge.change(retry, lambda rules: rules.route("orders").routes[0].retries is not None, "orders retries")
    r = edge.get("/orders/1")
    assert r.status_code == 200 and r.json()["headers"]["x-mesh-attempt"] == "2"
    wait_until(lambda: edge.v1.fail_times == 0, what="the failure spent")


def test_a_redirect_rule_is_answered_by_the_gateway(edge: Edge) -> None:
    def add(docs: list[dict]) -> None:
        route = next(d for d in docs if d["kind"] == "Route" and d["service"] == "edge")
        route["routes"].insert(
            0, {"match": {"hosts": ["old.example.com"]}, "redirect": {"authority": SHOP, "code": 308}}
        )

    edge.change(add, lambda rules: len(rules.route("edge").routes) == 4, "the redirect rule")
    r = edge.get("/orders/1?x=1", host="old.example.com")
    assert r.status_code == 308 and SHOP in r.headers["location"] and "/orders/1" in r.headers["location"]
    assert not edge.v1.seen and not edge.v2.seen


def test_past_the_route_timeout_the_gateway_answers_504(edge: Edge) -> None:
    def short(docs: list[dict]) -> None:
        route = next(d for d in docs if d["kind"] == "Route" and d["service"] == "edge")
        route["routes"][2]["timeout"] = "200ms"

    edge.change(short, lambda rules: rules.route("edge").routes[2].timeout == 0.2, "a 200ms timeout")
    started = time.monotonic()
    r = edge.get("/api/sleep?ms=2000", host="a.example.org")
    assert r.status_code == 504 and r.text == "orders: deadline exceeded\n"
    assert time.monotonic() - started < 1.5


def test_a_port_that_cannot_be_had_at_start_is_an_error(tmp_path: Path) -> None:
    taken = bind()
    rules = write_rules(
        tmp_path / "mesh.yaml", [{"kind": "Gateway", "service": "edge", "listeners": [{"port": 8080}]}]
    )
    mesh = meshlib.Mesh("edge", config=rules)
    try:
        with pytest.raises(RuntimeError, match="did not start: listener 8080"):
            mesh.serve_gateway(ports={8080: taken.getsockname()[1]})
    finally:
        mesh.close()
        taken.close()
