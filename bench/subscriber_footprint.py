"""What the relay arm's simulator costs per subscriber, this build against an earlier one (issue #23).

``python -m bench.subscriber_footprint [--subscribers 300] [--peers 2000] [--changes 100] [--runs 3]
[--before main]`` runs, without a cluster, a relay's Discovery service over TLS holding ``--peers`` peers
(``bench.relay_fanout serve``: Dynamo-like metadata) and a ``bench.peer_subscribers`` process following it
with ``--subscribers`` streams, once with this checkout's simulator and once with ``--before``'s (a git
revision; its ``bench/peer_subscribers.py`` run from a scratch file), alternating in each run. Per variant:
the simulator's resident size before the streams, its peak while they took their snapshots and while
``--changes`` peer updates followed, and its CPU-s for each phase (the changes' phase ends when the
subscribers have received nothing more for 2 s). Medians over the runs, per subscriber, and the ratios
(this build / before), written to ``bench/results/subscriber-footprint.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from bench.cost import JsonLinesChild

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _peak_rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _received(child: JsonLinesChild) -> int:
    return int(sum(child.call(cmd="stats")["stats"]["bytes"].values()))


def one(argv: list[str], args: argparse.Namespace, pki: pathlib.Path, log: pathlib.Path) -> dict[str, float]:
    """One variant's run: the relay's service, then the simulator ``argv`` following it."""
    pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": ROOT}
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.relay_fanout", "serve", str(args.peers), "16", "64", str(pki)], **pipes
    )
    child = None
    try:
        port = json.loads(server.stdout.readline())["port"]
        child = JsonLinesChild([*argv, "--targets", f"localhost:{port}", "--ca", str(pki / "ca.crt")], log)
        child.call(cmd="stats")  # started: its modules loaded
        base_rss = child.ps.memory_info().rss
        cpu0 = child.cpu()
        for at in range(0, args.subscribers, 500):
            child.call(cmd="start", ids=[str(i) for i in range(at, min(at + 500, args.subscribers))])
        child.call(cmd="wait_ready")
        connected_peak, cpu1 = _peak_rss(child.process.pid), child.cpu()
        snapshot_bytes = _received(child)
        server.stdin.write(f"churn {args.changes}\n")
        server.stdin.flush()
        json.loads(server.stdout.readline())  # the server has made every change
        last, quiet_since = _received(child), time.monotonic()
        while time.monotonic() - quiet_since < 2.0:  # received nothing more for 2 s: the subscribers caught up
            time.sleep(0.2)
            now = _received(child)
            if now != last:
                last, quiet_since = now, time.monotonic()
        peers = {f"w-{i}": "READY" for i in range(args.peers)}
        converged = child.call(cmd="converge", peers=peers, timeout=60)
        return {
            "base_rss_mib": base_rss / 2**20,
            "connect_peak_rss_mib": connected_peak / 2**20,
            "peak_rss_mib": _peak_rss(child.process.pid) / 2**20,
            "peak_rss_per_subscriber_kib": (_peak_rss(child.process.pid) - base_rss) / 1024 / args.subscribers,
            "connect_cpu_s": cpu1 - cpu0,
            "changes_cpu_s": child.cpu() - cpu1,
            "snapshot_bytes": snapshot_bytes,
            "changes_bytes": last - snapshot_bytes,
            "converged": float(converged["converged"]),
        }
    finally:
        if child is not None:
            child.close()
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.subscriber_footprint", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--peers", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", default="main", help="the git revision to compare with")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "subscriber-footprint.json"))
    args = parser.parse_args(argv)
    from devcluster.pki import write_pki

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = pathlib.Path(scratch)
        pki = work / "pki"
        pki.mkdir()
        write_pki(pki)
        old = work / "peer_subscribers_before.py"
        old.write_text(
            subprocess.run(
                ["git", "show", f"{args.before}:bench/peer_subscribers.py"],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        variants = {"before": [sys.executable, str(old)], "this": [sys.executable, "-m", "bench.peer_subscribers"]}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for run in range(args.runs):
            for name, command in variants.items():  # alternating, on the same machine's same load
                result = one(command, args, pki, work / f"{name}.log")
                runs[name].append(result)
                print(json.dumps({"run": run, "variant": name, **result}), flush=True)
    medians = {
        name: {k: statistics.median(r[k] for r in results) for k in results[0]} for name, results in runs.items()
    }
    this, before = medians["this"], medians["before"]
    report = {
        "subscribers": args.subscribers,
        "peers": args.peers,
        "changes": args.changes,
        "runs": args.runs,
        "before": args.before,
        "medians": medians,
        "ratios_this_over_before": {k: round(this[k] / before[k], 3) for k in this if before[k]},
        "all": runs,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "cores": psutil.cpu_count(),
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"medians": medians, "ratios": report["ratios_this_over_before"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
