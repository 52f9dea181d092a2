"""The demo: live peer discovery on a local, real control plane (``make demo``).

It builds (first run only) and starts etcd, kube-apiserver and kube-controller-manager, installs the
Helm chart (CRD, RBAC, admission policy, injection) as a user would, creates worker pods in two roles
behind a Service with nothing of the sidecar in them but the label ``discovery-sidecar.io/inject: "true"``,
and runs one real sidecar process per pod from the container the injection added to it (its env and
downward-API files resolved as the kubelet would, a pod-bound token each). Then it follows the peer set
from the router pod's point of view with ``discovery-sidecar peers --watch`` while pods scale up, turn
unready, publish metadata, terminate, and the API server restarts. Everything is stopped and removed at
the end, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import time

from demo.dynamo_traffic import DynamoScene
from demo.story import PeerWatch, run_story
from devcluster.build import ROOT, ensure_built
from devcluster.cluster import ControlPlane
from devcluster.injection import injected_sidecar, wait_until_injecting
from devcluster.objects import Cluster
from devcluster.sidecars import SidecarProcess, launch_from_pod
from discovery_client.client import DiscoveryClient
from sidecar.kube.api import KubeApi

NAMESPACE = "inference"
SERVICE = "workers"
INJECT = {"discovery-sidecar.io/inject": "true"}  # all a workload needs: the chart's policy adds the sidecar
DYNAMO_DISCOVERY = {"nvidia.com/dynamo-discovery-enabled": "true"}  # the injected sidecar's default selector
CHART = ROOT / "charts" / "discovery-sidecar"
BOLD, RESET = ("\x1b[1m", "\x1b[0m") if sys.stdout.isatty() else ("", "")


def say(message: str) -> None:
    print(f"{BOLD}[demo]{RESET} {message}", flush=True)


class Demo:
    def __init__(self, work_dir: pathlib.Path, pace: float) -> None:
        self.work_dir = work_dir
        self.pace = pace
        self.plane: ControlPlane | None = None
        self.cluster: Cluster | None = None
        self.sidecars: dict[str, SidecarProcess] = {}
        self.watch: PeerWatch | None = None
        self.dynamo: DynamoScene | None = None

    def pause(self) -> None:
        if self.pace:
            time.sleep(self.pace)  # let a person read what just happened

    # -- set-up --------------------------------------------------------------------------------------
    def start_control_plane(self) -> None:
        say("building the control plane binaries if needed (cached in ~/.cache after the first run)")
        bin_dir = ensure_built(log=lambda m: say(m))
        self.plane = ControlPlane(bin_dir=bin_dir, work_dir=self.work_dir / "controlplane", log=lambda m: say(m))
        self.plane.start()
        self.cluster = Cluster(KubeApi.from_kubeconfig(str(self.plane.kubeconfig)))

    def kubectl(self, *args: str) -> str:
        assert self.plane is not None
        argv = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}", *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def install_chart(self) -> None:
        assert self.plane is not None and self.cluster is not None
        self.cluster.create_namespace(NAMESPACE)
        say(f"helm install discovery-sidecar charts/discovery-sidecar --set namespaces={{{NAMESPACE}}}")
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        env.update({f"HELM_{k}_HOME": str(self.work_dir / f"helm-{k.lower()}") for k in ("CACHE", "CONFIG", "DATA")})
        subprocess.run(
            [str(self.plane.bin_dir / "helm"), "install", "discovery-sidecar", str(CHART), "--namespace",
             "discovery-sidecar", "--create-namespace", "--set", f"namespaces={{{NAMESPACE}}}", "--wait"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        self.cluster.wait_for_service_account(NAMESPACE, "discovery-sidecar")
        self.cluster.ensure_node("node-a", "zone-a")
        # Labelled as Dynamo's operator labels component Services: the injected sidecars watch such slices.
        self.cluster.create_service(NAMESPACE, SERVICE, {"app": "worker"}, labels=DYNAMO_DISCOVERY)
        # Until admission knows the just-installed parameters' kind and object, it refuses labelled pods
        # (docs/operations.md): wait until a dry-run create of one comes back with the sidecar.
        say("waiting until admission injects: a dry-run create of a labelled pod comes back with the sidecar")
        wait_until_injecting(self.cluster.api, NAMESPACE)

    def add_pod(self, name: str, role: str, ready: bool = True) -> SidecarProcess:
        """A pod with nothing of the sidecar but the label; its sidecar runs from what injection added."""
        assert self.cluster is not None and self.plane is not None
        created = self.cluster.create_pod(NAMESPACE, name, {"app": "worker", "role": role, **INJECT})
        if injected_sidecar(created) is None:
            raise RuntimeError(f"pod {name} was admitted without the sidecar: is the injection policy installed?")
        pod = self.cluster.set_pod_status(NAMESPACE, name, ready=ready)
        process = launch_from_pod(
            self.plane, self.cluster, pod, self.work_dir / "sidecars", extra_env={"DISCOVERY_BACKOFF_MAX": "2s"}
        )
        self.sidecars[name] = process
        return process

    # -- the watcher ---------------------------------------------------------------------------------
    def start_watcher(self, target: str) -> None:
        say(f"following the peer set as router-0 sees it: discovery-sidecar peers --watch --target {target} ...")
        self.watch = PeerWatch(target, "--group", "prefill=role=prefill", "--group", "decode=role=decode").start()

    def wait_line(self, fragment: str, timeout: float = 60.0) -> None:
        assert self.watch is not None
        self.watch.wait_line(fragment, timeout)

    # -- the story -----------------------------------------------------------------------------------
    def run(self) -> None:
        self.start_control_plane()
        self.install_chart()
        say("starting 3 workers (2 prefill, 1 decode) and a router: pods labelled discovery-sidecar.io/inject=true;")
        say("each gets the sidecar from the admission policy, run here as a process from its injected spec")
        router = self.add_pod("router-0", "router")
        for name, role in (("prefill-0", "prefill"), ("prefill-1", "prefill"), ("decode-0", "decode")):
            self.add_pod(name, role)
        spec = self.sidecars["decode-0"].pod["spec"]
        injected = [c["name"] for c in spec["initContainers"]]
        volumes = [v["name"] for v in spec["volumes"]]
        say(f"decode-0 as the API server stored it: initContainers {injected}, volumes {volumes}")
        for process in self.sidecars.values():
            process.wait_ready(60)
        self.start_watcher(router.target)
        self.wait_line("# snapshot")
        self.pause()

        say("scale up: decode-1 joins")
        self.add_pod("decode-1", "decode").wait_ready(60)
        self.wait_line("added\tdecode-1")
        self.pause()

        say("prefill-1 fails its readiness probe: it leaves the peer set")
        assert self.cluster is not None
        self.cluster.set_pod_status(NAMESPACE, "prefill-1", ready=False)
        self.wait_line("removed\tprefill-1")
        self.pause()

        say("prefill-1 is ready again")
        self.cluster.set_pod_status(NAMESPACE, "prefill-1", ready=True)
        self.wait_line("added\tprefill-1")
        self.pause()

        say("decode-0's main container publishes a model card through its sidecar (PublishMetadata)")
        with DiscoveryClient(self.sidecars["decode-0"].target) as client:
            own_id = client.get_self().instance_id
            card = {  # the entry shape Dynamo 1.6.1 writes, so Dynamo's own readers accept it too
                "type": "Model",
                "namespace": "demo",
                "component": "backend",
                "endpoint": "generate",
                "instance_id": own_id,
                "card_json": {"display_name": "llama-3-8b", "context_length": 8192},
            }
            client.publish_metadata({"model_cards": {f"demo/backend/generate/{own_id:x}": card}}, merge=True)
        self.wait_line("updated\tdecode-0")
        self.pause()

        say("decode-1 is shut down: SIGTERM to its sidecar deregisters it, then the pod goes")
        self.sidecars.pop("decode-1").terminate(30)
        self.wait_line("removed\tdecode-1")
        self.cluster.delete_pod(NAMESPACE, "decode-1", grace_seconds=0)
        self.pause()

        say("kube-apiserver restarts: the stream reports DEGRADED (peers kept, maybe stale), then recovers")
        assert self.plane is not None
        self.plane.stop_apiserver()
        self.wait_line("status\tdegraded")
        self.plane.start_apiserver()
        self.wait_line("status\tconnected", timeout=120)
        self.pause()

        say("final peer set from router-0 (discovery-sidecar peers):")
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.app.cli", "peers", "--target", router.target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        print(out, flush=True)
        say("the same, as the DynamoWorkerMetadata objects Dynamo's own discovery reads (kubectl get dwm):")
        print(self.kubectl("get", "dwm", "-n", NAMESPACE, "-o", "wide"), flush=True)

        self.dynamo = DynamoScene(self.plane, self.cluster, self.work_dir / "dynamo", say, self.pause)
        self.dynamo.run()

    def cleanup(self) -> None:
        if self.dynamo is not None:
            self.dynamo.stop()
        if self.watch is not None:
            self.watch.stop()
        for process in self.sidecars.values():
            with contextlib.suppress(Exception):
                process.terminate(15)
        if self.plane is not None:
            self.plane.stop()
        say("cleaned up: sidecars and control plane stopped")


def main(argv: list[str] | None = None) -> int:
    return run_story("python -m demo", (__doc__ or "").splitlines()[0], Demo, say, argv)


if __name__ == "__main__":
    sys.exit(main())
