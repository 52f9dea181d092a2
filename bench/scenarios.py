"""The measurements. Each returns plain dicts that bench/report.py turns into RESULTS.md and plots.

Latency samples are paired: every write is observed by every watcher, so the sidecar's overhead over
the floor (the raw watch) is computed per write and summarised, which cancels the noise of the shared
2-core machine far better than comparing two separate distributions.
"""

from __future__ import annotations

import datetime
import random
import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from bench.observers import Observer, Record, SidecarObserver
from bench.workload import NAMESPACE, Workload
from devcluster.objects import PODS

Matcher = Callable[[Record], bool]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"n": len(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median across repeated rounds of each summary statistic."""
    keys = [k for k in ("p50", "p90", "p99", "max") if all(k in r for r in rounds)]
    result = {k: statistics.median(r[k] for r in rounds) for k in keys}
    result["n"] = sum(r.get("n", 0) for r in rounds)
    return result


def observe_write(
    observers: Sequence[Observer], write: Callable[[], None], matchers: dict[str, Matcher], timeout: float = 15.0
) -> dict[str, float | None]:
    """Do one write; return each observer's latency in ms (None: not seen within the timeout)."""
    started = time.time_ns()
    write()
    latencies: dict[str, float | None] = {}
    for observer in observers:
        record = observer.wait_for(matchers[observer.name], started, timeout)
        latencies[observer.name] = None if record is None else (record.t - started) / 1e6
    return latencies


def cr_update_matchers(observers: Sequence[Observer], name: str, seq: int) -> dict[str, Matcher]:
    def for_observer(observer: Observer) -> Matcher:
        if isinstance(observer, SidecarObserver):
            return lambda r: r.src == "peer" and r.name == name and r.seq == seq and r.type != "REMOVED"
        return lambda r: r.src == "dynamoworkermetadatas" and r.name == name and r.seq == seq

    return {o.name: for_observer(o) for o in observers}


def readiness_matchers(observers: Sequence[Observer], name: str, slice_name: str, ready: bool) -> dict[str, Matcher]:
    def for_observer(observer: Observer) -> Matcher:
        if isinstance(observer, SidecarObserver):
            wanted = "ADDED" if ready else "REMOVED"
            return lambda r: r.src == "peer" and r.name == name and r.type == wanted
        return lambda r: (
            r.src == "endpointslices" and r.name == slice_name and r.ready is not None and (name in r.ready) == ready
        )

    return {o.name: for_observer(o) for o in observers}


def patch_ready(workload: Workload, name: str, ready: bool) -> None:
    """One PATCH of the pod's status, as a kubelet reports a readiness change."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    state = "True" if ready else "False"
    conditions = [
        {"type": t, "status": s, "lastTransitionTime": now}
        for t, s in (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", state), ("Ready", state))
    ]
    workload.cluster.api.request(
        "PATCH",
        PODS.item(NAMESPACE, name) + "/status",
        body={"status": {"conditions": conditions}},
        content_type="application/merge-patch+json",
    )


def latency_round(
    workload: Workload, observers: Sequence[Observer], cr_writes: int, toggles: int, rng: random.Random
) -> dict[str, Any]:
    names = sorted(workload.pods)
    slices = workload.slice_of()
    samples: dict[str, dict[str, list[float | None]]] = {"cr_update": {}, "readiness": {}}
    for kind in samples:
        for observer in observers:
            samples[kind][observer.name] = []
    for _ in range(cr_writes):
        name = rng.choice(names)
        seq = workload.next_seq()
        result = observe_write(
            observers,
            lambda n=name, q=seq: workload.write_cr(workload.pods[n], q),
            cr_update_matchers(observers, name, seq),
        )
        for observer_name, value in result.items():
            samples["cr_update"][observer_name].append(value)
    for _ in range(toggles):
        name = rng.choice(names)
        for ready in (False, True):
            result = observe_write(
                observers,
                lambda n=name, r=ready: patch_ready(workload, n, r),
                readiness_matchers(observers, name, slices.get(name, ""), ready),
            )
            for observer_name, value in result.items():
                samples["readiness"][observer_name].append(value)
    return samples


def summarise_latency(rounds: list[dict[str, Any]], floor: str = "raw-watch") -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in ("cr_update", "readiness"):
        per_observer: dict[str, Any] = {}
        observers = rounds[0][kind].keys()
        for name in observers:
            per_round = [percentiles([v for v in r[kind][name] if v is not None]) for r in rounds]
            missed = sum(1 for r in rounds for v in r[kind][name] if v is None)
            per_observer[name] = {**median_of(per_round), "missed": missed}
            if name != floor:
                diffs_per_round = []
                for r in rounds:
                    pairs = zip(r[kind][name], r[kind][floor], strict=True)
                    diffs_per_round.append(percentiles([a - b for a, b in pairs if a is not None and b is not None]))
                per_observer[name]["overhead_over_floor"] = median_of(diffs_per_round)
        summary[kind] = per_observer
        summary[f"{kind}_samples"] = {
            name: [v for r in rounds for v in r[kind][name] if v is not None] for name in observers
        }
    return summary


# -- churn ------------------------------------------------------------------------------------------------
def churn(workload: Workload, observers: Sequence[Observer], writers: int, seconds: float) -> dict[str, Any]:
    """CR updates as fast as ``writers`` threads can issue them; lag growth and CPU per 1000 events."""
    names = sorted(workload.pods)
    writes: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    cpu_before = {o.name: o.cpu_seconds() for o in observers}

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            name = rng.choice(names)
            seq = workload.next_seq()
            started = time.time_ns()
            workload.write_cr(workload.pods[name], seq)
            with lock:
                writes.append((name, seq, started))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    window_start = time.time_ns()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window_end = time.time_ns()
    last_name, last_seq, _ = max(writes, key=lambda w: w[1])
    result: dict[str, Any] = {
        "writers": writers,
        "seconds": seconds,
        "writes": len(writes),
        "write_rate": len(writes) / ((window_end - window_start) / 1e9),
    }
    for observer in observers:
        matcher = cr_update_matchers([observer], last_name, last_seq)[observer.name]
        observer.wait_for(matcher, window_start, 30)
        arrivals = _arrivals(observer, window_start)
        lags = [(t0, (arrivals[(n, s)] - t0) / 1e6) for n, s, t0 in writes if (n, s) in arrivals]
        lags.sort()
        fifth = max(1, len(lags) // 5)
        first = [lag for _, lag in lags[:fifth]]
        last = [lag for _, lag in lags[-fifth:]]
        events = len(lags)
        cpu = observer.cpu_seconds() - cpu_before[observer.name]
        result[observer.name] = {
            "events_seen": events,
            "missed": len(writes) - events,
            "lag_ms": percentiles([lag for _, lag in lags]),
            "lag_first_fifth_p50_ms": statistics.median(first) if first else None,
            "lag_last_fifth_p50_ms": statistics.median(last) if last else None,
            "cpu_seconds": cpu,
            "cpu_ms_per_1000_events": (cpu * 1000 / events * 1000) if events else None,
        }
    return result


def _arrivals(observer: Observer, after_ns: int) -> dict[tuple[str, int], int]:
    arrivals: dict[tuple[str, int], int] = {}
    wanted = "peer" if isinstance(observer, SidecarObserver) else "dynamoworkermetadatas"
    for record in list(observer.records):
        if record.t >= after_ns and record.src == wanted and record.seq is not None:
            arrivals.setdefault((record.name, record.seq), record.t)
    return arrivals


# -- sidecar metrics --------------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    """Sum of each metric family's samples on a sidecar's /metrics (labels folded)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for match in re.finditer(r"^([a-z_]+)(?:\{[^}]*\})? (\S+)$", text, re.M):
        totals[match.group(1)] = totals.get(match.group(1), 0.0) + float(match.group(2))
    return totals
