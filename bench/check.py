"""``make bench-check`` (``python -m bench.check``): the hot path against its budget, in a few minutes.

A short, fixed scenario on one local control plane: ``--peers`` peers (1,000), then ``--reps`` repetitions
of: a sidecar, the raw watch and the client-go informer started together (time to the first synced
snapshot, RSS after the sync), ``--cr-writes`` CR updates each observed by all three (the sidecar's p99
overhead over the raw watch, paired per write), and ``--churn-seconds`` of CR updates from
``--churn-writers`` threads (CPU per 1,000 events). Then, with the control plane stopped, the sidecar's
pipeline capacity (``bench.pipeline``) once per repetition. Figures are medians over the repetitions;
ratios are taken within each repetition (same writes, same moment) and their median reported.

The result is compared with ``bench/budget.json`` and written as markdown to
``bench/comparisons/<date>-bench-check.md`` (or ``--out``). It is a benchmark, not a test: the exit status
is 0 whether or not a figure is over budget, unless the run itself failed or ``--strict`` is given.

``--base DIR`` measures another checkout (a worktree of main, say) in the same session, alternately with
this one (this, base, this, base, ...), so that a change is shown before/after as ratios. ``--profile``
attaches py-spy (``bench.profiling``, CPU only) to this checkout's sidecar under churn after the last
repetition and writes ``bench/results/sidecar-profile-gil.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BENCH_DIR = pathlib.Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
BUDGET = BENCH_DIR / "budget.json"
PROFILE_SECONDS = 20

RAW, CLIENT_GO, SIDECAR = "raw-watch", "client-go-informer", "sidecar"
WATCHERS = (SIDECAR, RAW, CLIENT_GO)
# The figures a budget may bound, in the order they are reported.
FIGURES = ("p99_overhead_ms", "cpu_vs_client_go", "pipeline_events_per_s", "rss_mib", "first_snapshot_s")


# -- the budget (pure) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """One figure's bound from bench/budget.json: at most (``max``) or at least (``min``) ``value``."""

    figure: str
    label: str
    bound: str  # "max" or "min"
    value: float

    def verdict(self, measured: float | None) -> str:
        if measured is None:
            return "not measured"
        within = measured <= self.value if self.bound == "max" else measured >= self.value
        return "within" if within else "over"

    def aim(self) -> str:
        number = f"{self.value:,.0f}" if self.value >= 1000 else f"{self.value:g}"
        return f"{'≤' if self.bound == 'max' else '≥'} {number}"


def parse_budget(document: Mapping[str, Any]) -> dict[str, Limit]:
    """Limits by figure; keys starting with ``_`` are comments. Every problem is reported at once."""
    limits: dict[str, Limit] = {}
    problems = []
    for figure, spec in document.items():
        if figure.startswith("_"):
            continue
        if figure not in FIGURES:
            problems.append(f"{figure}: not a figure bench.check measures ({', '.join(FIGURES)})")
            continue
        bounds = [b for b in ("max", "min") if b in spec] if isinstance(spec, Mapping) else []
        if len(bounds) != 1 or isinstance(spec[bounds[0]], bool) or not isinstance(spec[bounds[0]], int | float):
            problems.append(f"{figure}: give exactly one of max or min, a number")
            continue
        limits[figure] = Limit(figure, str(spec.get("label", figure)), bounds[0], float(spec[bounds[0]]))
    if problems:
        raise ValueError("bench budget: " + "; ".join(problems))
    return limits


def load_budget(path: pathlib.Path = BUDGET) -> dict[str, Limit]:
    return parse_budget(json.loads(path.read_text()))


