"""``python -m bench.smg_compare``: the same churn seen by SGLang Model Gateway two ways, on one control plane.

* **smg-kubernetes**: the real ``smg`` 1.13 with its own Kubernetes discovery (``--service-discovery
  --selector ... --service-discovery-namespace ... --service-discovery-port ...``), as its users run it.
* **smg-via-sidecar**: the same binary with ``--discovery-provider file``, fed by the discovery sidecar
  (pod-label discovery, ``DISCOVERY_REQUIRE_METADATA=false``, ``DISCOVERY_SMG_MANIFEST``).

Both watch the same namespace of the real API server through their own fault proxy, and both see every
write. The workers are stand-in HTTP servers on loopback addresses (the pods' IPs), which keep answering
health checks after their pod is gone: only discovery can remove a stale worker. After each step the
ground truth is computed from the API server itself (pods matching the selector that are Ready, Running,
with an IP and not deleting, their ``smg.ai/worker-ports`` or the port), and both gateways' ``/workers``
are polled until they equal it, or a deadline. Results: bench/smg-results.json and bench/SMG.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.smg_traffic import SECTION as TRAFFIC_SECTION
from devcluster.build import ROOT, ensure_built, pinned_versions
from devcluster.cluster import ControlPlane, free_port
from devcluster.faults import FaultProxy
from devcluster.objects import Cluster
from devcluster.sidecars import launch_sidecar, write_token_kubeconfig
from devcluster.smg import SmgGateway, StandInWorker
from sidecar.kube.api import KubeApi

NAMESPACE = "smg-bench"
SELECTOR = {"app": "sglang-worker"}
DEADLINE = 90.0  # per step; SMG drains a removed worker for 5 s first, and re-reconciles every 60 s
SILENCE = "10s"  # the sidecar's DISCOVERY_WATCH_SILENCE_TIMEOUT in this run
POLL = 0.05
BENCH_DIR = ROOT / "bench"


def say(message: str) -> None:
    print(f"[smg-bench] {message}", file=sys.stderr, flush=True)


@dataclass
class StepResult:
    name: str
    what: str
    truth: list[str]
    converged: dict[str, float | None] = field(default_factory=dict)  # seconds, None: not by the deadline
    final: dict[str, list[str]] = field(default_factory=dict)


class Run:
    def __init__(self, work: pathlib.Path) -> None:
        self.work = work
        self.plane = ControlPlane(bin_dir=ensure_built(), work_dir=work / "controlplane", log=say)
        self.addresses = (f"127.0.{a}.{b}" for a in range(200, 250) for b in range(2, 250))
        self.port = free_port()
        self.stand_ins: list[StandInWorker] = []
        self.results: list[StepResult] = []

    # -- set-up -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.plane.start()
        self.cluster = Cluster(KubeApi.from_kubeconfig(str(self.plane.kubeconfig)))
        kubectl = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}"]
        manifests = ROOT / "manifests"
        subprocess.run(
            [*kubectl, "apply", "-f", str(manifests / "components" / "crd" / "crd.yaml")],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "crd/dynamoworkermetadatas.nvidia.com"],
            check=True,
            capture_output=True,
        )
        self.cluster.create_namespace(NAMESPACE)
        for name in ("rbac.yaml", "components/pod-discovery/rbac-pod-discovery.yaml"):
            subprocess.run([*kubectl, "apply", "-n", NAMESPACE, "-f", str(manifests / name)], check=True)
        self.cluster.wait_for_service_account(NAMESPACE, "discovery-sidecar")
        self.cluster.ensure_node("node-a", "zone-a")

        logs = self.work / "logs"
        logs.mkdir()
        self.proxies = {
            "smg-kubernetes": FaultProxy(self.plane.apiserver_port),
            "sidecar": FaultProxy(self.plane.apiserver_port),
        }
        kubeconfig = write_token_kubeconfig(
            self.plane, self.plane.admin_token, logs / "smg.kubeconfig", self.proxies["smg-kubernetes"].server
        )
        selector = " ".join(f"{k}={v}" for k, v in SELECTOR.items())
        self.smg_kubernetes = SmgGateway(
            [
                "--service-discovery",
                "--selector",
                selector,
                "--service-discovery-namespace",
                NAMESPACE,
                "--service-discovery-port",
                str(self.port),
            ],
            logs / "smg-kubernetes.log",
            env={"KUBECONFIG": str(kubeconfig)},
        )
        gateway = self.cluster.start_pod(NAMESPACE, "gateway", {"app": "gateway"})
        manifest = self.work / "shared" / "workers.json"
        manifest.parent.mkdir()
        sidecar_env = {
            "DISCOVERY_SERVICE_NAME": "",
            "DISCOVERY_POD_SELECTOR": ",".join(f"{k}={v}" for k, v in SELECTOR.items()),
            "DISCOVERY_REQUIRE_METADATA": "false",
            "DISCOVERY_WORKER_PORT": str(self.port),
            "DISCOVERY_SMG_MANIFEST": str(manifest),
            "DISCOVERY_SMG_SELECTOR": selector,
            "DISCOVERY_WATCH_SILENCE_TIMEOUT": SILENCE,
            "DISCOVERY_LOG_LEVEL": "warning",
        }
        self.sidecar = launch_sidecar(
            self.plane, self.cluster, gateway, "", logs, extra_env=sidecar_env, server=self.proxies["sidecar"].server
        ).wait_ready(60)
        self.smg_sidecar = SmgGateway.with_file(manifest, logs / "smg-via-sidecar.log")
        self.gateways = {"smg-kubernetes": self.smg_kubernetes, "smg-via-sidecar": self.smg_sidecar}

    def stop(self) -> None:
        for gateway in getattr(self, "gateways", {}).values():
            gateway.stop()
        if hasattr(self, "sidecar"):
            self.sidecar.kill()
        for proxy in getattr(self, "proxies", {}).values():
            proxy.close()
        for worker in self.stand_ins:
            worker.stop()
        self.plane.stop()

    # -- the world ----------------------------------------------------------------------------------------
    def serve(self, address: str, ports: tuple[int, ...] = ()) -> None:
        for port in ports or (self.port,):
            self.stand_ins.append(StandInWorker(address, port))

    def worker(self, name: str, ports: tuple[int, ...] = ()) -> None:
        address = next(self.addresses)
        self.serve(address, ports)
        annotations = {"smg.ai/worker-ports": ",".join(map(str, ports))} if ports else {}
        self.cluster.start_pod(NAMESPACE, name, SELECTOR, ip=address, annotations=annotations)

    def truth(self) -> set[str]:
        """Worker URLs as the API server says they should be: ready, running, not deleting, selected."""
        query = ",".join(f"{k}={v}" for k, v in SELECTOR.items())
        pods = self.cluster.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods", query=[("labelSelector", query)])
        urls = set()
        for pod in pods["items"]:
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
            if not ready or status.get("phase") != "Running" or not status.get("podIP"):
                continue
            if pod["metadata"].get("deletionTimestamp"):
                continue
            raw = (pod["metadata"].get("annotations") or {}).get("smg.ai/worker-ports")
            ports = [int(p) for p in raw.split(",")] if raw else [self.port]
            urls.update(f"http://{status['podIP']}:{port}" for port in ports)
        return urls

    def seen(self, name: str) -> set[str]:
        try:
            return {str(w["url"]) for w in self.gateways[name].workers()}
        except (RuntimeError, OSError, ValueError):
            return {"<unreachable>"}

    # -- steps --------------------------------------------------------------------------------------------
    def step(self, name: str, what: str, action: Callable[[], None]) -> None:
        say(f"step {name}: {what}")
        action()
        started = time.monotonic()
        truth = self.truth()
        result = StepResult(name, what, sorted(truth), {g: None for g in self.gateways})
        while time.monotonic() - started < DEADLINE:
            for gateway in self.gateways:
                if result.converged[gateway] is None and self.seen(gateway) == truth:
                    result.converged[gateway] = round(time.monotonic() - started, 2)
            if all(v is not None for v in result.converged.values()):
                break
            time.sleep(POLL)  # a polling interval of the measurement, not a synchronisation
        result.final = {g: sorted(self.seen(g)) for g in self.gateways}
        say(f"  converged: {result.converged}")
        self.results.append(result)

    def churn(self) -> None:
        two = (free_port(), free_port())
        self.step("scale-up", "6 pods, one with smg.ai/worker-ports (7 workers)", lambda: self._scale_up(two))
        self.step("unready", "w-1 turns unready", lambda: self._status("w-1", False))
        self.step("ready-again", "w-1 ready again", lambda: self._status("w-1", True))
        self.step("graceful-delete", "w-2 deleted with grace 300 s (terminating)", lambda: self._delete("w-2", 300))
        self.step("force-delete", "w-3 deleted with grace 0", lambda: self._delete("w-3", 0))
        self.step("relabel", "w-4 relabelled out of the selector", lambda: self._relabel("w-4"))
        self.step("ip-change", "w-5 gets a new IP", self._ip_change)
        self.step("same-name-restart", "w-0 force-deleted and recreated (new UID, new IP)", self._restart)
        self.step("silent-watch", f"watch connections frozen, then w-6 added (sidecar: {SILENCE})", self._silent)

    def _scale_up(self, two: tuple[int, int]) -> None:
        for index in range(6):
            self.worker(f"w-{index}", two if index == 5 else ())

    def _status(self, name: str, ready: bool) -> None:
        self.cluster.set_pod_status(NAMESPACE, name, ready=ready)

    def _delete(self, name: str, grace: int) -> None:
        self.cluster.delete_pod(NAMESPACE, name, grace_seconds=grace)

    def _relabel(self, name: str) -> None:
        self.cluster.relabel_pod(NAMESPACE, name, {"app": "retired"})

    def _ip_change(self) -> None:
        address = next(self.addresses)  # w-5 has two worker ports from its annotation: serve both there
        pod = self.cluster.api.get(f"/api/v1/namespaces/{NAMESPACE}/pods/w-5")
        ports = tuple(int(p) for p in pod["metadata"]["annotations"]["smg.ai/worker-ports"].split(","))
        self.serve(address, ports)
        self.cluster.set_pod_status(NAMESPACE, "w-5", ready=True, ip=address)

    def _restart(self) -> None:
        self.cluster.delete_pod(NAMESPACE, "w-0", grace_seconds=0)
        while self.cluster.get_or_none(f"/api/v1/namespaces/{NAMESPACE}/pods/w-0") is not None:
            time.sleep(POLL)
        self.worker("w-0")

    def _silent(self) -> None:
        for proxy in self.proxies.values():
            proxy.freeze_existing()
        self.worker("w-6")


def write_report(results: list[StepResult], versions: dict[str, str]) -> None:
    data = {"versions": versions, "deadline_seconds": DEADLINE, "steps": [r.__dict__ for r in results]}
    (BENCH_DIR / "smg-results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# SMG discovery: its own Kubernetes watcher vs fed by the sidecar",
        "",
        "Generated by `python -m bench.smg_compare` (raw numbers: `bench/smg-results.json`). The same churn on",
        "one real control plane, both gateways the real `smg` 1.13 from PyPI, both watching through their own",
        "loopback proxy; stand-in workers keep answering health checks after their pod is gone. Time to",
        f"converge: from the write's response until `/workers` equals the ground truth (deadline {DEADLINE:.0f} s;",
        "`never` = not by then). Ground truth: the API server's pods matching the selector that are Ready,",
        "Running, with an IP and not deleting, at their `smg.ai/worker-ports` or the configured port.",
        "",
        "| step | what | truth | smg-kubernetes | smg-via-sidecar |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(result: StepResult, gateway: str) -> str:
        seconds = result.converged[gateway]
        if seconds is not None:
            return f"{seconds:.2f} s"
        final = set(result.final[gateway])
        truth = set(result.truth)
        extra, missing = len(final - truth), len(truth - final)
        return f"never (+{extra} stale, -{missing} missing)"

    for r in results:
        lines.append(
            f"| {r.name} | {r.what} | {len(r.truth)} | {cell(r, 'smg-kubernetes')} | {cell(r, 'smg-via-sidecar')} |"
        )
    last = results[-1]
    lines += [
        "",
        "Final sets after the last step:",
        "",
        f"* ground truth: {len(last.truth)} workers",
    ]
    for gateway, final in last.final.items():
        lines.append(
            f"* {gateway}: {len(final)} workers, {len(set(final) - set(last.truth))} stale, "
            f"{len(set(last.truth) - set(final))} missing"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]
    path = BENCH_DIR / "SMG.md"
    traffic = path.read_text().partition(TRAFFIC_SECTION) if path.exists() else ("", "", "")
    # bench.smg_traffic's section (failed requests through a rollout) is its own: kept as it is.
    path.write_text("\n".join(lines) + (f"\n{traffic[1]}{traffic[2]}" if traffic[1] else ""))


def main() -> int:
    work = pathlib.Path(tempfile.mkdtemp(prefix="smg-bench-"))  # kept: the gateways' logs are in logs/
    run = Run(work)
    try:
        run.start()
        run.churn()
    finally:
        run.stop()
    say(f"logs: {work / 'logs'}")
    versions = dict(pinned_versions())
    versions["smg"] = importlib.metadata.version("smg")
    write_report(run.results, versions)
    say("wrote bench/SMG.md and bench/smg-results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
