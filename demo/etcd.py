"""The etcd demo: live peer discovery on Dynamo's etcd backend (``make demo-etcd``, ``python -m demo.etcd``).

It starts one real etcd (the binary the project builds), runs sidecar processes the way an etcd-backed
Dynamo pod runs them (``DYN_DISCOVERY_BACKEND=etcd``, ``ETCD_ENDPOINTS``; no API server at all) plus a
worker of Dynamo's real runtime (``ai-dynamo-runtime``, ``DistributedRuntime(loop, "etcd", "tcp")``),
and follows the peer set from the router's sidecar with ``discovery-sidecar peers --watch`` while a
worker joins, publishes a model card, is shut down (its lease revoked: it leaves at once), and etcd
restarts. Peers are instances: each is named by its lease ID in hex, which is its instance ID. All
is stopped and removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
import time
from typing import Any

from demo.story import PeerWatch, run_story
from devcluster.build import ensure_built
from devcluster.dynamo import DynamoProcess, launch_dynamo_etcd
from devcluster.etcd import EtcdServer
from devcluster.sidecars import SidecarProcess, launch_etcd_sidecar
from discovery_client.client import DiscoveryClient

NAMESPACE = "demo"
ENDPOINT = f"{NAMESPACE}.backend.generate"
BOLD, RESET = ("\x1b[1m", "\x1b[0m") if sys.stdout.isatty() else ("", "")


def say(message: str) -> None:
    print(f"{BOLD}[demo-etcd]{RESET} {message}", flush=True)


def worker_metadata(component: str, port: int) -> dict[str, Any]:
    """An Endpoint entry as Dynamo writes it; instance_id 0 stands for "my lease" (the sidecar fills it in)."""
    entry = {
        "type": "Endpoint",
        "namespace": NAMESPACE,
        "component": component,
        "endpoint": "generate",
        "instance_id": 0,
        "transport": {"tcp": f"127.0.0.1:{port}/0/{NAMESPACE}/{component}/generate"},
        "device_type": "cuda",
        "request_plane_codec": "msgpack",
    }
    return {"endpoints": {f"{NAMESPACE}/{component}/generate/0": entry}}


class EtcdDemo:
    def __init__(self, work_dir: pathlib.Path, pace: float) -> None:
        self.work_dir = work_dir
        self.pace = pace
        self.etcd: EtcdServer | None = None
        self.sidecars: dict[str, SidecarProcess] = {}
        self.dynamo: DynamoProcess | None = None
        self.watch: PeerWatch | None = None

    def pause(self) -> None:
        if self.pace:
            time.sleep(self.pace)  # let a person read what just happened

    def add_worker(self, name: str, component: str, port: int) -> tuple[SidecarProcess, int]:
        assert self.etcd is not None
        data = worker_metadata(component, port) if component else {}
        process = launch_etcd_sidecar(name, NAMESPACE, self.etcd.url, self.work_dir / "sidecars", metadata=data)
        self.sidecars[name] = process
        process.wait_ready(60)
        with DiscoveryClient(process.target) as client:
            ident = client.get_self().instance_id
        say(f"  {name}: its sidecar holds lease {ident:x} (= instance ID {ident})")
        return process, ident

    # -- the watcher ---------------------------------------------------------------------------------
    def start_watcher(self, target: str) -> None:
        say(f"following the peer set as the router sees it: discovery-sidecar peers --watch --target {target}")
        self.watch = PeerWatch(target).start()

    def wait_line(self, fragment: str, timeout: float = 60.0) -> None:
        assert self.watch is not None
        self.watch.wait_line(fragment, timeout)

    # -- the story -----------------------------------------------------------------------------------
    def run(self) -> None:
        say("starting a real etcd (the control plane's binary, built once and cached in ~/.cache)")
        self.etcd = EtcdServer(self.work_dir / "etcd", bin_dir=ensure_built(log=lambda m: say(m)))
        self.etcd.start()
        say(f"etcd at {self.etcd.url}; every process below gets ETCD_ENDPOINTS={self.etcd.url}")

        say("a router and two workers (prefill, decode), each with its sidecar on DYN_DISCOVERY_BACKEND=etcd")
        router, _ = self.add_worker("router-0", "", 0)
        self.add_worker("prefill-0", "prefill", 9001)
        _, decode_id = self.add_worker("decode-0", "decode", 9002)
        self.start_watcher(router.target)
        self.wait_line("# snapshot")
        self.pause()

        say("scale up: decode-1 joins (a new lease, a new instance)")
        decode1, decode1_id = self.add_worker("decode-1", "decode", 9003)
        self.wait_line(f"added\t{decode1_id:x}")
        self.pause()

        say("decode-0's main container publishes a model card through its sidecar (PublishMetadata)")
        with DiscoveryClient(self.sidecars["decode-0"].target) as client:
            card = {
                "type": "Model",
                "namespace": NAMESPACE,
                "component": "decode",
                "endpoint": "generate",
                "instance_id": 0,
                "card_json": {"display_name": "llama-3-8b", "context_length": 8192},
            }
            client.publish_metadata({"model_cards": {f"{NAMESPACE}/decode/generate/0": card}}, merge=True)
        self.wait_line(f"updated\t{decode_id:x}")
        self.pause()

        say("a worker of Dynamo's own runtime (ai-dynamo-runtime) joins: it registers in etcd by itself")
        self.dynamo = launch_dynamo_etcd(
            "dynamo-worker-0", NAMESPACE, self.etcd.url, "worker", self.work_dir / "dynamo", ENDPOINT
        )
        dynamo_id = self.dynamo.instance_id
        say(f"  Dynamo's worker: instance ID {dynamo_id} (its lease {dynamo_id:x})")
        self.wait_line(f"added\t{dynamo_id:x}", timeout=90)
        self.pause()

        say("decode-1 is shut down: SIGTERM to its sidecar revokes its lease, so it leaves at once")
        self.sidecars.pop("decode-1")
        decode1.terminate(30)
        self.wait_line(f"removed\t{decode1_id:x}")
        self.pause()

        say("etcd restarts: the stream reports DEGRADED (peers kept, maybe stale), then recovers; every instance")
        say("  keeps its lease (etcd renews leases when it comes back), so no peer leaves or changes its ID")
        self.etcd.stop()
        self.wait_line("status\tdegraded")
        self.etcd.start()
        self.wait_line("status\tconnected", timeout=120)
        self.pause()

        say("final peer set from the router (discovery-sidecar peers): names are instance IDs in hex")
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.app.cli", "peers", "--target", router.target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(out, flush=True)
        say("the same, as the keys Dynamo's own discovery reads (key -> lease):")
        for key, kv in sorted(self.etcd.get_prefix("v1/").items()):
            entry = json.loads(kv["value"])
            print(f"   {key}  lease {kv['lease']:x}  {entry.get('type')}", flush=True)

    def cleanup(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        for process in self.sidecars.values():
            with contextlib.suppress(Exception):
                process.terminate(15)
        if self.dynamo is not None:
            self.dynamo.terminate(5)
        if self.etcd is not None:
            self.etcd.stop()
        say("cleaned up: sidecars, Dynamo worker and etcd stopped")


def main(argv: list[str] | None = None) -> int:
    return run_story("python -m demo.etcd", (__doc__ or "").splitlines()[0], EtcdDemo, say, argv)


if __name__ == "__main__":
    sys.exit(main())