# -- summaries (pure) -----------------------------------------------------------------------------------
def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over one tree's repetitions; each ratio to a baseline is the median of per-repetition ratios.

    A repetition holds ``p99_overhead_ms`` and ``pipeline_events_per_s`` / ``pipeline_cpu_ms_per_1000_events``
    (numbers or None) and ``cr_p99_ms``, ``cpu_ms_per_1000_events``, ``rss_mib``, ``first_snapshot_s``
    (per watcher).
    """
    summary: dict[str, Any] = {"reps": len(reps)}
    for key in ("p99_overhead_ms", "pipeline_events_per_s", "pipeline_cpu_ms_per_1000_events"):
        summary[key] = _median(r.get(key) for r in reps)
    for key in ("cr_p99_ms", "cpu_ms_per_1000_events", "rss_mib", "first_snapshot_s"):
        per_watcher = [r.get(key) or {} for r in reps]
        summary[key] = {w: _median(p.get(w) for p in per_watcher) for w in WATCHERS}
        summary[f"{key}_ratio"] = {
            w: _median(_ratio(p.get(SIDECAR), p.get(w)) for p in per_watcher) for w in (RAW, CLIENT_GO)
        }
    summary["cpu_vs_client_go"] = summary["cpu_ms_per_1000_events_ratio"][CLIENT_GO]
    return summary


@dataclass(frozen=True)
class Row:
    """One line of the budget table: a figure per watcher (or the sidecar's own) and what the budget judges."""

    label: str
    values: dict[str, float | None]  # by watcher; the sidecar's alone for its own figures
    ratios: dict[str, float | None]  # the sidecar's over the raw watch and client-go
    figure: str | None = None  # the budget's figure this row is judged on, if any
    judged: float | None = None  # the value the budget compares
    digits: int = 1


def rows(summary: Mapping[str, Any], peers: int) -> list[Row]:
    def per_watcher(key: str, label: str, figure: str | None = None, digits: int = 1) -> Row:
        values = summary[key]
        judged = summary[figure] if figure == "cpu_vs_client_go" else values[SIDECAR]
        return Row(label, dict(values), dict(summary[f"{key}_ratio"]), figure, judged if figure else None, digits)

    def own(key: str, label: str, figure: str | None = None, digits: int = 1) -> Row:
        return Row(label, {SIDECAR: summary[key]}, {}, figure, summary[key] if figure else None, digits)

    return [
        per_watcher("cr_p99_ms", f"p99 CR-update latency at {peers:,} peers (ms)", digits=2),
        own("p99_overhead_ms", "p99 overhead over the raw watch, paired per write (ms)", "p99_overhead_ms", 2),
        per_watcher("cpu_ms_per_1000_events", "CPU ms per 1,000 events under churn", "cpu_vs_client_go", 0),
        own("pipeline_events_per_s", "pipeline events/s (end to end)", "pipeline_events_per_s", 0),
        own("pipeline_cpu_ms_per_1000_events", "pipeline CPU ms per 1,000 events", digits=0),
        per_watcher("rss_mib", f"RSS at {peers:,} peers (MiB)", "rss_mib"),
        per_watcher("first_snapshot_s", "first synced snapshot (s)", "first_snapshot_s", 2),
    ]


def verdicts(summary: Mapping[str, Any], budget: Mapping[str, Limit], peers: int) -> dict[str, str]:
    """Each budgeted figure's verdict: within, over, or not measured."""
    judged = {r.figure: r.judged for r in rows(summary, peers) if r.figure}
    return {figure: limit.verdict(judged.get(figure)) for figure, limit in budget.items()}


# -- markdown (pure) ------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def budget_table(summary: Mapping[str, Any], budget: Mapping[str, Limit], peers: int) -> list[str]:
    lines = [
        "| figure | sidecar | raw watch | client-go informer | sidecar / raw watch | sidecar / client-go | budget "
        "| verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows(summary, peers):
        limit = budget.get(row.figure) if row.figure else None
        aim = verdict = ""
        if limit is not None:
            aim = limit.aim() + (" × client-go" if row.figure == "cpu_vs_client_go" else "")
            verdict = limit.verdict(row.judged)
        cells = [
            row.label,
            _num(row.values.get(SIDECAR), row.digits),
            _num(row.values.get(RAW), row.digits) if RAW in row.values else "",
            _num(row.values.get(CLIENT_GO), row.digits) if CLIENT_GO in row.values else "",
            _num(row.ratios.get(RAW), 2) if RAW in row.ratios else "",
            _num(row.ratios.get(CLIENT_GO), 2) if CLIENT_GO in row.ratios else "",
            aim,
            f"**{verdict}**" if verdict == "over" else verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def over_sentence(summary: Mapping[str, Any], budget: Mapping[str, Limit], peers: int) -> str:
    found = verdicts(summary, budget, peers)
    over = [budget[f].label for f, v in found.items() if v == "over"]
    missing = [budget[f].label for f, v in found.items() if v == "not measured"]
    parts = [f"Over budget: {'; '.join(over)}." if over else "Every budgeted figure is within budget."]
    if missing:
        parts.append(f"Not measured: {'; '.join(missing)}.")
    return " ".join(parts)


def before_after_table(this: Mapping[str, Any], base: Mapping[str, Any], peers: int) -> list[str]:
    lines = ["| figure | base | this | this / base |", "| --- | ---: | ---: | ---: |"]
    for new, old in zip(rows(this, peers), rows(base, peers), strict=True):
        pairs = [(new.label + " (sidecar)", old.values.get(SIDECAR), new.values.get(SIDECAR), new.digits)]
        if new.figure == "cpu_vs_client_go":
            pairs.append(("sidecar / client-go, CPU per 1,000 events", old.judged, new.judged, 2))
        for label, before, after, digits in pairs:
            lines.append(
                f"| {label} | {_num(before, digits)} | {_num(after, digits)} | {_num(_ratio(after, before), 2)} |"
            )
    return lines


def reps_table(trees: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| rep | tree | raw watch p99 ms | p99 overhead ms | sidecar CPU ms / 1k ev | client-go CPU ms / 1k ev "
        "| churn writes/s | pipeline events/s | sidecar RSS MiB | first snapshot s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    count = max((len(t["reps"]) for t in trees.values()), default=0)
    for index in range(count):
        names = list(trees) if index % 2 == 0 else list(trees)[::-1]  # in the order they ran
        for name in names:
            tree = trees[name]
            if index >= len(tree["reps"]):
                continue
            r = tree["reps"][index]
            cpu = r.get("cpu_ms_per_1000_events") or {}
            lines.append(
                f"| {index + 1} | {name} | {_num((r.get('cr_p99_ms') or {}).get(RAW), 2)} | "
                f"{_num(r.get('p99_overhead_ms'), 2)} | {_num(cpu.get(SIDECAR), 0)} | "
                f"{_num(cpu.get(CLIENT_GO), 0)} | {_num(r.get('churn_write_rate'), 0)} | "
                f"{_num(r.get('pipeline_events_per_s'), 0)} | {_num((r.get('rss_mib') or {}).get(SIDECAR))} | "
                f"{_num((r.get('first_snapshot_s') or {}).get(SIDECAR), 2)} |"
            )
    return lines


def render(run: Mapping[str, Any], budget: Mapping[str, Limit]) -> str:
    """The whole markdown report of one ``bench.check`` run (``run`` as ``main`` records it)."""
    peers = run["settings"]["peers"]
    trees = run["trees"]
    this = summarise(trees["this"]["reps"])
    lines = [
        f"# bench-check, {run['date']}",
        "",
        f"`{run['command']}` on {run['machine']}; load average {run['load_before']} before, "
        f"{run['load_after']} after; {run['minutes']:.1f} min. Scenario: {peers:,} peers, "
        f"{run['settings']['reps']} repetitions of start-up, {run['settings']['cr_writes']} CR updates and "
        f"{run['settings']['churn_seconds']:g} s of churn from {run['settings']['churn_writers']} writers, then "
        f"the pipeline ({run['settings']['pipeline_events']:,} events) once per repetition with the control plane "
        "stopped. Medians over the repetitions; a ratio is taken within each repetition, then its median. "
        "Latencies swing with the machine's load (the raw watch's own p99 is in the last table): read them "
        "against the budget on a quiet machine, and between trees only within one run.",
        "",
        f"## This tree ({trees['this']['describe']}) against the budget (`bench/budget.json`)",
        "",
        *budget_table(this, budget, peers),
        "",
        over_sentence(this, budget, peers),
    ]
    if "base" in trees:
        base = summarise(trees["base"]["reps"])
        lines += [
            "",
            f"## Before/after: base {trees['base']['describe']}, measured alternately with this tree",
            "",
            *before_after_table(this, base, peers),
            "",
            f"The base against the budget: {over_sentence(base, budget, peers)}",
        ]
    lines += ["", "## Every repetition", "", *reps_table(trees)]
    profile = run.get("profile")
    if profile:
        lines += ["", "## Profile (py-spy, this tree's sidecar under churn)", ""]
        if profile.get("error"):
            lines.append(f"py-spy failed: `{profile['error']}`")
        else:
            lines.append(
                f"`py-spy record {' '.join(profile['flags'])}`: shares of the samples holding the GIL (waiting is "
                "not counted), each sample counted once by its innermost known frame; "
                f"`bench/results/{profile['file']}`. The samples stand for {profile['sampled_seconds']:.1f} s "
                f"holding the GIL; the process used {profile['process_cpu_seconds']:.1f} CPU-s meanwhile."
            )
            lines += [""] + [f"* {share}% {label}" for label, share in profile["categories"].items()]
    return "\n".join(lines) + "\n"


# -- the run ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """A checkout whose sidecar (and pipeline) is measured, run by its own venv's Python when it has one."""

    name: str
    path: pathlib.Path

    @property
    def python(self) -> str:
        own = self.path / ".venv" / "bin" / "python"
        return str(own) if own.exists() else sys.executable

    def describe(self) -> str:
        def git(*argv: str) -> str:
            done = subprocess.run(["git", "-C", str(self.path), *argv], capture_output=True, text=True)
            return done.stdout.strip()

        commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
        where = "" if self.path == ROOT else f"`{self.path}` "
        return f"{where}at {commit}{dirty}"


def _tree_sidecar(process: Any, tree: Tree) -> Any:
    """The same sidecar launch, but of ``tree``'s code with ``tree``'s Python (its directory first on the path)."""
    from devcluster.sidecars import SidecarProcess

    @dataclass
    class TreeSidecar(SidecarProcess):
        python: str = sys.executable

        def command(self) -> list[str]:
            return [self.python, "-m", "sidecar.app.cli", "run"]

    fields = {f.name: getattr(process, f.name) for f in dataclasses.fields(process)}
    return TreeSidecar(**{**fields, "build": tree.path}, python=tree.python)


def say(message: str) -> None:
    print(f"[bench-check] {message}", file=sys.stderr, flush=True)


def measure(bench: Any, tree: Tree, args: argparse.Namespace, rng: random.Random, profile: bool) -> dict[str, Any]:
    """One repetition for ``tree``: start-up and RSS, paired CR-update latency, churn CPU (and a profile)."""
    from bench import profiling, scenarios
    from bench.observers import SidecarObserver

    observers = [o for o in bench.observers() if o.name in WATCHERS]
    for index, observer in enumerate(observers):
        if isinstance(observer, SidecarObserver):
            observers[index] = SidecarObserver(_tree_sidecar(observer.sidecar, tree))
    result: dict[str, Any] = {}
    try:
        startup = bench.start_observers(observers)
        time.sleep(2)  # let start-up garbage settle before reading RSS, as `python -m bench` does
        result["first_snapshot_s"] = startup
        result["rss_mib"] = {o.name: o.rss_bytes() / 2**20 for o in observers}
        latency = scenarios.summarise_latency(
            [scenarios.latency_round(bench.workload, observers, args.cr_writes, 0, rng)]
        )["cr_update"]
        result["cr_p99_ms"] = {name: stats.get("p99") for name, stats in latency.items()}
        result["p99_overhead_ms"] = latency[SIDECAR].get("overhead_over_floor", {}).get("p99")
        churn = scenarios.churn(bench.workload, observers, args.churn_writers, args.churn_seconds)
        result["churn_write_rate"] = churn["write_rate"]
        result["cpu_ms_per_1000_events"] = {name: churn[name]["cpu_ms_per_1000_events"] for name in WATCHERS}
        if profile:
            sidecar = next(o for o in observers if isinstance(o, SidecarObserver))
            assert sidecar.process is not None
            say(f"{tree.name}: py-spy on the sidecar under churn")
            result["profile"] = profiling.profile(
                sidecar.process.pid,
                bench.work,
                BENCH_DIR / "results",
                profiling.GIL,
                seconds=PROFILE_SECONDS,
                load=lambda: scenarios.churn(bench.workload, [sidecar], args.churn_writers, PROFILE_SECONDS),
            )
    finally:
        bench.stop_observers(observers)
    return result


def pipeline_run(tree: Tree, peers: int, events: int) -> dict[str, Any]:
    """``bench.pipeline.run`` of ``tree``'s code, in a process of its own (its directory first on the path)."""
    code = f"import json; from bench import pipeline; print(json.dumps(pipeline.run(peers={peers}, events={events})))"
    from bench.alternate import run_json

    return run_json(tree.python, code, tree.path, env={**os.environ, "PYTHONPATH": str(tree.path)})


def _load() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.__main__ import Bench, machine

    trees = [Tree("this", ROOT)] + ([Tree("base", pathlib.Path(args.base).resolve())] if args.base else [])
    for tree in trees:
        if not (tree.path / "sidecar" / "app" / "cli.py").exists():
            raise SystemExit(f"bench-check: {tree.path} is not a checkout of this project (no sidecar/app/cli.py)")
    reps: dict[str, list[dict[str, Any]]] = {t.name: [] for t in trees}
    profile: dict[str, Any] | None = None
    started = time.time()
    load_before = _load()
    rng = random.Random(20261207)
    with tempfile.TemporaryDirectory(prefix="discovery-bench-check-") as tmp:
        bench = Bench(pathlib.Path(tmp), args)
        try:
            bench.start()
            assert bench.workload is not None
            bench.workload.grow_to(args.peers, log=say)
            for index in range(args.warmup):
                # The plane is still busy with the new peers (EndpointSlices, garbage collection): not counted.
                say(f"warm-up {index + 1}/{args.warmup}: {trees[0].name}")
                measure(bench, trees[0], args, rng, profile=False)
            for index in range(args.reps):
                # this, base; base, this; ...: neither tree always follows the other's churn.
                for tree in trees if index % 2 == 0 else trees[::-1]:
                    say(f"repetition {index + 1}/{args.reps}: {tree.name}")
                    last = index == args.reps - 1
                    result = measure(bench, tree, args, rng, profile=args.profile and last and tree.name == "this")
                    profile = result.pop("profile", profile)
                    reps[tree.name].append(result)
        finally:
            bench.stop()
    say("pipeline capacity (control plane stopped), alternately")
    for index in range(args.reps):
        for tree in trees if index % 2 == 0 else trees[::-1]:
            pipeline = pipeline_run(tree, args.peers, args.pipeline_events)
            reps[tree.name][index]["pipeline_events_per_s"] = pipeline["end_to_end_rate_per_s"]
            reps[tree.name][index]["pipeline_cpu_ms_per_1000_events"] = pipeline["sidecar_cpu_ms_per_1000_events"]
    info = machine()
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench.check " + shlex.join(args.argv),
        "machine": f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, Kubernetes {info['kubernetes']}",
        "load_before": load_before,
        "load_after": _load(),
        "minutes": (time.time() - started) / 60,
        "settings": {
            k: getattr(args, k)
            for k in ("peers", "reps", "cr_writes", "churn_writers", "churn_seconds", "pipeline_events")
        },
        "trees": {t.name: {"describe": t.describe(), "reps": reps[t.name]} for t in trees},
        "profile": profile,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__.splitlines()[0])
    parser.add_argument("--base", metavar="DIR", help="another checkout to measure alternately (before/after)")
    parser.add_argument("--profile", action="store_true", help="py-spy (CPU only) on this tree's sidecar")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a figure is over budget or not measured")
    parser.add_argument(
        "--out", type=pathlib.Path, help="the markdown report (default bench/comparisons/<date>-bench-check.md)"
    )
    parser.add_argument("--budget", type=pathlib.Path, default=BUDGET)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="repetitions run first and not counted")
    parser.add_argument("--cr-writes", type=int, default=100, help="CR updates per repetition (latency)")
    parser.add_argument("--churn-writers", type=int, default=4)
    parser.add_argument("--churn-seconds", type=float, default=8)
    parser.add_argument("--pipeline-events", type=int, default=20000)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = load_budget(args.budget)  # a broken budget fails before minutes of measuring
    result = run(args)
    text = render(result, budget)
    out = args.out or BENCH_DIR / "comparisons" / f"{result['date']}-bench-check.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    say(f"written: {out}")
    over = [
        v for v in verdicts(summarise(result["trees"]["this"]["reps"]), budget, args.peers).values() if v != "within"
    ]
    return 1 if args.strict and over else 0


if __name__ == "__main__":
    sys.exit(main())
