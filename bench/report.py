"""Turn bench/results.json into bench/RESULTS.md and bench/plots/*.png."""

from __future__ import annotations

import collections
import datetime
import json
import pathlib
import re
import statistics
import sys
from collections.abc import Iterator
from typing import Any

OBSERVERS = ["raw-watch", "client-go-informer", "kube-rs-reflector", "sidecar"]
TARGETS = {"kb_per_peer": 4.0}  # the memory slope's; the hot path's figures are bounded by bench/budget.json


def collapsed_stacks(collapsed: str) -> Iterator[tuple[list[str], int]]:
    """Each stack (outermost frame first) and its sample count from py-spy's raw, collapsed-stack output
    (``frame;frame;... count`` per line); other lines are skipped."""
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def summarise_profile(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed-stack) output."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in collapsed_stacks(collapsed):
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack]
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def rows(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(top)] if total else []

    text = [f"py-spy samples: {total}", "", "self time (% of samples):"]
    text += [f"  {share:5.1f}%  {frame}" for frame, share in rows(self_counts)]
    text += ["", "inclusive time (% of samples):"]
    text += [f"  {share:5.1f}%  {frame}" for frame, share in rows(inclusive)]
    return {"top_self": rows(self_counts), "top_inclusive": rows(inclusive), "text": "\n".join(text) + "\n"}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _latency_table(latency: dict[str, Any], kind: str) -> list[str]:
    rows = [
        "| watcher | p50 ms | p90 ms | p99 ms | max ms | missed | sidecar/watcher p50 | sidecar/watcher p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    side = latency[kind].get("sidecar", {})
    for name in OBSERVERS:
        stats = latency[kind].get(name)
        if not stats:
            continue
        ratio50 = side.get("p50") / stats["p50"] if stats.get("p50") else None
        ratio99 = side.get("p99") / stats["p99"] if stats.get("p99") else None
        rows.append(
            f"| {name} | {_fmt(stats.get('p50'), 2)} | {_fmt(stats.get('p90'), 2)} | "
            f"{_fmt(stats.get('p99'), 2)} | {_fmt(stats.get('max'), 2)} | {stats.get('missed', 0)} | "
            f"{_fmt(ratio50, 2)} | {_fmt(ratio99, 2)} |"
        )
    overhead = side.get("overhead_over_floor") or {}
    rows.append("")
    rows.append(
        f"Sidecar overhead over the raw watch, paired per write: p50 {_fmt(overhead.get('p50'), 2)} ms, "
        f"p90 {_fmt(overhead.get('p90'), 2)} ms, p99 {_fmt(overhead.get('p99'), 2)} ms "
        f"({overhead.get('n', 0)} writes)."
    )
    return rows


def _plots(results: dict[str, Any], plots: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(exist_ok=True)
    written = []
    for size, entry in results["sizes"].items():
        latency = entry.get("latency")
        if not latency:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, kind, title in ((axes[0], "cr_update", "CR update"), (axes[1], "readiness", "pod readiness")):
            for name in OBSERVERS:
                values = sorted(latency.get(f"{kind}_samples", {}).get(name, []))
                if values:
                    ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
            ax.set_xscale("log")
            ax.set_xlabel("write -> arrival (ms, log)")
            ax.set_ylabel("fraction of writes")
            ax.set_title(f"{title}, {size} peers")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = plots / f"latency-cdf-{size}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sizes = sorted(int(s) for s in results["sizes"])
    for name in OBSERVERS:
        ax.plot(sizes, [results["sizes"][str(s)]["rss_mb"].get(name, 0) for s in sizes], marker="o", label=name)
    ax.set_xlabel("peers")
    ax.set_ylabel("RSS after sync (MiB)")
    ax.set_title("memory against peers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "memory.png", dpi=110)
    plt.close(fig)
    written.append("memory.png")
    return written


def _per_size_table(results: dict[str, Any], title: str, metric: str, digits: int) -> list[str]:
    """A section with one row per peer count and one column per watcher, for a per-size metric."""
    lines = [f"## {title}", "", "| peers | " + " | ".join(OBSERVERS) + " |", "| --- |" + " --- |" * len(OBSERVERS)]
    for size in sorted(results["sizes"], key=int):
        values = results["sizes"][size][metric]
        lines.append(f"| {size} | " + " | ".join(_fmt(values.get(n), digits) for n in OBSERVERS) + " |")
    return lines


def slope_span(sizes: Any) -> tuple[int, int] | None:
    """The two peer counts the memory slope is taken between, or None when the run measured too few.

    From 1,000 peers (past start-up's fixed cost) to the largest count when a larger one was measured;
    otherwise from the smallest non-zero count to the largest. 0 peers is the runtime's floor, never an end.
    """
    counts = sorted(int(s) for s in sizes if int(s) > 0)
    if len(counts) < 2:
        return None
    low = 1000 if 1000 in counts and counts[-1] > 1000 else counts[0]
    return low, counts[-1]


def _slope_kb(results: dict[str, Any], name: str) -> float | None:
    """KiB of RSS per additional peer over ``slope_span``; None (shown as "-") when it cannot be computed."""
    sizes = results["sizes"]
    span = slope_span(sizes)
    if span is None:
        return None
    low, high = span
    low_rss = sizes[str(low)].get("rss_mb", {}).get(name)
    high_rss = sizes[str(high)].get("rss_mb", {}).get(name)
    if low_rss is None or high_rss is None:
        return None
    return float((high_rss - low_rss) * 1024 / (high - low))


def _slope_sentence(results: dict[str, Any]) -> str:
    span = slope_span(results["sizes"])
    if span is None:
        return (
            "Slope (KiB per additional peer): not measured (it needs two non-zero peer counts in `--sizes` or "
            "`--memory-sizes`)."
        )
    low, high = span
    return (
        f"Slope (KiB per additional peer, from {low:,} to {high:,}): "
        + ", ".join(f"{n} {_fmt(_slope_kb(results, n))}" for n in OBSERVERS)
        + "."
    )


def write(results: dict[str, Any], bench_dir: pathlib.Path) -> None:
    plots = _plots(results, bench_dir / "plots")
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` (`python -m bench`) on {datetime.date.fromtimestamp(results['started'])}; "
        f"raw numbers in `bench/results.json`. Run time {results['duration_seconds'] / 60:.0f} min.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}; {m['go']}; "
        f"{m['rustc']}. Control plane: Kubernetes {m['kubernetes']}, etcd {m['etcd']}, all on the same machine as "
        "the watchers (2 cores shared by etcd, kube-apiserver, kube-controller-manager, four watchers and the "
        "writer): absolute numbers are those of a loaded laptop-class box, ratios are the point.",
        "",
        "Watchers, side by side on the same API server, each observing every write:",
        "",
        "* `raw-watch`: the floor. A Go program doing LIST + WATCH over HTTP with minimal JSON decoding.",
        "* `client-go-informer`: client-go shared informers (typed EndpointSlices, dynamic CRs).",
        "* `kube-rs-reflector`: kube-rs `watcher` + `reflector` stores, the library Dynamo's and SGLang's "
        "Rust discovery use.",
        "* `sidecar`: a real `discovery-sidecar run` process; arrival is when the event reaches a WatchPeers "
        "client (the gRPC hop included).",
        "",
        f"Each latency figure is the median over {results['args']['rounds']} rounds of that round's percentile. "
        "CR update = server-side apply of `spec.data.seq` on one peer's CR. Pod readiness = one status PATCH "
        "of a pod's Ready condition; it reaches watchers through the EndpointSlice controller, so it includes "
        "that controller's latency for everyone.",
        "",
    ]
    for size, entry in sorted(results["sizes"].items(), key=lambda kv: int(kv[0])):
        if "latency" not in entry:
            continue
        lines += [f"## Propagation latency, {size} peers", "", "CR update:", ""]
        lines += _latency_table(entry["latency"], "cr_update")
        lines += ["", "Pod readiness:", ""]
        lines += _latency_table(entry["latency"], "readiness")
        lines += ["", f"![latency CDF]( plots/latency-cdf-{size}.png)".replace("( ", "("), ""]

    lines += _per_size_table(results, "Memory (RSS after the initial sync, MiB)", "rss_mb", 1)
    lines += [
        "",
        _slope_sentence(results),
        "",
        "![memory](plots/memory.png)",
        "",
    ]

    lines += _per_size_table(
        results, "Start-up (process start to first synced snapshot, seconds)", "startup_seconds", 2
    )

    churn = results["churn"]
    lines += [
        "",
        f"## Churn ({churn['peers']} peers, CR updates as fast as the writers go)",
        "",
        "| writers | writes/s achieved | watcher | events seen | lag p50 ms | lag p99 ms | lag p50 first fifth | "
        "lag p50 last fifth | CPU ms per 1,000 events |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in churn["runs"]:
        for name in OBSERVERS:
            r = run.get(name)
            if not r:
                continue
            lines.append(
                f"| {run['writers']} | {run['write_rate']:.0f} | {name} | {r['events_seen']} | "
                f"{_fmt(r['lag_ms'].get('p50'))} | {_fmt(r['lag_ms'].get('p99'))} | "
                f"{_fmt(r['lag_first_fifth_p50_ms'])} | {_fmt(r['lag_last_fifth_p50_ms'])} | "
                f"{_fmt(r['cpu_ms_per_1000_events'], 0)} |"
            )
    p = churn["pipeline"]
    lines += [
        "",
        "The API server on this machine accepts far fewer writes per second than the sidecar absorbs, so "
        "the sidecar's own capacity is measured separately (`bench/pipeline.py`): real watch-event JSON lines "
        "are decoded and applied exactly as the reflector does, and a WatchPeers client in another process "
        "receives the result.",
        "",
        f"* {p['peers']} peers, {p['events_fed']} CR updates, median of {len(p.get('runs', [p]))} runs: "
        f"applied at **{p['apply_rate_per_s']:.0f}/s**, "
        f"end to end (last event received by the client) **{p['end_to_end_rate_per_s']:.0f}/s**; "
        f"sidecar CPU {p['sidecar_cpu_ms_per_1000_events']:.0f} ms per 1,000 events; the client received "
        f"{p['events_streamed']} events (the rest coalesced per peer while it was behind).",
    ]
    profile = churn.get("profile") or {}
    if profile.get("categories"):
        lines += [
            "",
            "Where the sidecar's CPU goes under churn (py-spy `--gil --native`: only samples holding the GIL, so "
            "waiting is not counted; shares of those samples, each sample counted once by its innermost known "
            f"frame; full list in `bench/results/{profile['file']}`, see docs/benchmarks.md):",
            "",
        ]
        lines += [f"* {share}% {label}" for label, share in profile["categories"].items()]
    elif profile.get("top_self"):
        lines += [
            "",
            "Where the sidecar's time goes under churn (py-spy, self time, top entries; full list in "
            f"`bench/results/{profile['file']}`):",
            "",
        ]
        lines += [f"* {share}% {frame}" for frame, share in profile["top_self"][:10]]
    elif profile:
        lines += ["", f"Profile: {profile.get('error')}"]

    restart = results["restart"]
    lines += [
        "",
        "## Recovery after a kube-apiserver restart",
        "",
        f"With {restart['peers']} peers: the API server took {restart['apiserver_restart_seconds']:.1f} s to "
        f"come back; the sidecar's stream reported CONNECTED again "
        f"{restart['sidecar_recovery_after_apiserver_ready_seconds']:.2f} s after the API server was ready, "
        f"with {restart['relists']:.0f} relist(s) (a relist happens when the watch cache no longer holds the "
        "sidecar's resourceVersion; otherwise the watches resume).",
    ]

    cost = results["cost"]
    lines += [
        "",
        f"## API server cost ({cost['peers']} peers)",
        "",
        "Bytes each watcher received from the API server (TLS bytes, through a counting proxy):",
        "",
        "| phase | seconds | " + " | ".join(OBSERVERS) + " | sidecar requests |",
        "| --- | --- |" + " --- |" * len(OBSERVERS) + " --- |",
    ]
    for phase in ("idle_60s", "rolling_restart"):
        c = cost[phase]
        lines.append(
            f"| {phase} | {c['seconds']:.0f} | "
            + " | ".join(f"{c['bytes_from_apiserver'].get(n, 0) / 1024:.0f} KiB" for n in OBSERVERS)
            + f" | {c['sidecar_requests']:.0f} |"
        )
    lines += ["", "See `bench/COST_MODEL.md` for what this means for a whole cluster.", ""]

    lines += _targets(results)
    lines += _analysis(results)
    lines += ["", "Plots: " + ", ".join(f"`plots/{p}`" for p in plots), ""]
    path = bench_dir / "RESULTS.md"
    # The etcd backend's section (python -m bench.etcd) is another run's: keep it after this report.
    marker = "<!-- etcd backend: python -m bench.etcd -->"
    previous = path.read_text() if path.exists() else ""
    etcd_section = previous[previous.index(marker) :] if marker in previous else ""
    path.write_text("\n".join(lines) + ("\n\n" + etcd_section if etcd_section else ""))


def _analysis(results: dict[str, Any]) -> list[str]:
    """Where the sidecar loses to the baselines, why, and what was done about it."""
    sizes = results["sizes"]
    idle = sizes.get("0", {})
    rss0 = idle.get("rss_mb", {})
    start0 = idle.get("startup_seconds", {})
    return [
        "",
        "## Where the sidecar loses, and why",
        "",
        f"* **Fixed cost of the runtime.** With no peers at all the sidecar's RSS is {_fmt(rss0.get('sidecar'))} MiB "
        f"(Go raw watch {_fmt(rss0.get('raw-watch'))}, kube-rs {_fmt(rss0.get('kube-rs-reflector'))}) and it takes "
        f"{_fmt(start0.get('sidecar'), 2)} s to its first snapshot ({_fmt(start0.get('raw-watch'), 2)} s). Measured "
        "by import: the interpreter ~10 MiB, grpcio ~20 MiB, the official `kubernetes` client ~33 MiB and ~0.5 s "
        "(its package imports its kubeconfig support: google-auth, oauthlib, requests, pydantic). This floor is "
        "why the 70 MiB and 1 s targets at 1k peers are missed; it does not grow with peers.",
        "* **Per peer.** The retained state is ~4.4 KiB of Python heap per peer (tracemalloc: the join's records, "
        "`spec.data` kept as parsed JSON, the log entry, the encoded message). RSS grows faster because "
        "decoding a list leaves a high-water mark: lists are now reduced to compact records page by page and "
        "the heap is trimmed after each relist, which cut the slope from ~19 to the figure above.",
        "* **Per event.** A Python process decodes each watch event (TLS in `ssl`, JSON, the join, the log) and "
        "then encodes it for gRPC; the baselines only decode. That is the ~2-4 ms p50 overhead over the raw watch "
        "and the higher CPU per 1,000 events under churn. Fixed along the way (profile first, then measured): "
        "instance IDs cached per name (pure-Python SipHash cost ~50 us per event), canonical JSON of `spec.data` "
        "computed only when needed (exact equality kept), each peer's protobuf encoded once and shared by all "
        "clients, Prometheus label children resolved once, lists parsed page by page. A hand-written Struct "
        "encoder was tried and dropped: cProfile blamed `Struct.update`, but timed without the profiler it was no "
        "faster.",
        "* **Found by these benchmarks:** at 10,000 peers the first snapshot (~10 MiB) exceeded gRPC's default 4 MiB "
        "message limit and never arrived. Snapshots and deltas are now sent in parts (`partial`).",
        "* **Noise.** Everything shares 2 cores; between two full runs the p99 overhead at 1k peers moved between "
        "~4 and ~8 ms and pipeline capacity (median of three) between ~3,800 and ~5,600 events/s, "
        "single runs from ~3,100. Medians over rounds (and over "
        "three pipeline runs) are reported; compare ratios within one run rather than across runs.",
    ]


def _churn_cpu_vs_client_go(results: dict[str, Any]) -> float | None:
    """The median, over the churn runs, of the sidecar's CPU per 1,000 events over the client-go informer's in
    the same run (the budget's ``cpu_vs_client_go``)."""
    ratios = []
    for run in results.get("churn", {}).get("runs", []):
        sidecar = (run.get("sidecar") or {}).get("cpu_ms_per_1000_events")
        informer = (run.get("client-go-informer") or {}).get("cpu_ms_per_1000_events")
        if sidecar is not None and informer:
            ratios.append(sidecar / informer)
    return statistics.median(ratios) if ratios else None


def _targets(results: dict[str, Any]) -> list[str]:
    """The figures of this run at 1,000 peers against the hot path's budget (bench/budget.json, the goals of
    issue 22, which ``make bench-check`` also reads), and the memory slope against its own target."""
    from bench.check import load_budget

    budget = load_budget()
    at_1k = results["sizes"].get("1000", {})
    overhead = (
        (((at_1k.get("latency") or {}).get("cr_update") or {}).get("sidecar") or {})
        .get("overhead_over_floor", {})
        .get("p99")
    )
    measured: dict[str, float | None] = {
        "p99_overhead_ms": overhead,
        "cpu_vs_client_go": _churn_cpu_vs_client_go(results),
        "pipeline_events_per_s": (results["churn"].get("pipeline") or {}).get("end_to_end_rate_per_s"),
        "rss_mib": at_1k.get("rss_mb", {}).get("sidecar"),
        "first_snapshot_s": at_1k.get("startup_seconds", {}).get("sidecar"),
    }
    out = [
        "## Targets",
        "",
        "The hot path's budget (`bench/budget.json`, also read by `make bench-check`), at 1,000 peers:",
        "",
        "| target | aim | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for figure, limit in budget.items():
        value = measured.get(figure)
        verdict = {"within": "yes", "over": "no"}.get(limit.verdict(value), "not measured")
        out.append(f"| {limit.label} | {limit.aim()} | {_fmt(value, 2)} | {verdict} |")
    slope = _slope_kb(results, "sidecar")
    met = "not measured" if slope is None else ("yes" if slope <= TARGETS["kb_per_peer"] else "no")
    out.append(f"| KiB per additional peer | ≤ {TARGETS['kb_per_peer']:g} | {_fmt(slope, 2)} | {met} |")
    return out


if __name__ == "__main__":
    here = pathlib.Path(__file__).resolve().parent
    write(json.loads((here / (sys.argv[1] if len(sys.argv) > 1 else "results.json")).read_text()), here)
