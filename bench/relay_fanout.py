"""A relay's cost with many followers (issue #23): a burst of snapshots, then a stream of changes.

``python -m bench.relay_fanout [--peers 1000] [--streams 333] [--changes 200] [--runs 3]`` runs, side by
side in each run, a relay's Discovery service over TLS (in a process of its own, fed ``--peers`` peers with
Dynamo-like metadata through the same parse-and-store path as the reflectors) and ``--streams`` followers
(in another process), once per variant:

* ``current``: snapshots built and written at most ``SNAPSHOTS_AT_ONCE`` at a time, and each batch of
  changes projected and encoded once for every follower at the same position with the same filter;
* ``per-stream``: as before either existed (every snapshot at once, every follower projecting its own).

Phase 1, the followers connect at once (a relay's share after a failover): the service's peak RSS, and the
seconds until the last follower has its snapshot. Phase 2, ``--changes`` peer updates, one at a time: the
service's CPU-s until every follower has received all of them, and how long that took. Medians over the
runs and the ratios (current / per-stream), written to ``bench/results/relay-fanout.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"current": (16, 64), "per-stream": (1_000_000, 0)}
"""variant -> (snapshots built and written at once, batches shared)."""


def _rss_mib() -> dict[str, int]:
    values = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) // 1024
    return values


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _data(instance: int, generation: int) -> dict[str, Any]:
    return {
        "endpoints": {
            f"ns/backend/generate/{instance:x}": {
                "type": "Endpoint",
                "namespace": "ns",
                "component": "backend",
                "endpoint": "generate",
                "instance_id": instance,
                "transport": {"tcp": f"10.0.0.1:9000/{instance:x}/ns/backend/generate"},
            },
            f"ns/prefill/generate/{instance:x}": {
                "type": "Endpoint",
                "namespace": "ns",
                "component": "prefill",
                "endpoint": "generate",
                "instance_id": instance,
                "transport": {"tcp": f"10.0.0.1:9001/{instance:x}/ns/prefill/generate"},
            },
        },
        "model_cards": {},
        "generation": generation,
    }


def serve(peers: int, slots: int, shared: int, pki_dir: pathlib.Path) -> None:
    """The relay's service on a hub of ``peers``; prints its port, then answers commands on stdin."""
    from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
    from sidecar.peers.metrics import Metrics
    from sidecar.peers.ports import Grant, ListenAddress, PodIdentity, TlsFiles
    from sidecar.serve.grpc_server import GrpcServer
    from sidecar.serve.grpc_service import DiscoveryService
    from tests.unit.feeding import SourceFeed, new_hub
    from tests.unit.test_grpc_stream import endpoint_slice, worker_cr

    class Everyone:
        def admit(self, token: str, namespaces: object) -> Grant:
            return Grant(None, time.monotonic() + 3600)

    hub = new_hub(10_000, "")
    feed = SourceFeed(hub)
    pods = {f"w-{i}": (f"uid-{i}", True) for i in range(peers)}
    names = list(pods)
    feed.replace(
        ENDPOINT_SLICES,
        [endpoint_slice(f"s{j}", {n: pods[n] for n in names[j : j + 100]}) for j in range(0, peers, 100)],
    )
    feed.replace(
        WORKER_METADATA,
        [worker_cr(p, uid, {"role": "worker"}, _data(i, 0)) for i, (p, (uid, _)) in enumerate(pods.items())],
    )
    service = DiscoveryService(
        hub,
        None,
        PodIdentity("", "ns", ""),
        Metrics(),
        access=Everyone(),  # type: ignore[arg-type]
        snapshots_at_once=slots,
        shared_batches=shared,
    )
    tls = TlsFiles(str(pki_dir / "serving.crt"), str(pki_dir / "serving.key"))
    server = GrpcServer(service, ListenAddress(host="127.0.0.1", port=0), tls=tls)
    server.start()
    print(json.dumps({"port": server.port, **_rss_mib()}), flush=True)
    started = _cpu_s()
    for line in sys.stdin:
        command = line.split()
        if command[0] == "mark":
            started = _cpu_s()
        elif command[0] == "churn":
            for n in range(int(command[1])):
                i = n % peers
                feed.upsert(
                    WORKER_METADATA, worker_cr(names[i], pods[names[i]][0], {"role": "worker"}, _data(i, n + 1))
                )
                time.sleep(0.005)  # a rollout's pace: one change at a time, not one batch
        print(json.dumps({"cpu_s": _cpu_s() - started, **_rss_mib()}), flush=True)
    server.stop(0.5)


