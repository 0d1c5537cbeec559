from __future__ import annotations

import threading

import pytest

from meshlib.resilience.budget import RetryBudget
from meshlib.rules import BudgetSpec
from tests.clock import Clock


def withdraw_all(budget: RetryBudget, limit: int = 100_000) -> int:
    n = 0
    while n < limit and budget.try_withdraw():
        n += 1
    return n


def test_a_share_of_deposits_without_a_reserve() -> None:
    budget = RetryBudget(percent=20, min_per_second=0, clock=Clock())
    assert budget.balance() == 0
    assert not budget.try_withdraw()
    for _ in range(100):
        budget.deposit()
    assert budget.balance() == 20
    assert withdraw_all(budget) == 20
    assert budget.balance() == 0


def test_fractional_deposits_add_up() -> None:
    budget = RetryBudget(percent=10, min_per_second=0, clock=Clock())
    for _ in range(9):
        budget.deposit()
    assert not budget.try_withdraw()  # 0.9 of a retry
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()


def test_the_reserve_allows_min_per_second_times_window_with_no_traffic() -> None:
    budget = RetryBudget(percent=20, min_per_second=10, window=10, clock=Clock())
    assert budget.balance() == 100
    assert withdraw_all(budget) == 100
    for _ in range(10):
        budget.deposit()
    assert withdraw_all(budget) == 0  # 20% of 10 is under the floor: the floor is all there is


def test_the_floor_is_not_added_to_the_share() -> None:
    """max(reserve, share), as Envoy's budget: a busy client gets its share and nothing more."""
    budget = RetryBudget(percent=20, min_per_second=10, window=10, clock=Clock())
    for _ in range(400):
        budget.deposit()
    assert budget.balance() == 100  # the share (80) is under the floor (100)
    for _ in range(600):
        budget.deposit()
    assert budget.balance() == 200  # the share (200) is over it: 200, not 300
    assert withdraw_all(budget) == 200


def test_deposits_and_withdrawals_expire_after_the_window() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(percent=50, min_per_second=1, window=10, clock=clock)
    for _ in range(40):
        budget.deposit()
    assert budget.balance() == 20  # the share (20) is over the floor (10)
    assert withdraw_all(budget) == 20
    assert budget.balance() == 0

    # Both live in the first slot (1 s wide) and leave with it, one window after it began.
    clock.now = 9.99
    assert budget.balance() == 0
    assert not budget.try_withdraw()
    clock.now = 10.0
    assert budget.balance() == 10
    assert withdraw_all(budget) == 10  # only the reserve is left


def test_an_entry_counts_for_a_whole_window_at_most_and_nine_slots_at_least() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(percent=100, min_per_second=0, window=10, clock=clock)
    clock.now = 0.5
    budget.deposit()
    clock.now = 9.99  # slot 9: the deposit (slot 0) is still in the window
    assert budget.balance() == 1
    clock.now = 10.0  # slot 10: gone, 9.5 s after it was made
    assert budget.balance() == 0


def test_a_long_pause_clears_everything() -> None:
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=0, clock=clock)
    for _ in range(1000):
        budget.deposit()
    clock.advance(3600)
    assert budget.balance() == 0


def test_slots_rotate_one_at_a_time() -> None:
    clock = Clock(0.0)
    budget = RetryBudget(percent=100, min_per_second=0, window=10, clock=clock)
    for second in range(10):
        clock.now = second + 0.5
        budget.deposit()
    assert budget.balance() == 10
    for second in range(10, 20):
        clock.now = second + 0.5
        assert budget.balance() == 19 - second  # one slot leaves every second


def test_exhausted_counts_refusals() -> None:
    budget = RetryBudget(percent=20, min_per_second=0, clock=Clock())
    for _ in range(10):
        budget.deposit()
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert budget.exhausted == 0
    assert not budget.try_withdraw()
    assert not budget.try_withdraw()
    assert budget.exhausted == 2


def test_steady_failure_converges_to_the_percentage() -> None:
    """1000 req/s for 30 simulated seconds; every attempt fails and is retried while allowed."""
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=10, window=10, clock=clock)
    requests = retries = 0
    for _ in range(30_000):
        clock.advance(0.001)
        budget.deposit()
        requests += 1
        retries += withdraw_all(budget)
    attempts_per_request = (requests + retries) / requests
    assert 1.195 <= attempts_per_request <= 1.2 + 0.001  # the floor is not added: 20% at most
    assert budget.exhausted == requests

    # A later 10-second stretch sees 20% of its requests retried, the floor adding nothing.
    window_retries = 0
    for _ in range(10_000):
        clock.advance(0.001)
        budget.deposit()
        window_retries += withdraw_all(budget)
    assert 1950 <= window_retries <= 2000


def test_from_spec() -> None:
    clock = Clock()
    budget = RetryBudget.from_spec(BudgetSpec(percent=50, min_per_second=2, window="5s"), clock=clock)
    assert (budget.percent, budget.min_per_second, budget.window) == (50, 2, 5)
    assert budget.balance() == 10
    defaults = RetryBudget.from_spec(BudgetSpec(), clock=clock)
    assert defaults.balance() == 100


@pytest.mark.parametrize(
    "kwargs",
    [{"percent": -1}, {"min_per_second": -1}, {"window": 0}, {"slots": 0}, {"percent": float("nan")}],
)
def test_invalid_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_concurrent_withdrawals_never_overdraw() -> None:
    clock = Clock()
    budget = RetryBudget(percent=20, min_per_second=0, clock=clock)
    for _ in range(5000):
        budget.deposit()
    granted = [0] * 8
    start = threading.Barrier(8)

    def worker(k: int) -> None:
        start.wait()
        for _ in range(500):
            if budget.try_withdraw():
                granted[k] += 1
            budget.deposit()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 5000 + 4000 deposits in all: at most 1800 retries, and the refusals make up the rest.
    assert sum(granted) <= 1800
    assert sum(granted) + budget.exhausted == 4000
    assert budget.balance() == pytest.approx(1800 - sum(granted))
