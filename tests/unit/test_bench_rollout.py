"""bench.rollout's arithmetic: the convergence percentiles it reports, and the delay behind the truth watcher."""

from __future__ import annotations

from bench.rollout import _behind_truth, after_truth, arm_label, percentile


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.4], 99) == 0.4
    assert percentile([], 50) is None


def test_behind_the_truth_is_each_last_change_minus_the_truths() -> None:
    """Negative when a subscriber's last change came before the truth watcher's (the watcher's own lag)."""
    spread = after_truth({"a": 10.5, "b": 11.0, "c": 9.75}, 10.0)
    assert spread == {"subscribers": 3, "p50": 0.5, "p99": 1.0, "max": 1.0, "min": -0.25}
    assert after_truth({"a": 1.0}, None) is None, "the truth did not change: nothing to measure against"


def test_the_report_cell_is_n_m_for_results_from_before_the_truth_watcher() -> None:
    assert _behind_truth({"truth_after_ready": None, "truth_p50": None, "truth_p99": None}) == "n/m"
    row = {"truth_after_ready": 9.5, "truth_p50": 0.1234, "truth_p99": 0.4, "truth_matches": True}
    assert _behind_truth(row) == "0.12 / 0.40 (9.50)"
    assert _behind_truth(row | {"truth_matches": False}).endswith("truth NOT final")


def test_a_relay_arm_with_another_replica_count_is_reported_apart() -> None:
    three = {"P": 2000, "arm": "relays-kill", "args": {"relays": 3}}
    five = {"P": 2000, "arm": "relays-kill", "args": {"relays": 5}}
    assert arm_label(three) == "relays-kill"
    assert arm_label(five) == "relays-kill, 5 replicas"
    assert arm_label({"P": 2000, "arm": "routers", "args": {"relays": 5}}) == "routers", "not a relay arm"
    assert arm_label({"P": 100, "arm": "relays"}) == "relays", "results from before the option: 3 replicas"