async def _follow(port: int, streams: int, ca: bytes) -> None:
    import grpc
    import grpc.aio

    from discovery_client.api.discovery.v1 import discovery_pb2 as pb
    from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc

    snapshots = 0
    events = [0] * streams
    all_snapshots = asyncio.Event()
    progress = asyncio.Event()

    async def follower(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal snapshots
        async for message in pb_grpc.DiscoveryStub(channel).WatchPeers(pb.WatchPeersRequest()):
            kind = message.WhichOneof("kind")
            if kind == "snapshot" and not message.partial:
                snapshots += 1
                if snapshots == streams:
                    all_snapshots.set()
            elif kind == "delta":
                events[index] += len(message.delta.events)
                progress.set()

    credentials = grpc.ssl_channel_credentials(ca)
    channels = [grpc.aio.secure_channel(f"localhost:{port}", credentials) for _ in range(streams)]
    started = time.monotonic()
    tasks = [asyncio.create_task(follower(i, c)) for i, c in enumerate(channels)]
    await all_snapshots.wait()
    print(json.dumps({"snapshot_seconds": time.monotonic() - started}), flush=True)
    loop = asyncio.get_running_loop()
    expected = int(await loop.run_in_executor(None, sys.stdin.readline))
    started = time.monotonic()
    while min(events) < expected:
        progress.clear()
        await progress.wait()
    print(json.dumps({"changes_seconds": time.monotonic() - started}), flush=True)
    for task in tasks:
        task.cancel()


def followers(port: int, streams: int, ca: pathlib.Path) -> None:
    asyncio.run(_follow(port, streams, ca.read_bytes()))


def one(peers: int, streams: int, changes: int, variant: tuple[int, int], pki_dir: pathlib.Path) -> dict[str, float]:
    me = [sys.executable, "-m", "bench.relay_fanout"]
    pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "cwd": ROOT}
    server = subprocess.Popen([*me, "serve", str(peers), *map(str, variant), str(pki_dir)], **pipes)
    clients = None
    try:
        base = json.loads(server.stdout.readline())
        clients = subprocess.Popen([*me, "follow", str(base["port"]), str(streams), str(pki_dir / "ca.crt")], **pipes)
        snapshot = json.loads(clients.stdout.readline())
        server.stdin.write("mark\n")
        server.stdin.flush()
        after_snapshots = json.loads(server.stdout.readline())
        clients.stdin.write(f"{changes}\n")
        clients.stdin.flush()
        server.stdin.write(f"churn {changes}\n")
        server.stdin.flush()
        churned = json.loads(clients.stdout.readline())
        server.stdin.write("cpu\n")
        server.stdin.flush()
        json.loads(server.stdout.readline())  # the churn command's own answer
        after_changes = json.loads(server.stdout.readline())
    finally:
        for process in (clients, server):
            if process is not None:
                process.kill()
                process.wait()
    return {
        "base_rss_mib": base["VmRSS"],
        "snapshots_peak_rss_mib": after_snapshots["VmHWM"],
        "snapshots_seconds": snapshot["snapshot_seconds"],
        "changes_cpu_s": after_changes["cpu_s"],
        "changes_seconds": churned["changes_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_fanout", description=__doc__)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=333)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "relay-fanout.json"))
    args = parser.parse_args(argv)
    from devcluster.pki import write_pki

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        pki_dir = pathlib.Path(scratch)
        write_pki(pki_dir)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for run in range(args.runs):
            for name, variant in VARIANTS.items():  # side by side in each run
                result = one(args.peers, args.streams, args.changes, variant, pki_dir)
                runs[name].append(result)
                print(json.dumps({"run": run, "variant": name, **result}), flush=True)
    medians = {
        name: {k: statistics.median(r[k] for r in results) for k in results[0]} for name, results in runs.items()
    }
    current, before = medians["current"], medians["per-stream"]
    report: dict[str, Any] = {
        "peers": args.peers,
        "streams": args.streams,
        "changes": args.changes,
        "runs": args.runs,
        "medians": medians,
        "ratios_current_over_per_stream": {k: round(current[k] / before[k], 3) for k in current if before[k]},
        "all": runs,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "cores": os.cpu_count(),
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"medians": medians, "ratios": report["ratios_current_over_per_stream"]}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), pathlib.Path(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "follow":
        followers(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
    else:
        sys.exit(main())
