"""The shared reconnect/restart delay."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from trio_sign._backoff import full_jitter_delay


@given(
    seed=st.integers(0, 2**32),
    base=st.floats(0.01, 10),
    maximum=st.floats(0.01, 600),
    failures=st.integers(0, 200),
    at_least=st.floats(0, 20),
)
def test_delay_stays_between_the_floor_and_the_ceiling(
    seed: int, base: float, maximum: float, failures: int, at_least: float
) -> None:
    ceiling = min(maximum, base * 2.0 ** min(failures, 64))
    delay = full_jitter_delay(
        random.Random(seed), base=base, maximum=maximum, failures=failures, at_least=at_least
    )
    assert min(at_least, ceiling) <= delay <= ceiling


def test_a_floor_equal_to_the_base_makes_the_first_delay_exact() -> None:
    """The parent's first enclave restart waits exactly ``backoff_initial_s``: never ~0 s."""
    rng = random.Random(1)
    assert {
        full_jitter_delay(rng, base=5, maximum=300, failures=0, at_least=5) for _ in range(20)
    } == {5}
    later = [
        full_jitter_delay(rng, base=5, maximum=300, failures=3, at_least=5) for _ in range(200)
    ]
    assert min(later) >= 5
    assert max(later) <= 40
    assert len(set(later)) > 100


def test_without_a_floor_the_delay_can_be_near_zero() -> None:
    rng = random.Random(7)
    assert min(full_jitter_delay(rng, base=1, maximum=10, failures=0) for _ in range(500)) < 0.01
