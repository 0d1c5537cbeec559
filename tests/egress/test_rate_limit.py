"""A RateLimit document for an External host is enforced by the calling process (the host runs
no meshlib of its own): calls past the bucket fail fast with `RateLimitedError` and never
leave; a token comes back at the document's rate; a mesh service's RateLimit stays inbound."""

from __future__ import annotations

import time

import pytest

import meshlib
from meshlib.rules import RulesError, RuleSet
from tests.conftest import Fleet, wait_until
from tests.egress.test_resilience import HOST, external


def limit(rate: float, burst: int, service: str = HOST, **more: object) -> dict:
    return {"kind": "RateLimit", "service": service, "requests_per_second": rate, "burst": burst, **more}


def test_calls_past_the_bucket_fail_fast_and_never_leave(fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    with meshlib.Mesh("checkout") as mesh:
        # a token a second: the three calls must not refill one before the fourth (at 5/s a
        # thread stalled for 0.2 s let the fourth through)
        mesh.apply_rules(RuleSet([external(server.address), limit(1, 3)]), "t1")
        with mesh.sync_client() as client:
            assert [client.get(f"http://{HOST}/x").status_code for _ in range(3)] == [200] * 3
            with pytest.raises(meshlib.RateLimitedError, match=HOST) as refused:
                client.get(f"http://{HOST}/x")
            assert 0 < refused.value.retry_after <= 1.0 + 1e-6  # one token at 1/s
            assert backend.hits == 3
            assert mesh.stats.counter("egress_rate_limited", HOST) == 1
            time.sleep(refused.value.retry_after)  # the wait the refusal named is enough
            assert client.get(f"http://{HOST}/x").status_code == 200
        assert backend.hits == 4


async def test_the_async_client_is_limited_too(fleet: Fleet) -> None:
    backend, server = fleet.start("partner")
    with meshlib.Mesh("checkout") as mesh:
        # a token every 5 s: no stall of the four calls refills one
        mesh.apply_rules(RuleSet([external(server.address), limit(0.2, 2)]), "t1")
        async with mesh.client() as client:
            outcomes = []
            for _ in range(4):
                try:
                    outcomes.append((await client.get(f"http://{HOST}/x")).status_code)
                except meshlib.RateLimitedError:
                    outcomes.append("limited")
        assert outcomes == [200, 200, "limited", "limited"] and backend.hits == 2


def test_a_mesh_services_ratelimit_stays_inbound(fleet: Fleet) -> None:
    """`orders` enforces its own RateLimit when it receives calls; callers do not take tokens."""
    backend, server = fleet.start("orders")
    endpoints = {"kind": "Endpoints", "service": "orders", "endpoints": [{"address": server.address}]}
    with meshlib.Mesh("checkout") as mesh:
        mesh.apply_rules(RuleSet([endpoints, limit(1, 1, service="orders")]), "t1")
        with mesh.sync_client() as client:
            assert [client.get("http://orders/x").status_code for _ in range(3)] == [200] * 3
    wait_until(lambda: backend.hits == 3, what="every call sent")


def test_a_global_scope_is_refused_for_an_external() -> None:
    with pytest.raises(RulesError) as refused:
        RuleSet([external("127.0.0.1:9"), limit(5, 3, scope="global")])
    problem = refused.value.problems[0]
    assert problem.field == "scope" and "External" in problem.reason and HOST in problem.document


def test_the_egress_docs_example_runs_as_documented() -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "egress.md").read_text(encoding="utf-8")
    section = text[text.index("## Rate limits") :]
    code = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[0]
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, check=False
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"retry in [01]\.\d\ds\n", done.stdout), done.stdout
