"""A real gateway on 127.0.0.1 in front of real uvicorn backends, with a watched rules file."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.gateway import GatewayServing
from meshlib.testing import RunningServer, serve
from tests.backend import Backend
from tests.conftest import Fleet, wait_until, write_rules
from tests.gateway.certs import WebCA

SHOP = "shop.example.com"
PORTS = {8080: 0, 8443: 0, 8081: 0, 9090: 0}  # document port -> any free port


def documents(
    orders: list[tuple[str, str]],
    shop: tuple[str, str],
    org: tuple[str, str],
    extra: list[dict] | None = None,
) -> list[dict[str, Any]]:
    """orders v1/v2 with a canary Route of their own; the gateway `edge` in front."""
    return [
        {
            "kind": "Endpoints",
            "service": "orders",
            "endpoints": [{"address": a, "labels": {"version": v}} for a, v in orders],
        },
        {"kind": "Endpoints", "service": "empty", "endpoints": []},
        {
            "kind": "Destination",
            "service": "orders",
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        },
        {
            "kind": "Route",
            "service": "orders",
            "routes": [
                {"match": {"headers": {"x-canary": {"exact": "true"}}}, "to": [{"subset": "v2"}]},
                {"to": [{"subset": "v1", "weight": 80}, {"subset": "v2", "weight": 20}]},
            ],
        },
        {
            "kind": "Gateway",
            "service": "edge",
            "listeners": [
                {"port": 8080},
                {
                    "port": 8443,
                    "tls": [
                        {"hosts": [SHOP], "certificate": shop[0], "key": shop[1]},
                        {"hosts": ["*.example.org"], "certificate": org[0], "key": org[1]},
                    ],
                },
                {"port": 8081, "https_redirect": True},
            ],
        },
        {
            "kind": "Route",
            "service": "edge",
            "routes": [
                {
                    "match": {"hosts": [SHOP], "path": {"prefix": "/orders"}},
                    "to": [{"service": "orders"}],
                    "timeout": "5s",
                },
                {"match": {"hosts": [SHOP], "path": {"prefix": "/empty"}}, "to": [{"service": "empty"}]},
                {
                    "match": {"hosts": ["*.example.org"], "path": {"prefix": "/api/"}},
                    "to": [{"service": "orders"}],
                    "rewrite": {"prefix": "/"},
                },
                *(extra or []),
            ],
        },
    ]


@dataclass
class Edge:
    """The gateway, its Mesh, its rules file and what is behind it."""

    gateway: GatewayServing
    mesh: meshlib.Mesh
    rules: Path
    docs: list[dict[str, Any]]
    v1: Backend
    v2: Backend
    ca: WebCA

    def url(self, port: int = 8080, scheme: str = "http") -> str:
        return self.gateway.url(port, scheme)

    def get(self, path: str, host: str = SHOP, port: int = 8080, **kwargs: Any) -> httpx.Response:
        headers = {"host": host, **kwargs.pop("headers", {})}
        return httpx.get(self.url(port) + path, headers=headers, timeout=10.0, **kwargs)

    def change(self, edit: Any, until: Any, what: str) -> None:
        """Edit the documents, write the file, and wait until the gateway's Mesh has them."""
        edit(self.docs)
        write_rules(self.rules, self.docs)
        wait_until(lambda: until(self.mesh.snapshot.rules), what=what)

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.bundle))


@pytest.fixture
def edge(tmp_path: Path, fleet: Fleet, extra_routes: list[dict] | None) -> Iterator[Edge]:
    v1, s1 = fleet.start("v1", {"version": "v1"})
    v2, s2 = fleet.start("v2", {"version": "v2"})
    ca = WebCA(tmp_path / "web")
    docs = documents(
        [(s1.address, "v1"), (s2.address, "v2")],
        ca.server("shop", SHOP),
        ca.server("org", "*.example.org"),
        extra_routes,
    )
    rules = write_rules(tmp_path / "mesh.yaml", docs)
    mesh = meshlib.Mesh("edge", config=rules, watch_interval=0.05)
    gateway = mesh.serve_gateway(ports=PORTS)
    try:
        yield Edge(gateway, mesh, rules, docs, v1, v2, ca)
    finally:
        gateway.stop()
        mesh.close()


@pytest.fixture
def extra_routes() -> list[dict] | None:
    """Gateway routes a test module adds after the fixture's (override the fixture)."""
    return None


def serve_app(app: Any) -> RunningServer:
    return serve(app)


def connection(
    address: str, tls: ssl.SSLContext | None = None, sni: str = SHOP
) -> http.client.HTTPConnection:
    """A keep-alive connection held open by the test (`.sock` tells whether it stayed the same)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10.0)
    sock = socket.create_connection((host, int(port)), timeout=10.0)
    conn.sock = tls.wrap_socket(sock, server_hostname=sni) if tls is not None else sock
    return conn


def ask(conn: http.client.HTTPConnection, path: str, host: str = SHOP) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    return response.status, response.read()
