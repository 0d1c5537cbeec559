"""The mesh's client under uvloop (what `uvicorn[standard]` runs): the async HTTP/1.1 transport,
mTLS with its SPIFFE check, timeouts and fault delays, each on a uvloop loop against servers
that run on uvloop too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import meshlib
from meshlib.resilience.classify import Failure
from meshlib.security.identity import Identity
from meshlib.testing import RunningServer, serve
from tests.backend import Backend
from tests.http.test_h1 import _echo
from tests.security.test_tls import PKI, Seen, mtls_server

uvloop = pytest.importorskip("uvloop")


@pytest.fixture(scope="module")
def echo() -> Iterator[RunningServer]:
    running = serve(_echo, loop="uvloop")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def slow() -> Iterator[RunningServer]:
    running = serve(Backend("slow"), loop="uvloop")
    try:
        yield running
    finally:
        running.stop()


def _rules(tmp_path: Path, service: str, address: str, route: dict[str, Any] | None = None) -> Path:
    endpoints = [{"address": address}]
    docs: list[dict[str, Any]] = [{"kind": "Endpoints", "service": service, "endpoints": endpoints}]
    if route is not None:
        docs.append({"kind": "Route", "service": service, "routes": [route]})
    path = tmp_path / f"{service}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_requests_share_a_kept_alive_connection_and_bodies_stream(
    echo: RunningServer, tmp_path: Path
) -> None:
    rules = _rules(tmp_path, "echo", echo.address)

    async def scenario() -> tuple[set[int], list[bytes]]:
        async with meshlib.Mesh("caller", config=rules) as mesh, mesh.client() as client:
            ports = {(await client.get("http://echo/")).json()["port"] for _ in range(5)}
            async with client.stream("GET", "http://echo/chunks") as r:
                parts = [part async for part in r.aiter_raw()]
        return ports, parts

    ports, parts = uvloop.run(scenario())
    assert len(ports) == 1  # one connection, kept alive
    assert b"".join(parts) == b"part0;part1;part2;"


def test_mtls_checks_the_peer_and_fails_closed(tmp_path: Path) -> None:
    pki = PKI()
    checkout: Identity = pki.identity("checkout")
    app = Seen()
    server, _ = mtls_server(pki.identity("orders"), app)
    try:
        rules = tmp_path / "both.yaml"
        docs = [
            {"kind": "Endpoints", "service": name, "endpoints": [{"address": server.address}]}
            for name in ("orders", "payments")  # payments' endpoint is an orders server
        ]
        rules.write_text(yaml.safe_dump_all(docs))

        async def scenario() -> tuple[httpx.Response, BaseException]:
            mesh = meshlib.Mesh("checkout", config=rules, credentials=checkout)
            async with mesh, mesh.client() as client:
                good = await client.get("http://orders/x")
                try:
                    await client.get("http://payments/x")
                except httpx.ConnectError as exc:
                    assert mesh.http_wire.failure_kind(exc) is Failure.REFUSED
                    return good, exc
            raise AssertionError("a server of another service was accepted")

        good, refused = uvloop.run(scenario())
    finally:
        server.stop()
    assert good.json()["peer"] == checkout.spiffe_id
    assert "server identity mismatch" in str(refused)
    assert len(app.requests) == 1  # the refused call never reached the app


def test_a_route_timeout_cuts_a_slow_answer(slow: RunningServer, tmp_path: Path) -> None:
    rules = _rules(tmp_path, "slow", slow.address, {"timeout": "100ms"})

    async def scenario() -> tuple[float, BaseException | None]:
        async with meshlib.Mesh("caller", config=rules) as mesh, mesh.client() as client:
            started = time.monotonic()
            try:
                await client.get("http://slow/sleep?ms=2000")
            except Exception as exc:  # the mesh's timeout, whatever its type
                return time.monotonic() - started, exc
        return time.monotonic() - started, None

    took, error = uvloop.run(scenario())
    assert error is not None and took < 1.0, (took, error)


def test_a_fault_delay_is_never_shorter_than_the_rule(slow: RunningServer, tmp_path: Path) -> None:
    """uvloop's timers count whole milliseconds and fire up to one early; aborted after the
    delay, so that nothing but the delay is timed."""
    fault = {"delay": {"percent": 100, "duration": "50ms"}, "abort": {"percent": 100, "status": 503}}
    rules = _rules(tmp_path, "slow", slow.address, {"fault": fault})

    async def scenario() -> list[float]:
        async with meshlib.Mesh("caller", config=rules) as mesh, mesh.client() as client:

            async def timed(i: int) -> float:
                await asyncio.sleep(i / 10_000)  # start at different points of a millisecond
                started = time.monotonic()
                assert (await client.get("http://slow/")).status_code == 503
                return time.monotonic() - started

            return await asyncio.gather(*(timed(i) for i in range(100)))

    assert min(uvloop.run(scenario())) >= 0.050
