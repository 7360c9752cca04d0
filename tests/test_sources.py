"""The ingress's per-source admission (`SourceBudget`, `source_key`): sans-io, a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sign.parent._sources import SourceBudget, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_then_refusals() -> None:
    clock = Clock()
    budget = SourceBudget(rate=10.0, burst=3, max_wait_s=0.25, clock=clock)
    starts = [budget.reserve("192.0.2.1") for _ in range(6)]
    # three at once, then one every 0.1 s queued up to 0.25 s ahead, then refused
    assert starts[:5] == pytest.approx([100.0, 100.0, 100.0, 100.1, 100.2])
    assert starts[5] is None
    # another address has its own budget
    assert budget.reserve("192.0.2.2") == 100.0
    # a refusal spent nothing: the next slot is still 100.3
    clock.now = 100.1
    assert budget.reserve("192.0.2.1") == pytest.approx(100.3)


def test_a_quiet_source_gets_its_burst_back_and_is_forgotten() -> None:
    clock = Clock()
    budget = SourceBudget(rate=10.0, burst=2, max_wait_s=0.0, clock=clock)
    assert budget.reserve("a") == budget.reserve("a") == 100.0
    assert budget.reserve("a") is None
    clock.now = 100.2  # two intervals: a full burst again
    assert budget.reserve("a") == budget.reserve("a") == 100.2
    clock.now = 200.0
    budget.reserve("b")  # each call forgets the least recently seen source if it is full
    assert budget.sources == 1


def test_no_address_and_an_infinite_rate_are_not_limited() -> None:
    clock = Clock()
    budget = SourceBudget(rate=1.0, burst=1, max_wait_s=0.0, clock=clock)
    assert all(budget.reserve(None) == 100.0 for _ in range(100))
    unlimited = SourceBudget(rate=math.inf, burst=1, max_wait_s=0.0, clock=clock)
    assert all(unlimited.reserve("a") == 100.0 for _ in range(100))
    assert unlimited.sources == 0


def test_memory_is_bounded_whatever_the_number_of_sources() -> None:
    clock = Clock()
    budget = SourceBudget(rate=1.0, burst=1, max_wait_s=10.0, clock=clock, max_sources=100)
    for i in range(10_000):
        budget.reserve(f"10.0.{i // 256}.{i % 256}")
    assert budget.sources == 100


@pytest.mark.parametrize(
    ("rate", "burst", "wait", "message"),
    [(0.0, 1, 1.0, "rate"), (1.0, 0, 1.0, "burst"), (1.0, 1, -1.0, "max_wait_s")],
)
def test_bad_settings_are_refused(rate: float, burst: int, wait: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SourceBudget(rate, burst, wait, Clock())


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=200),
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=10),
    wait=st.floats(min_value=0.0, max_value=2.0),
)
def test_starts_never_exceed_the_burst_plus_the_rate(
    gaps: list[float], rate: float, burst: int, wait: float
) -> None:
    """Whatever the arrivals: starts are never before the arrival nor more than max_wait_s
    after it, and any window of length w holds at most burst + rate * w starts."""
    clock = Clock()
    budget = SourceBudget(rate, burst, wait, clock)
    starts = []
    for gap in gaps:
        clock.now += gap
        start = budget.reserve("198.51.100.7")
        if start is not None:
            assert clock.now <= start <= clock.now + wait + 1e-9
            starts.append(start)
    starts.sort()
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            window = starts[j] - first
            assert j - i + 1 <= burst + rate * window + 1e-6


def test_source_keys() -> None:
    assert source_key(("192.0.2.1", 443)) == "192.0.2.1"
    assert source_key(("2001:db8:1:2:3:4:5:6", 443, 0, 0)) == "2001:db8:1:2::/64"
    assert source_key(("2001:db8:1:2:ffff::1", 443, 0, 0)) == "2001:db8:1:2::/64"
    assert source_key(("::ffff:192.0.2.1", 443, 0, 0)) == "192.0.2.1"
    assert source_key(("fe80::1%eth0", 443, 0, 2)) == "fe80::/64"
    assert source_key("/run/trio-sign/ingress.sock") is None  # UNIX: not limited
    assert source_key("") is None
    assert source_key(None) is None
    assert source_key(("not an address", 1)) is None
