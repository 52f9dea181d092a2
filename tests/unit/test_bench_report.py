"""bench.report builds RESULTS.md from any combination of peer counts a run was given.

A run with ``--memory-sizes 0,1000`` once crashed at the report step (ZeroDivisionError in the memory slope),
after half an hour of measuring. The results here are synthetic, shaped like bench/results.json.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest

from bench import report

WATCHERS = report.OBSERVERS


def _latency() -> dict[str, Any]:
    stats = {"p50": 10.0, "p90": 12.0, "p99": 15.0, "max": 16.0, "n": 30, "missed": 0}
    overhead = {"p50": 2.0, "p90": 2.5, "p99": 3.5, "max": 4.0, "n": 30}
    per_kind = {name: dict(stats, overhead_over_floor=overhead) if name != "raw-watch" else stats for name in WATCHERS}
    samples = {name: [9.0, 10.0, 15.0] for name in WATCHERS}
    return {"cr_update": per_kind, "cr_update_samples": samples, "readiness": per_kind, "readiness_samples": samples}


def _size(peers: int, latency: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "startup_seconds": {name: 0.5 + peers / 1000 for name in WATCHERS},
        "rss_mb": {name: 20.0 + peers * 0.004 for name in WATCHERS},
    }
    if latency:
        entry["latency"] = _latency()
        entry["rss_after_latency_mb"] = entry["rss_mb"]
    return entry


def results(sizes: list[int], memory_sizes: list[int]) -> dict[str, Any]:
    """What ``python -m bench --sizes ... --memory-sizes ...`` records (its sizes phase always adds 0)."""
    churn_watcher = {
        "events_seen": 100,
        "missed": 0,
        "lag_ms": {"n": 100, "p50": 20.0, "p90": 30.0, "p99": 40.0, "max": 50.0},
        "lag_first_fifth_p50_ms": 19.0,
        "lag_last_fifth_p50_ms": 21.0,
        "cpu_seconds": 0.1,
        "cpu_ms_per_1000_events": 1000.0,
    }
    every = sorted(set(sizes) | set(memory_sizes) | {0})
    return {
        "machine": {
            "cpu": "test cpu",
            "cores": 2,
            "memory_gib": 8.0,
            "python": "3.11",
            "go": "go1.23",
            "rustc": "rustc 1.80",
            "kubernetes": "v1.31.0",
            "etcd": "v3.5.0",
        },
        "args": {"rounds": 3, "sizes": sizes, "memory_sizes": memory_sizes},
        "started": 1_765_000_000.0,
        "duration_seconds": 600.0,
        "sizes": {str(n): _size(n, n in sizes) for n in every},
        "churn": {
            "peers": 1000,
            "runs": [
                {
                    "writers": 2,
                    "seconds": 10,
                    "writes": 100,
                    "write_rate": 10.0,
                    **dict.fromkeys(WATCHERS, churn_watcher),
                }
            ],
            "profile": {"top_self": [["f (m.py)", 10.0]], "top_inclusive": [], "file": "sidecar-profile-gil.txt"},
            "pipeline": {
                "peers": 1000,
                "events_fed": 30000,
                "events_streamed": 20000,
                "apply_rate_per_s": 9000.0,
                "end_to_end_rate_per_s": 6000.0,
                "sidecar_cpu_ms_per_1000_events": 120.0,
                "runs": [{}],
            },
        },
        "restart": {
            "peers": 1000,
            "apiserver_restart_seconds": 7.0,
            "sidecar_recovery_after_apiserver_ready_seconds": 1.0,
            "relists": 0.0,
        },
        "cost": {
            "peers": 1000,
            **{
                phase: {
                    "seconds": 60.0,
                    "bytes_from_apiserver": dict.fromkeys(WATCHERS, 2048),
                    "sidecar_requests": 2.0,
                    "sidecar_body_bytes": 1000.0,
                }
                for phase in ("idle_60s", "rolling_restart")
            },
        },
    }


def written(tmp_path: pathlib.Path, sizes: list[int], memory_sizes: list[int]) -> str:
    report.write(results(sizes, memory_sizes), tmp_path)
    return (tmp_path / "RESULTS.md").read_text()


def target_row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {label}"))


class TestTheIssue22Run:
    """``--sizes 1000 --memory-sizes 0,1000``: one peer count besides 0, so no slope."""

    def test_the_report_is_written_with_the_slope_not_measured(self, tmp_path: pathlib.Path) -> None:
        text = written(tmp_path, [1000], [0, 1000])
        assert "Slope (KiB per additional peer): not measured" in text
        assert target_row(text, "KiB per additional peer").endswith("| - | not measured |")
        assert "## Propagation latency, 1000 peers" in text
        assert target_row(text, "RSS after the initial sync").endswith("| 24.00 | yes |")  # 20 + 1,000 x 0.004
        # The synthetic churn gives every watcher the same CPU per event: a ratio of 1, within the budget's 1.0.
        assert target_row(text, "CPU per 1,000 events under churn").endswith("| 1.00 | yes |")


class TestOneSize:
    """A single peer count and nothing else (the sizes phase still measures 0 peers)."""

    @pytest.mark.parametrize("peers", [20, 1000, 5000])
    def test_the_report_is_written(self, tmp_path: pathlib.Path, peers: int) -> None:
        text = written(tmp_path, [peers], [peers])
        assert "not measured" in text
        assert f"| {peers} |" in text

    def test_no_latency_at_1000_peers_is_not_measured(self, tmp_path: pathlib.Path) -> None:
        text = written(tmp_path, [20], [20])
        assert target_row(text, "p99 CR-update overhead").endswith("| - | not measured |")
        assert target_row(text, "process start to first synced snapshot").endswith("| - | not measured |")
        assert target_row(text, "RSS after the initial sync").endswith("| - | not measured |")


class TestSeveralSizes:
    """The slope is taken from 1,000 peers to the largest count, or from the smallest when 1,000 is the largest."""

    def test_from_1000_to_the_largest(self, tmp_path: pathlib.Path) -> None:
        text = written(tmp_path, [100, 1000, 5000], [100, 1000, 5000, 10000])
        # 0.004 MiB per peer is 4.096 KiB.
        assert "from 1,000 to 10,000): raw-watch 4.1, client-go-informer 4.1" in text
        assert target_row(text, "KiB per additional peer").endswith("| 4.10 | no |")

    def test_from_the_smallest_when_nothing_is_larger_than_1000(self, tmp_path: pathlib.Path) -> None:
        text = written(tmp_path, [100, 1000], [0, 100, 1000])
        assert "from 100 to 1,000)" in text

    def test_small_quick_sizes(self, tmp_path: pathlib.Path) -> None:
        text = written(tmp_path, [20], [20, 50])
        assert "from 20 to 50)" in text


class TestNoSizes:
    def test_a_run_that_measured_no_peer_counts_still_reports(self, tmp_path: pathlib.Path) -> None:
        data = results([], [])
        data["sizes"] = {}
        report.write(data, tmp_path)
        text = (tmp_path / "RESULTS.md").read_text()
        assert "not measured" in text


def test_the_span_of_the_slope() -> None:
    assert report.slope_span({"0": {}, "1000": {}}) is None
    assert report.slope_span({"1000": {}}) is None
    assert report.slope_span({}) is None
    assert report.slope_span({"0": {}, "1000": {}, "5000": {}}) == (1000, 5000)
    assert report.slope_span({"100": {}, "1000": {}}) == (100, 1000)


def test_churn_cpu_is_compared_with_the_informer_run_by_run() -> None:
    """The budget's ``cpu_vs_client_go``: per churn run the sidecar's CPU over the informer's, then the median."""
    runs = [
        {"sidecar": {"cpu_ms_per_1000_events": s}, "client-go-informer": {"cpu_ms_per_1000_events": c}}
        for s, c in [(700, 350), (600, 400), (900, 300)]
    ]
    assert report._churn_cpu_vs_client_go({"churn": {"runs": runs}}) == 2.0  # ratios 2.0, 1.5, 3.0
    assert report._churn_cpu_vs_client_go({"churn": {"runs": []}}) is None
