"""Tests for sidecar.core.backoff: jittered exponential backoff."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.backoff import Backoff


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.001, 5),
    maximum=st.floats(0.01, 120),
    factor=st.floats(1.0, 4.0),
    seed=st.integers(0, 2**32),
    steps=st.integers(1, 40),
)
def test_delays_within_half_bound_and_bound(
    initial: float, maximum: float, factor: float, seed: int, steps: int
) -> None:
    backoff = Backoff(initial=initial, maximum=maximum, factor=factor, rng=random.Random(seed))
    for attempt in range(steps):
        bound = min(maximum, initial * factor**attempt)
        delay = backoff.next_delay()
        assert bound / 2 <= delay <= bound
        assert delay <= maximum


def test_grows_then_caps() -> None:
    backoff = Backoff(initial=1, maximum=8, factor=2, rng=random.Random(1))
    bounds = [1, 2, 4, 8, 8, 8]
    delays = [backoff.next_delay() for _ in bounds]
    for delay, bound in zip(delays, bounds, strict=True):
        assert bound / 2 <= delay <= bound
    assert backoff.attempts == len(bounds)


def test_reset_starts_over() -> None:
    backoff = Backoff(initial=1, maximum=100, factor=2, rng=random.Random(7))
    for _ in range(6):
        backoff.next_delay()
    assert backoff.next_delay() >= 32
    backoff.reset()
    assert backoff.attempts == 0
    assert 0.5 <= backoff.next_delay() <= 1


def test_jitter_actually_varies() -> None:
    backoff = Backoff(initial=10, maximum=10, rng=random.Random(3))
    delays = {backoff.next_delay() for _ in range(20)}
    assert len(delays) > 1


def test_a_very_long_outage_never_overflows() -> None:
    # factor**attempts leaves the float range after ~1000 attempts (about 8 hours at a 30 s cap).
    backoff = Backoff(initial=0.2, maximum=30, rng=random.Random(0))
    for _ in range(5000):
        delay = backoff.next_delay()
        assert 0 < delay <= 30
    assert delay >= 15
