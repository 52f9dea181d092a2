"""bench.check's pure parts: the budget, the verdicts and the markdown (the measuring needs a control plane)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import check
from bench.profiling import categorise


def rep(**changes: Any) -> dict[str, Any]:
    """One repetition as ``bench.check.measure`` and the pipeline record it, within the committed budget."""
    base: dict[str, Any] = {
        "first_snapshot_s": {"sidecar": 0.8, "raw-watch": 0.2, "client-go-informer": 0.4},
        "rss_mib": {"sidecar": 50.0, "raw-watch": 10.0, "client-go-informer": 25.0},
        "cr_p99_ms": {"sidecar": 14.0, "raw-watch": 12.0, "client-go-informer": 12.5},
        "p99_overhead_ms": 2.0,
        "churn_write_rate": 120.0,
        "cpu_ms_per_1000_events": {"sidecar": 900.0, "raw-watch": 300.0, "client-go-informer": 1000.0},
        "pipeline_events_per_s": 9000.0,
        "pipeline_cpu_ms_per_1000_events": 100.0,
    }
    return {**base, **changes}


def run_record(this: list[dict[str, Any]], base: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    trees = {"this": {"describe": "at abc1234", "reps": this}}
    if base is not None:
        trees["base"] = {"describe": "`/work/main` at def5678", "reps": base}
    return {
        "date": "2026-12-07",
        "command": "python -m bench.check",
        "machine": "test cpu, 2 cores",
        "load_before": "1.0 / 1.0 / 1.0",
        "load_after": "2.0 / 2.0 / 2.0",
        "minutes": 4.2,
        "settings": {
            "peers": 1000,
            "reps": len(this),
            "cr_writes": 100,
            "churn_writers": 4,
            "churn_seconds": 8.0,
            "pipeline_events": 20000,
        },
        "trees": trees,
        "profile": None,
    }


class TestTheBudget:
    def test_the_committed_budget_holds_the_issues_goals(self) -> None:
        budget = check.load_budget()
        assert {f: (limit.bound, limit.value) for f, limit in budget.items()} == {
            "p99_overhead_ms": ("max", 3.0),
            "cpu_vs_client_go": ("max", 1.0),
            "pipeline_events_per_s": ("min", 8000.0),
            "rss_mib": ("max", 60.0),
            "first_snapshot_s": ("max", 1.0),
        }

    def test_every_problem_is_reported_at_once(self) -> None:
        with pytest.raises(ValueError) as raised:
            check.parse_budget({"rss_mb": {"max": 1}, "rss_mib": {"max": 1, "min": 0}, "p99_overhead_ms": {"max": "3"}})
        message = str(raised.value)
        assert "rss_mb: not a figure" in message
        assert "rss_mib: give exactly one of max or min" in message
        assert "p99_overhead_ms: give exactly one" in message

    def test_comments_are_skipped(self, tmp_path: Any) -> None:
        path = tmp_path / "budget.json"
        path.write_text(json.dumps({"_about": "why", "rss_mib": {"max": 60}}))
        assert list(check.load_budget(path)) == ["rss_mib"]


class TestVerdicts:
    def test_a_bound_is_inclusive(self) -> None:
        at_most = check.Limit("rss_mib", "RSS", "max", 60.0)
        at_least = check.Limit("pipeline_events_per_s", "events/s", "min", 8000.0)
        assert [at_most.verdict(v) for v in (59.0, 60.0, 60.1, None)] == ["within", "within", "over", "not measured"]
        assert [at_least.verdict(v) for v in (8000.0, 7999.0)] == ["within", "over"]

    def test_cpu_is_judged_as_the_median_of_per_repetition_ratios_to_client_go(self) -> None:
        reps = [
            rep(cpu_ms_per_1000_events={"sidecar": 900.0, "raw-watch": 300.0, "client-go-informer": 1000.0}),
            rep(cpu_ms_per_1000_events={"sidecar": 1500.0, "raw-watch": 300.0, "client-go-informer": 1000.0}),
            rep(cpu_ms_per_1000_events={"sidecar": 1200.0, "raw-watch": 300.0, "client-go-informer": 1000.0}),
        ]
        summary = check.summarise(reps)
        assert summary["cpu_vs_client_go"] == pytest.approx(1.2)
        assert check.verdicts(summary, check.load_budget(), 1000)["cpu_vs_client_go"] == "over"

    def test_within_and_over(self) -> None:
        budget = check.load_budget()
        assert set(check.verdicts(check.summarise([rep()]), budget, 1000).values()) == {"within"}
        over = check.verdicts(check.summarise([rep(p99_overhead_ms=3.5, pipeline_events_per_s=5000.0)]), budget, 1000)
        assert over["p99_overhead_ms"] == "over"
        assert over["pipeline_events_per_s"] == "over"
        assert over["rss_mib"] == "within"

    def test_a_figure_a_run_did_not_produce_is_not_measured(self) -> None:
        summary = check.summarise([rep(p99_overhead_ms=None, rss_mib={})])
        found = check.verdicts(summary, check.load_budget(), 1000)
        assert found["p99_overhead_ms"] == "not measured"
        assert found["rss_mib"] == "not measured"


class TestMarkdown:
    def test_the_budget_table_shows_values_ratios_and_verdicts(self) -> None:
        text = check.render(run_record([rep(), rep(rss_mib={"sidecar": 70.0, "raw-watch": 10.0})]), check.load_budget())
        row = next(line for line in text.splitlines() if line.startswith("| RSS at 1,000 peers"))
        # median RSS 60.0 MiB: within; ratio to the raw watch is the median of 5.0 and 7.0.
        assert row == "| RSS at 1,000 peers (MiB) | 60.0 | 10.0 | 25.0 | 6.00 | 2.00 | ≤ 60 | within |"
        assert "| pipeline events/s (end to end) | 9,000 |  |  |  |  | ≥ 8,000 | within |" in text
        assert "Every budgeted figure is within budget." in text
        assert "## Before/after" not in text

    def test_over_budget_is_named(self) -> None:
        text = check.render(run_record([rep(first_snapshot_s={"sidecar": 1.4})]), check.load_budget())
        assert "| **over** |" in text
        assert "Over budget: process start to first synced snapshot (s)." in text

    def test_before_after_with_a_base(self) -> None:
        this = [rep(pipeline_events_per_s=9000.0), rep(pipeline_events_per_s=9000.0)]
        base = [rep(pipeline_events_per_s=6000.0), rep(pipeline_events_per_s=6000.0)]
        text = check.render(run_record(this, base), check.load_budget())
        assert "## Before/after: base `/work/main` at def5678" in text
        assert "| pipeline events/s (end to end) (sidecar) | 6,000 | 9,000 | 1.50 |" in text
        assert "| sidecar / client-go, CPU per 1,000 events | 0.90 | 0.90 | 1.00 |" in text
        assert "The base against the budget: Over budget: pipeline events/s, end to end." in text
        reps = text[text.index("## Every repetition") :].splitlines()
        # In the order they ran: this, base; base, this.
        assert [line.split(" | ")[1] for line in reps if line.startswith("| 1 ") or line.startswith("| 2 ")] == [
            "this",
            "base",
            "base",
            "this",
        ]

    def test_a_profile_is_summarised_or_its_error_shown(self) -> None:
        record = run_record([rep()])
        record["profile"] = {"error": "Permission denied (os error 13)"}
        assert "py-spy failed: `Permission denied (os error 13)`" in check.render(record, check.load_budget())
        record["profile"] = {
            "flags": ["--gil", "--native"],
            "file": "p.txt",
            "categories": {"GC": 4.5},
            "sampled_seconds": 2.0,
            "process_cpu_seconds": 3.0,
        }
        text = check.render(record, check.load_budget())
        assert "* 4.5% GC" in text
        assert "stand for 2.0 s holding the GIL; the process used 3.0 CPU-s" in text


def test_profile_samples_count_once_by_their_innermost_known_frame() -> None:
    collapsed = "\n".join(
        [
            "run (t.py);_watch (sidecar/kube/reflector.py);raw_decode (json/decoder.py);gc_collect_main (libpython) 3",
            "run (t.py);_watch (sidecar/kube/reflector.py);raw_decode (json/decoder.py) 5",
            "run (t.py);commit (sidecar/peers/hub.py);_write_to_self (asyncio/selector_events.py);send (libc.so.6) 2",
            "main (t.py) 10",
        ]
    )
    shares = {label.split(" (")[0]: share for label, share in categorise(collapsed).items()}
    assert list(shares.items()) == [
        ("JSON decoding", 25.0),
        ("GC", 15.0),
        ("thread-to-loop wake-ups", 10.0),
        ("other", 50.0),
    ]
