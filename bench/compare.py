"""Compare two ``python -m bench --quick`` result files side by side (before/after a change).

``python -m bench.compare BEFORE.json AFTER.json`` prints the sidecar's figures from each run and their
ratio: start-up, RSS, CR-update latency overhead over the raw watch, and pipeline capacity.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def figures(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for size, phase in results["sizes"].items():
        out[f"startup s (N={size})"] = phase["startup_seconds"]["sidecar"]
        out[f"RSS MiB (N={size})"] = phase["rss_mb"]["sidecar"]
        latency = phase.get("latency", {}).get("cr_update", {}).get("sidecar")
        if latency:
            out[f"CR update overhead p50 ms (N={size})"] = latency["overhead_over_floor"]["p50"]
            out[f"CR update overhead p99 ms (N={size})"] = latency["overhead_over_floor"]["p99"]
    pipeline = results["churn"]["pipeline"]
    out["pipeline events/s (median)"] = pipeline["end_to_end_rate_per_s"]
    out["pipeline CPU ms / 1000 events"] = pipeline["sidecar_cpu_ms_per_1000_events"]
    return out


def main(before_path: str, after_path: str) -> int:
    with open(before_path) as f:
        before = figures(json.load(f))
    with open(after_path) as f:
        after = figures(json.load(f))
    print("| figure | before | after | after/before |\n| --- | ---: | ---: | ---: |")
    for name, value in before.items():
        new = after.get(name)
        if new is None:
            continue
        ratio = f"{new / value:.2f}" if value else "-"
        print(f"| {name} | {value:.2f} | {new:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
