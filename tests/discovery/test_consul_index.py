"""A Consul agent that answers an X-Consul-Index below 1 (HashiCorp: never valid, an agent's
bug): the watch blocks at index 1 instead of polling at 0, and says so once."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from meshlib.discovery.base import Target
from meshlib.discovery.consul import ConsulProvider
from tests.discovery.consul_agent import ConsulAgentEmulator
from tests.discovery.watching import Watching


@pytest.fixture
def agent() -> Iterator[ConsulAgentEmulator]:
    with ConsulAgentEmulator() as a:
        yield a


@pytest.mark.parametrize("junk", ["-5", "0"])
async def test_an_index_below_one_blocks_at_one_and_is_logged_once(
    agent: ConsulAgentEmulator, junk: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshlib.discovery")
    agent.add("orders", "o1", 8001, address="127.0.0.1")  # the service's index is 1: a query at 1 blocks
    agent.force_index(junk)
    provider = ConsulProvider.from_url(agent.url)
    # no rate limit: a loop that did not block would send hundreds of queries a second
    w = Watching(provider, Target("orders", "orders", {"wait": 0.2, "min_interval": 0.0}))
    try:
        await w.until(lambda: len(agent.health_queries()) >= 5)
        indexes = [dict(q.params).get("index") for q in agent.health_queries()]
        assert indexes[0] is None and set(indexes[1:]) == {"1"}, indexes  # blocking, never back at 0
        assert w.addresses() == {"127.0.0.1:8001"}
        agent.add("orders", "o2", 8002, address="127.0.0.1")  # news ends a blocked query at once
        await w.until(lambda: w.addresses() == {"127.0.0.1:8001", "127.0.0.1:8002"})
    finally:
        await provider.aclose()
    ours = [r for r in caplog.records if r.name.startswith("meshlib.discovery")]
    loud = [r.getMessage() for r in ours if r.levelno >= logging.INFO]
    assert len(loud) == 1 and f"X-Consul-Index {junk}" in loud[0], loud
    assert next(r.levelno for r in ours if "X-Consul-Index" in r.getMessage()) == logging.WARNING
    assert not [r for r in ours if "went back" in r.getMessage()]
