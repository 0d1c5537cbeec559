"""RetryPolicy's backoff with its draw injected: the cap is exact here, where the live test
(tests/resilience/test_live_retry.py) can only bound waits that a loaded machine stretches."""

from __future__ import annotations

import pytest

from meshlib.resilience.retry import RetryPolicy
from meshlib.rules import RetrySpec


def policy(base: str, cap: str) -> RetryPolicy:
    return RetryPolicy(RetrySpec.model_validate({"attempts": 5, "backoff": {"base": base, "max": cap}}))


def test_backoff_doubles_from_base_up_to_its_cap() -> None:
    waits = [policy("100ms", "250ms").backoff(n, lambda: 1.0) for n in range(1, 5)]
    assert waits == pytest.approx([0.1, 0.2, 0.25, 0.25])


def test_backoff_is_full_jitter_below_the_cap() -> None:
    capped = policy("100ms", "100ms")
    assert [capped.backoff(n, lambda: 0.0) for n in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert [capped.backoff(n, lambda: 0.5) for n in (1, 2, 3)] == pytest.approx([0.05, 0.05, 0.05])
