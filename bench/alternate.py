"""Two trees' pipeline capacity, alternated in one session: before, after, before, after, ...

``python -m bench.alternate BEFORE_DIR AFTER_DIR [--rounds 5] [--peers 1000] [--events 20000] [--streams 1]``

On a 2-core machine shared with other work, figures from separate sessions differ by more than most
changes; alternating the two trees run by run lets the machine's noise hit both alike. Every run is
this tree's ``bench/pipeline.py`` (copied aside, so both trees run the same harness) in a fresh process
of the tree's own venv, with the working directory first on ``sys.path``: only the ``sidecar`` code
differs. Prints every run, the medians and the after/before ratios, as a Markdown table, and writes the
runs as JSON (``--out``).
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
RUN = (
    "import json, sys; sys.path.insert(1, {harness!r}); import alternate_pipeline as p; "
    "print(json.dumps(p.run(peers={peers}, events={events}, streams={streams})))"
)


def run_once(tree: pathlib.Path, harness: str, peers: int, events: int, streams: int) -> dict[str, Any]:
    python = tree / ".venv" / "bin" / "python"
    done = subprocess.run(
        [str(python), "-c", RUN.format(harness=harness, peers=peers, events=events, streams=streams)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the pipeline failed in {tree}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| figure | before (runs) | after (runs) | median before | median after | after/before |"]
    lines.append("| --- | --- | --- | ---: | ---: | ---: |")
    for key, name in FIGURES.items():
        before = [r[key] for r in runs["before"]]
        after = [r[key] for r in runs["after"]]
        b, a = statistics.median(before), statistics.median(after)
        lines.append(
            f"| {name} | {' / '.join(f'{v:,.0f}' for v in before)} | {' / '.join(f'{v:,.0f}' for v in after)} "
            f"| {b:,.1f} | {a:,.1f} | {a / b:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alternate", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=pathlib.Path)
    parser.add_argument("after", type=pathlib.Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--streams", type=int, default=1, help="WatchPeers streams reading every change")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench-alternate-") as harness:
        shutil.copy(pathlib.Path(__file__).with_name("pipeline.py"), pathlib.Path(harness) / "alternate_pipeline.py")
        for index in range(args.rounds):
            for side in ("before", "after"):
                tree = getattr(args, side).resolve()
                result = run_once(tree, harness, args.peers, args.events, args.streams)
                runs[side].append(result)
                print(
                    f"[alternate] round {index + 1} {side}: {result['end_to_end_rate_per_s']:,.0f} events/s, "
                    f"{result['sidecar_cpu_ms_per_1000_events']:.1f} CPU ms/1000",
                    file=sys.stderr,
                    flush=True,
                )
    text = table(runs)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"before": str(args.before), "after": str(args.after), **runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
