"""What an idle sidecar costs while nothing changes: wake-ups and CPU over a minute.

Nothing in the pod-facing layer should run while the peer set is still: its streams wait on the hub's
change signal. Two measurements, each over ``--seconds`` of idleness after ``--settle`` seconds:

* ``server``: the pod-facing layer alone, in this process: a synced hub of ``--peers`` peers, the gRPC
  servicer and server, and ``--streams`` idle WatchPeers streams read by a client in another process.
  Counted: voluntary context switches of the gRPC event-loop thread (each time its ``epoll_wait``
  returns, the loop woke up) and of the whole process, and the process's CPU time.
* ``sidecar``: a real ``discovery-sidecar run`` on the etcd backend (a real etcd, ``DISCOVERY_WATCH=always``,
  the same idle streams), measured from ``/proc``: CPU time and context switches of the whole process.
  Its etcd watch and lease keep-alive wake it too (progress requests every 5 s, a renewal every TTL/2),
  the same on every version.

``python -m bench.idle`` prints JSON. The script runs on this tree's layout and on the one before the
issue-20 refactor (``sidecar.hub``, ``sidecar.grpc_service``, ``sidecar.cli``), so both can be measured
side by side on the same machine: ``bench/comparisons/2026-12-07-one-shape.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import grpc

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _layout() -> dict[str, Any]:
    """The classes this measurement needs, from whichever layout this tree has."""
    try:
        from sidecar.peers.hub import PeerHub
        from sidecar.peers.metrics import Metrics
        from sidecar.peers.ports import ListenAddress, PodIdentity
        from sidecar.serve.grpc_server import GrpcServer
        from sidecar.serve.grpc_service import DiscoveryService

        cli = "sidecar.app.cli"
    except ImportError:  # before the refactor
        from sidecar.config import ListenAddress, PodIdentity  # type: ignore[no-redef]
        from sidecar.grpc_service import DiscoveryService, GrpcServer  # type: ignore[no-redef]
        from sidecar.hub import PeerHub  # type: ignore[no-redef]
        from sidecar.metrics import Metrics  # type: ignore[no-redef]

        cli = "sidecar.cli"
    return {
        "PeerHub": PeerHub,
        "Metrics": Metrics,
        "ListenAddress": ListenAddress,
        "PodIdentity": PodIdentity,
        "GrpcServer": GrpcServer,
        "DiscoveryService": DiscoveryService,
        "cli": cli,
    }


def _read_streams(target: str, streams: int, ready: Any, stop: Any) -> None:
    """In another process, like a main container: open ``streams`` WatchPeers streams and read them."""
    channel = grpc.insecure_channel(target.replace("unix:///", "unix:/"))
    stub = pb_grpc.DiscoveryStub(channel)
    calls = [stub.WatchPeers(pb.WatchPeersRequest(), wait_for_ready=True) for _ in range(streams)]
    for call in calls:
        next(call)  # the snapshot
    ready.set()
    stop.wait()
    for call in calls:
        call.cancel()
    channel.close()


def _thread_switches(native_id: int) -> int:
    status = pathlib.Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def _process(pid: int) -> tuple[float, int]:
    """(CPU seconds, voluntary + involuntary context switches of every thread) of process ``pid``."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    switches = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return cpu, switches


def _peers_hub(layout: dict[str, Any], peers: int) -> Any:
    from bench.pipeline import _cr, _slices
    from sidecar.core.directory import PeerDirectory
    from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA

    hub = layout["PeerHub"](PeerDirectory(uuid.uuid4().hex, 10000, [ENDPOINT_SLICES.name, WORKER_METADATA.name]), "x")
    for source, objects in ((ENDPOINT_SLICES, _slices(peers)), (WORKER_METADATA, [_cr(i, 0) for i in range(peers)])):
        hub.store(source.name).replace({source.key(o): source.parse(o) for o in objects})
    return hub


def measure_server(peers: int, streams: int, settle: float, seconds: float) -> dict[str, Any]:
    layout = _layout()
    hub = _peers_hub(layout, peers)
    service = layout["DiscoveryService"](hub, None, layout["PodIdentity"]("self", "bench", "self"), layout["Metrics"]())
    server = layout["GrpcServer"](service, layout["ListenAddress"](host="127.0.0.1", port=0))
    server.start()
    loop_thread = next(t for t in threading.enumerate() if t.name == "grpc-loop")
    assert loop_thread.native_id is not None
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    reader = context.Process(target=_read_streams, args=(server.target, streams, ready, stop), daemon=True)
    reader.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the stream reader never got its snapshots")
        time.sleep(settle)  # measurement window: nothing happens, by design
        loop_before = _thread_switches(loop_thread.native_id)
        cpu_before, process_before = _process(os.getpid())
        time.sleep(seconds)  # measurement window
        loop_after = _thread_switches(loop_thread.native_id)
        cpu_after, process_after = _process(os.getpid())
    finally:
        stop.set()
        reader.join(10)
        hub.close()
        server.stop(0.5)
    return {
        "peers": peers,
        "streams": streams,
        "seconds": seconds,
        "loop_wakeups_per_minute": (loop_after - loop_before) * 60 / seconds,
        "process_switches_per_minute": (process_after - process_before) * 60 / seconds,
        "cpu_ms_per_minute": (cpu_after - cpu_before) * 1000 * 60 / seconds,
    }


def measure_sidecar(streams: int, settle: float, seconds: float) -> dict[str, Any]:
    from devcluster.cluster import free_port
    from devcluster.etcd import EtcdServer

    layout = _layout()
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp, EtcdServer(pathlib.Path(tmp) / "etcd") as etcd:
        socket = pathlib.Path(tmp) / "api.sock"
        env = {
            **os.environ,
            "POD_NAME": "idle-0",
            "POD_NAMESPACE": "bench",
            "DYN_DISCOVERY_BACKEND": "etcd",
            "ETCD_ENDPOINTS": etcd.url,
            "DISCOVERY_WATCH": "always",
            "DISCOVERY_GRPC_LISTEN": f"unix://{socket}",
            "DISCOVERY_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            "DISCOVERY_PODINFO_DIR": str(pathlib.Path(tmp) / "none"),
            "DISCOVERY_LOG_LEVEL": "warning",
        }
        process = subprocess.Popen([sys.executable, "-m", layout["cli"], "run"], env=env)
        context = multiprocessing.get_context("spawn")
        ready, stop = context.Event(), context.Event()
        reader = context.Process(target=_read_streams, args=(f"unix://{socket}", streams, ready, stop), daemon=True)
        reader.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the stream reader never got its snapshots from the sidecar")
            time.sleep(settle)  # measurement window: nothing happens, by design
            cpu_before, switches_before = _process(process.pid)
            time.sleep(seconds)  # measurement window
            cpu_after, switches_after = _process(process.pid)
        finally:
            stop.set()
            reader.join(10)
            process.terminate()
            process.wait(30)
    return {
        "streams": streams,
        "seconds": seconds,
        "process_switches_per_minute": (switches_after - switches_before) * 60 / seconds,
        "cpu_ms_per_minute": (cpu_after - cpu_before) * 1000 * 60 / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["server", "sidecar"])
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.what == "server":
        result = measure_server(args.peers, args.streams, args.settle, args.seconds)
    else:
        result = measure_sidecar(args.streams, args.settle, args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
