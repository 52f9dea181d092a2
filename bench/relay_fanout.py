"""A relay's memory when many followers take a snapshot at once (issue #23): with and without the bound on
snapshots built and written at once (``sidecar.serve.grpc_service.SNAPSHOTS_AT_ONCE``).

``python -m bench.relay_fanout [--peers 1000] [--streams 333] [--runs 3]`` runs, side by side in each run,
a relay's Discovery service over TLS (in a process of its own, fed ``--peers`` peers with Dynamo-like
metadata through the same parse-and-store path as the reflectors) and ``--streams`` followers connecting at
once (in another process), once per variant. It reports, per variant, the service's peak RSS while the
snapshots went out, its RSS once all were received, and the seconds until the last follower had its
snapshot; medians over the runs and the ratios, written to ``bench/results/relay-fanout.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"bounded (16 at once)": 16, "unbounded": 1_000_000}


def _rss_mib() -> dict[str, int]:
    values = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) // 1024
    return values


def serve(peers: int, slots: int, pki_dir: pathlib.Path) -> None:
    """The relay's service on a hub of ``peers``; prints its port, then its RSS on each line of stdin."""
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
    data = {
        "endpoints": {
            f"ns/backend/generate/{i:x}": {
                "type": "Endpoint",
                "namespace": "ns",
                "component": "backend",
                "endpoint": "generate",
                "instance_id": i,
                "transport": {"tcp": f"10.0.0.1:9000/{i:x}/ns/backend/generate"},
            }
            for i in range(2)
        },
        "model_cards": {},
    }
    pods = {f"w-{i}": (f"uid-{i}", True) for i in range(peers)}
    names = list(pods)
    feed.replace(
        ENDPOINT_SLICES,
        [endpoint_slice(f"s{j}", {n: pods[n] for n in names[j : j + 100]}) for j in range(0, peers, 100)],
    )
    feed.replace(WORKER_METADATA, [worker_cr(p, uid, {"role": "worker"}, data) for p, (uid, _) in pods.items()])
    service = DiscoveryService(
        hub, None, PodIdentity("", "ns", ""), Metrics(), access=Everyone(), snapshots_at_once=slots
    )  # type: ignore[arg-type]
    tls = TlsFiles(str(pki_dir / "serving.crt"), str(pki_dir / "serving.key"))
    server = GrpcServer(service, ListenAddress(host="127.0.0.1", port=0), tls=tls)
    server.start()
    print(json.dumps({"port": server.port, **_rss_mib()}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(_rss_mib()), flush=True)
    server.stop(0.5)


async def _follow(port: int, streams: int, ca: bytes) -> float:
    import grpc
    import grpc.aio

    from discovery_client.api.discovery.v1 import discovery_pb2 as pb
    from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc

    done = asyncio.Event()
    received = 0

    async def follower(channel: grpc.aio.Channel) -> None:
        nonlocal received
        call = pb_grpc.DiscoveryStub(channel).WatchPeers(pb.WatchPeersRequest())
        async for message in call:
            if not message.partial:
                received += 1
                if received == streams:
                    done.set()
                break
        await asyncio.Event().wait()

    credentials = grpc.ssl_channel_credentials(ca)
    channels = [grpc.aio.secure_channel(f"localhost:{port}", credentials) for _ in range(streams)]
    started = time.monotonic()
    tasks = [asyncio.create_task(follower(c)) for c in channels]
    await done.wait()
    elapsed = time.monotonic() - started
    for task in tasks:
        task.cancel()
    return elapsed


def followers(port: int, streams: int, ca: pathlib.Path) -> None:
    print(json.dumps({"seconds": asyncio.run(_follow(port, streams, ca.read_bytes()))}), flush=True)


def one(peers: int, streams: int, slots: int, pki_dir: pathlib.Path) -> dict[str, float]:
    me = [sys.executable, "-m", "bench.relay_fanout"]
    server = subprocess.Popen(
        [*me, "serve", str(peers), str(slots), str(pki_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        before = json.loads(server.stdout.readline())
        clients = subprocess.run(
            [*me, "follow", str(before["port"]), str(streams), str(pki_dir / "ca.crt")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        seconds = json.loads(clients.stdout.strip().splitlines()[-1])["seconds"]
        server.stdin.write("\n")
        server.stdin.flush()
        after = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    return {
        "base_rss_mib": before["VmRSS"],
        "peak_rss_mib": after["VmHWM"],
        "rss_after_mib": after["VmRSS"],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_fanout", description=__doc__)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=333)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "relay-fanout.json"))
    args = parser.parse_args(argv)
    from devcluster.pki import write_pki

    with tempfile.TemporaryDirectory() as scratch:
        pki_dir = pathlib.Path(scratch)
        write_pki(pki_dir)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        for run in range(args.runs):
            for name, slots in VARIANTS.items():  # side by side in each run
                result = one(args.peers, args.streams, slots, pki_dir)
                runs[name].append(result)
                print(json.dumps({"run": run, "variant": name, **result}), flush=True)
    medians = {
        name: {k: statistics.median(r[k] for r in results) for k in results[0]} for name, results in runs.items()
    }
    bounded, unbounded = (medians[name] for name in VARIANTS)
    report: dict[str, Any] = {
        "peers": args.peers,
        "streams": args.streams,
        "runs": args.runs,
        "medians": medians,
        "ratios_bounded_over_unbounded": {k: round(bounded[k] / unbounded[k], 3) for k in bounded if unbounded[k]},
        "all": runs,
        "load_before_and_after": list(__import__("os").getloadavg()),
    }
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"medians": medians, "ratios": report["ratios_bounded_over_unbounded"]}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "follow":
        followers(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
    else:
        sys.exit(main())
