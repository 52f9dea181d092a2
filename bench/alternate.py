"""Two trees' pipeline capacity, alternated in one session: before, after, before, after, ...

``python -m bench.alternate BEFORE_DIR AFTER_DIR [--rounds 5] [--peers 1000] [--events 20000] [--streams 1]``
``python -m bench.alternate BEFORE_DIR AFTER_DIR --relay-fanout [--streams 100] [--changes 200]``

On a 2-core machine shared with other work, figures from separate sessions differ by more than most
changes; alternating the two trees run by run lets the machine's noise hit both alike. Every run is
this tree's ``bench/pipeline.py`` (copied aside, so both trees run the same harness) in a fresh process
of the tree's own venv, with the working directory first on ``sys.path``: only the ``sidecar`` code
differs. ``--relay-fanout`` runs one ``bench.relay_fanout`` run of the shipped variant instead (the
tree's own copy of it: a relay's service CPU for ``--changes`` changes sent to ``--streams`` followers).
Prints every run, the medians and the after/before ratios, as a Markdown table, and writes the runs as
JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

FIGURES = {
    "end_to_end_rate_per_s": "events/s end to end",
    "sidecar_cpu_ms_per_1000_events": "CPU ms / 1,000 events",
    "apply_rate_per_s": "apply rate /s",
}
RELAY_FIGURES = {
    "changes_cpu_s": "service CPU-s for the changes",
    "changes_seconds": "seconds until every follower has them",
    "snapshots_seconds": "seconds until every follower has its snapshot",
    "snapshots_peak_rss_mib": "peak RSS MiB (snapshots)",
}
RELAY_RUN = (
    "import json, pathlib, tempfile; from bench.relay_fanout import VARIANTS, one; from devcluster.pki import "
    "write_pki; d = pathlib.Path(tempfile.mkdtemp()); write_pki(d); "
    "print(json.dumps(one({peers}, {streams}, {changes}, VARIANTS['current'], d)))"
)
RUN = (
    "import json, sys; sys.path.insert(1, {harness!r}); import alternate_pipeline as p; "
    "print(json.dumps(p.run(peers={peers}, events={events}, streams={streams})))"
)


def run_json(python: str, program: str, cwd: pathlib.Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``program`` (Python source that prints one JSON object last) with another tree's interpreter, in a
    process of its own, and return that object; RuntimeError with the end of its stderr when it fails."""
    done = subprocess.run(
        [python, "-c", program], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the pipeline failed in {cwd}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_once(tree: pathlib.Path, program: str) -> dict[str, Any]:
    return run_json(str(tree / ".venv" / "bin" / "python"), program, tree)


def _figure(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(runs: dict[str, list[dict[str, Any]]], figures: dict[str, str]) -> str:
    lines = ["| figure | before (runs) | after (runs) | median before | median after | after/before |"]
    lines.append("| --- | --- | --- | ---: | ---: | ---: |")
    for key, name in figures.items():
        before = [r[key] for r in runs["before"]]
        after = [r[key] for r in runs["after"]]
        b, a = statistics.median(before), statistics.median(after)
        lines.append(
            f"| {name} | {' / '.join(map(_figure, before))} | {' / '.join(map(_figure, after))} "
            f"| {_figure(b)} | {_figure(a)} | {a / b:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alternate", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--streams", type=int, help="WatchPeers streams reading every change (1; relay: 100)")
    parser.add_argument("--relay-fanout", action="store_true", help="a relay's fan-out instead of the pipeline")
    parser.add_argument("--changes", type=int, default=200, help="changes sent to the relay's followers")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    figures = RELAY_FIGURES if args.relay_fanout else FIGURES
    with tempfile.TemporaryDirectory(prefix="bench-alternate-") as harness:
        shutil.copy(pathlib.Path(__file__).with_name("pipeline.py"), pathlib.Path(harness) / "alternate_pipeline.py")
        if args.relay_fanout:
            program = RELAY_RUN.format(peers=args.peers, streams=args.streams or 100, changes=args.changes)
        else:
            program = RUN.format(harness=harness, peers=args.peers, events=args.events, streams=args.streams or 1)
        for index in range(args.rounds):
            for side in ("before", "after"):
                result = run_once(getattr(args, side).resolve(), program)
                runs[side].append(result)
                shown = ", ".join(f"{key} {_figure(result[key])}" for key in figures)
                print(f"[alternate] round {index + 1} {side}: {shown}", file=sys.stderr, flush=True)
    text = table(runs, figures)
    print(text)
    if args.out:
        trees = {"before_tree": str(args.before), "after_tree": str(args.after)}
        args.out.write_text(json.dumps({**trees, **runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
