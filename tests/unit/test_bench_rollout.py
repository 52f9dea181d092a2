"""bench.rollout's arithmetic: the convergence percentiles it reports."""

from __future__ import annotations

from bench.rollout import percentile


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.4], 99) == 0.4
    assert percentile([], 50) is None
