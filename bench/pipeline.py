"""The sidecar's own capacity, without the API server as the bottleneck.

On this 2-core machine etcd + kube-apiserver accept far fewer writes per second than the sidecar can
absorb, so the end-to-end churn test measures the API server. This measures the sidecar's pipeline
alone, in one process: raw watch-event lines (JSON bytes, as the API server sends them) are decoded and
applied to the hub exactly as the reflector does, and a real gRPC WatchPeers client on loopback (``streams``
streams of it, as several main containers or a relay's followers would open) counts what it receives.
Events/second is measured from the first line fed to the last event received (on every stream).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import statistics
import threading
import time
import uuid
from typing import Any

import grpc

from bench.workload import metadata, peer_name
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from sidecar.core import json_decode
from sidecar.core.directory import PeerDirectory
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.hub import PeerHub
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import ListenAddress, PodIdentity
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import DiscoveryService


def _slices(peers: int) -> list[dict[str, Any]]:
    slices = []
    for start in range(0, peers, 100):
        slices.append(
            {
                "metadata": {"name": f"workers-{start // 100}", "namespace": "bench", "resourceVersion": "1"},
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": [f"10.1.{i // 250}.{i % 250}"],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": peer_name(i), "uid": f"uid-{i}"},
                    }
                    for i in range(start, min(peers, start + 100))
                ],
            }
        )
    return slices


def _cr(i: int, seq: int) -> dict[str, Any]:
    name = peer_name(i)
    return {
        "metadata": {
            "name": name,
            "namespace": "bench",
            "uid": f"cr-{i}",
            "resourceVersion": str(seq),
            "labels": {"app": "worker"},
            "ownerReferences": [{"kind": "Pod", "name": name, "uid": f"uid-{i}"}],
        },
        "spec": {"data": metadata(name, seq)},
    }


def _read(stub: Any, last_seq: int, ready: threading.Barrier, counts: list[int], index: int) -> None:
    synced = False
    for message in stub.WatchPeers(pb.WatchPeersRequest(), wait_for_ready=True):
        if message.WhichOneof("kind") == "snapshot":
            if not synced:
                synced = True
                ready.wait()
            # A later snapshot: this reader fell behind the history (it may carry the last update).
            if any(json.loads(p.data_json)["seq"] == last_seq for p in message.snapshot.peers):
                return
            continue
        for event in message.delta.events:
            counts[index] += 1
            if json.loads(event.peer.data_json)["seq"] == last_seq:
                return


def _consume(target: str, last_seq: int, connection: Any, streams: int = 1) -> None:
    """In a separate process, like a main container: read ``streams`` streams (a thread each) until
    ``last_seq`` arrives on every one; events are counted on the first."""
    counts = [0] * streams
    ready = threading.Barrier(streams + 1)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DiscoveryStub(channel)
        readers = [threading.Thread(target=_read, args=(stub, last_seq, ready, counts, i)) for i in range(streams)]
        for reader in readers:
            reader.start()
        ready.wait()
        connection.send(("ready", time.time_ns(), 0))
        for reader in readers:
            reader.join()
        connection.send(("done", time.time_ns(), counts[0]))


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by name: Python's by their ``threading`` name, gRPC core's
    (C++, invisible to Python profilers) by their OS name. Linux only."""
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    totals: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            name = python_names.get(int(task.name)) or "core:" + (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # the thread ended
            continue
        name = name.rstrip("0123456789_-") or name  # pools: one name for their numbered threads
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return totals


def run(peers: int = 1000, events: int = 30000, streams: int = 1) -> dict[str, Any]:
    hub = PeerHub(PeerDirectory(uuid.uuid4().hex, 10000, [ENDPOINT_SLICES.name, WORKER_METADATA.name]), "self")
    for source, objects in ((ENDPOINT_SLICES, _slices(peers)), (WORKER_METADATA, [_cr(i, 0) for i in range(peers)])):
        hub.store(source.name).replace({source.key(o): source.parse(o) for o in objects})
    metadata = hub.store(WORKER_METADATA.name)
    server = GrpcServer(
        DiscoveryService(hub, None, PodIdentity("self", "bench", "self"), Metrics()),
        ListenAddress(host="127.0.0.1", port=0),
    )
    server.start()
    try:  # as the daemon does once started (bench.alternate also runs this on trees from before the collector)
        from sidecar.app.collector import release, settle
    except ImportError:
        release = settle = lambda: None  # noqa: E731
    settle()
    lines = [json.dumps({"type": "MODIFIED", "object": _cr(n % peers, n + 1)}).encode() for n in range(events)]
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    consumer = context.Process(target=_consume, args=(server.target, events, theirs, streams), daemon=True)
    consumer.start()
    if not ours.poll(60):
        raise RuntimeError("the consumer process never received its snapshot")
    ours.recv()
    started_ns = time.time_ns()
    started = time.perf_counter()
    cpu_started = time.process_time()
    threads_started = _thread_cpu()
    for line in lines:
        arrived = time.monotonic()
        obj = json_decode.loads(line)["object"]  # decoded and stored as the reflector does
        metadata.upsert(WORKER_METADATA.key(obj), WORKER_METADATA.parse(obj), arrived)
    applied = time.perf_counter()
    if not ours.poll(120):
        raise RuntimeError("the consumer never saw the last event")
    _, finished_ns, received = ours.recv()
    cpu = time.process_time() - cpu_started
    threads = {name: seconds - threads_started.get(name, 0.0) for name, seconds in _thread_cpu().items()}
    consumer.join(10)
    hub.close()
    release()
    server.stop(0.5)
    return {
        "peers": peers,
        "streams": streams,
        "events_fed": events,
        "events_streamed": received,
        "apply_rate_per_s": events / (applied - started),
        "end_to_end_rate_per_s": events / ((finished_ns - started_ns) / 1e9),
        "sidecar_cpu_ms_per_1000_events": cpu * 1000 / events * 1000,
        "cpu_ms_per_1000_events_by_thread": {
            name: round(seconds * 1000 / events * 1000, 1) for name, seconds in sorted(threads.items()) if seconds > 0
        },
        "note": "the consumer runs in its own process; events_streamed < events_fed means the stream "
        "coalesced several updates of one peer into one event for a reader that was behind",
    }


def median_of_runs(peers: int, runs: int) -> dict[str, Any]:
    """``run`` repeated; each rate is the median over the runs, and every run's figures are kept."""
    results = [run(peers=peers) for _ in range(runs)]
    summary = dict(results[0])
    for key in ("apply_rate_per_s", "end_to_end_rate_per_s", "sidecar_cpu_ms_per_1000_events", "events_streamed"):
        summary[key] = statistics.median(r[key] for r in results)
    summary["runs"] = results
    return summary


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
