"""A real Prometheus (Debian's `prometheus` package) scrapes a meshed uvicorn service's /metrics.

The test starts its own Prometheus process (never the system service) on a free port of
127.0.0.1 with a temporary config and storage, scraping every second, and checks through the
HTTP query API that the counters and the histogram show exactly the traffic sent.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import meshlib
from tests.telemetry.conftest import Flaky, service

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="no prometheus binary (Debian package `prometheus`; .ci/run installs it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus process of this test's own, scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "scrape_configs:\n"
            "  - job_name: orders\n"
            "    metrics_path: /metrics\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = workdir / "prometheus.log"
        assert PROMETHEUS is not None
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        self._poll(self._ready, 30, "Prometheus to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> float | None:
        """The value of an instant query with one series, or None while it has none."""
        r = httpx.get(f"{self.url}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5)
        body = r.json()
        assert body["status"] == "success", json.dumps(body)
        result = body["data"]["result"]
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def _poll(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.2)

    def wait_for(self, expr: str, want: float, timeout: float = 45) -> None:
        seen: list[float | None] = []

        def check() -> bool:
            seen.append(self.query(expr))
            return seen[-1] == want

        try:
            self._poll(check, timeout, f"{expr} == {want}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last values {seen[-5:]}") from None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def orders() -> Iterator[tuple[meshlib.Mesh, str, Flaky]]:
    mesh = meshlib.Mesh("orders", metrics_path="/metrics")
    flaky = Flaky(failures=3)
    with service(mesh, flaky) as server:
        yield mesh, server.address, flaky
    mesh.close()


@pytest.mark.timeout(150)
def test_prometheus_scrapes_exact_request_counts_and_histogram(orders, tmp_path: Path) -> None:
    mesh, address, _ = orders
    edge = 'direction="in",source="checkout",destination="orders"'
    with httpx.Client(base_url=f"http://{address}", headers={"x-mesh-source": "checkout"}) as client:
        statuses = [client.get(f"/items/{i}").status_code for i in range(10)]
    assert statuses == [503] * 3 + [200] * 7

    prometheus = Prometheus(tmp_path, address)
    try:
        prometheus.wait_for('up{job="orders"}', 1)
        prometheus.wait_for(f'mesh_requests_total{{{edge},status_class="2xx"}}', 7)
        assert prometheus.query(f'mesh_requests_total{{{edge},status_class="5xx"}}') == 3
        assert prometheus.query(f"sum(mesh_request_duration_seconds_count{{{edge}}})") == 10
        assert prometheus.query(f'sum(mesh_request_duration_seconds_bucket{{{edge},le="+Inf"}})') == 10
        assert prometheus.query(f"sum(mesh_request_duration_seconds_sum{{{edge}}}) > 0") is not None

        # more traffic: the next scrapes show the counters moved by exactly that much
        with httpx.Client(base_url=f"http://{address}", headers={"x-mesh-source": "checkout"}) as client:
            assert all(client.get(f"/items/{i}").status_code == 200 for i in range(5))
        prometheus.wait_for(f'mesh_requests_total{{{edge},status_class="2xx"}}', 12)
        prometheus.wait_for(f"sum(mesh_request_duration_seconds_count{{{edge}}})", 15)
        quantile = prometheus.query(
            f"histogram_quantile(0.5, sum by (le) (mesh_request_duration_seconds_bucket{{{edge}}}))"
        )
        assert quantile is not None and 0 < quantile <= 10
    finally:
        prometheus.stop()
    assert mesh.stats.edge("in", "checkout").total == 15, "the scrapes themselves were not counted"
