"""``python -m bench`` (``make bench``): the sidecar against its baselines, on one real control plane.

Everything runs side by side in one run: the same API server, the same writes, every watcher
observing every write. Results go to bench/results.json (raw numbers), bench/RESULTS.md (tables, ratios,
targets) and bench/plots/ (latency CDFs, memory against peers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

from bench import pipeline, profiling, report, scenarios
from bench.baselines.build_go import ensure_go_watch
from bench.baselines.build_rust import ensure_kube_rs_watch
from bench.observers import LineObserver, Observer, SidecarObserver
from bench.workload import LABELS, NAMESPACE, SERVICE, Workload
from devcluster.build import ROOT, ensure_built, pinned_versions
from devcluster.cluster import ControlPlane
from devcluster.faults import FaultProxy
from devcluster.objects import Cluster
from devcluster.sidecars import launch_sidecar, write_token_kubeconfig
from devcluster.waiting import wait_for
from sidecar.kube.api import KubeApi

BENCH_DIR = ROOT / "bench"
SELECTOR = f"kubernetes.io/service-name={SERVICE}"


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, work: pathlib.Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.rng = random.Random(20261123)
        self.plane: ControlPlane | None = None
        self.cluster: Cluster | None = None
        self.workload: Workload | None = None
        self.observer_pod: dict[str, Any] | None = None
        self.go_watch = ensure_go_watch()
        self.kube_rs_watch = ensure_kube_rs_watch()

    # -- set-up ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.plane = ControlPlane(bin_dir=ensure_built(), work_dir=self.work / "controlplane", log=say)
        self.plane.start()
        api = KubeApi.from_kubeconfig(str(self.plane.kubeconfig))
        self.cluster = Cluster(api)
        kubectl = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}"]
        manifests = ROOT / "manifests"
        subprocess.run(
            kubectl + ["apply", "-f", str(manifests / "components" / "crd" / "crd.yaml")],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            kubectl + ["wait", "--for=condition=Established", "crd/dynamoworkermetadatas.nvidia.com"],
            check=True,
            capture_output=True,
        )
        self.cluster.create_namespace(NAMESPACE)
        subprocess.run(
            kubectl + ["apply", "-n", NAMESPACE, "-f", str(manifests / "rbac.yaml")], check=True, capture_output=True
        )
        self.cluster.wait_for_service_account(NAMESPACE, "discovery-sidecar")
        self.cluster.ensure_node("node-a", "zone-a")
        self.cluster.create_service(NAMESPACE, SERVICE, LABELS)
        # The observing pod is not behind the Service: it watches the peers without being one.
        self.observer_pod = self.cluster.start_pod(NAMESPACE, "observer", {"app": "observer"})
        self.workload = Workload(self.cluster)

    def stop(self) -> None:
        if self.plane is not None:
            self.plane.stop()

    # -- observers ---------------------------------------------------------------------------------------
    def observers(self, proxies: dict[str, FaultProxy] | None = None) -> list[Observer]:
        assert self.plane is not None and self.cluster is not None and self.observer_pod is not None
        proxies = proxies or {}
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        admin = self.plane.kubeconfig

        def kubeconfig_for(name: str) -> str:
            if name not in proxies:
                return str(admin)
            token = self.plane.admin_token  # type: ignore[union-attr]
            return str(write_token_kubeconfig(self.plane, token, logs / f"{name}.kubeconfig", proxies[name].server))

        common = ["--namespace", NAMESPACE, "--slice-selector", SELECTOR]
        sidecar = launch_sidecar(
            self.plane,
            self.cluster,
            self.observer_pod,
            SERVICE,
            logs,
            labels={"app": "observer"},
            extra_env={"DISCOVERY_LOG_LEVEL": "warning"},
            server=proxies["sidecar"].server if "sidecar" in proxies else None,
            start=False,  # the observer starts it, so that start-up is timed
        )
        return [
            LineObserver(
                "raw-watch",
                [str(self.go_watch), "--kubeconfig", kubeconfig_for("raw-watch"), "--mode", "raw", *common],
                logs,
            ),
            LineObserver(
                "client-go-informer",
                [
                    str(self.go_watch),
                    "--kubeconfig",
                    kubeconfig_for("client-go-informer"),
                    "--mode",
                    "informer",
                    *common,
                ],
                logs,
            ),
            LineObserver(
                "kube-rs-reflector",
                [str(self.kube_rs_watch), "--kubeconfig", kubeconfig_for("kube-rs-reflector"), *common],
                logs,
            ),
            SidecarObserver(sidecar),
        ]

    def start_observers(self, observers: list[Observer], timeout: float = 300) -> dict[str, float]:
        startup = {}
        for observer in observers:
            observer.start()  # type: ignore[attr-defined]
        for observer in observers:
            if not observer.wait_synced(timeout):
                raise RuntimeError(f"{observer.name} did not sync within {timeout}s")
            assert observer.synced_ns is not None
            startup[observer.name] = (observer.synced_ns - observer.started_ns) / 1e9
        return startup

    @staticmethod
    def stop_observers(observers: list[Observer]) -> None:
        for observer in observers:
            try:
                observer.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                say(f"stopping {observer.name}: {exc}")

    # -- phases ------------------------------------------------------------------------------------------
    def sizes_phase(self) -> dict[str, Any]:
        assert self.workload is not None
        results: dict[str, Any] = {}
        sizes = sorted(set(self.args.sizes) | set(self.args.memory_sizes) | {0})
        for size in sizes:
            self.workload.grow_to(size, log=say)
            observers = self.observers()
            try:
                startup = self.start_observers(observers)
                time.sleep(2)  # let start-up garbage settle before reading RSS (a measurement, not a sync)
                entry: dict[str, Any] = {
                    "startup_seconds": startup,
                    "rss_mb": {o.name: o.rss_bytes() / 2**20 for o in observers},
                }
                if size in self.args.sizes:
                    rounds = []
                    for index in range(self.args.rounds):
                        say(f"N={size}: latency round {index + 1}/{self.args.rounds}")
                        rounds.append(
                            scenarios.latency_round(
                                self.workload, observers, self.args.cr_writes, self.args.toggles, self.rng
                            )
                        )
                    entry["latency"] = scenarios.summarise_latency(rounds)
                    entry["rss_after_latency_mb"] = {o.name: o.rss_bytes() / 2**20 for o in observers}
                results[str(size)] = entry
                say(f"N={size}: startup {json.dumps({k: round(v, 2) for k, v in startup.items()})}")
            finally:
                self.stop_observers(observers)
        return results

    def churn_phase(self) -> dict[str, Any]:
        assert self.workload is not None
        self.workload.grow_to(self.args.churn_size, log=say)
        observers = self.observers()
        results = []
        try:
            self.start_observers(observers)
            for writers in self.args.churn_writers:
                say(f"churn: {writers} writer threads for {self.args.churn_seconds}s")
                results.append(scenarios.churn(self.workload, observers, writers, self.args.churn_seconds))
            profiles = self.profile_sidecar(observers)
        finally:
            self.stop_observers(observers)
        return {
            "peers": self.workload.size,  # at least churn_size: the workload never shrinks
            "runs": results,
            "profile": profiles["gil"],  # CPU only: samples holding the GIL, native frames
            "profile_wall": profiles["wall"],  # every thread that is not idle, waiting included
        }

    def profile_sidecar(self, observers: list[Observer]) -> dict[str, Any]:
        """py-spy samples the sidecar while writers keep it busy: CPU only (GIL held), then every thread."""
        sidecar = next(o for o in observers if isinstance(o, SidecarObserver))
        assert sidecar.process is not None and self.workload is not None
        workload = self.workload
        results = {}
        for mode in (profiling.GIL, profiling.WALL):
            results[mode.name] = profiling.profile(
                sidecar.process.pid,
                self.work,
                BENCH_DIR / "results",
                mode,
                seconds=20,
                load=lambda: scenarios.churn(workload, [sidecar], 4, 20),
            )
        return results

    def restart_phase(self) -> dict[str, Any]:
        assert self.plane is not None
        observers = self.observers()
        sidecar = next(o for o in observers if isinstance(o, SidecarObserver))
        try:
            self.start_observers(observers)
            before = scenarios.scrape(sidecar.sidecar.http_port)
            self.plane.stop_apiserver()
            wait_for(lambda: any(not c for _, c in sidecar.status_records), 60, what="the sidecar to notice")
            started = time.time_ns()
            self.plane.start_apiserver()
            api_ready = time.time_ns()
            wait_for(lambda: any(c and t > started for t, c in sidecar.status_records), 120, what="recovery")
            recovered = next(t for t, c in sidecar.status_records if c and t > started)
            after = scenarios.scrape(sidecar.sidecar.http_port)
            return {
                "peers": self.workload.size if self.workload else 0,
                "apiserver_restart_seconds": (api_ready - started) / 1e9,
                "sidecar_recovery_after_apiserver_ready_seconds": (recovered - api_ready) / 1e9,
                "relists": after.get("discovery_relists_total", 0) - before.get("discovery_relists_total", 0),
            }
        finally:
            self.stop_observers(observers)

    def cost_phase(self) -> dict[str, Any]:
        """Bytes each watcher pulls from the API server: idle, then during a rolling restart of peers."""
        assert self.workload is not None and self.plane is not None
        names = ["raw-watch", "client-go-informer", "kube-rs-reflector", "sidecar"]
        proxies = {name: FaultProxy(self.plane.apiserver_port) for name in names}
        observers = self.observers(proxies)
        sidecar = next(o for o in observers if isinstance(o, SidecarObserver))
        try:
            self.start_observers(observers)
            results: dict[str, Any] = {"peers": self.workload.size}
            for phase, action in (("idle_60s", lambda: time.sleep(60)), ("rolling_restart", self.rolling_restart)):
                bytes_before = {n: p.bytes_from_server for n, p in proxies.items()}
                metrics_before = scenarios.scrape(sidecar.sidecar.http_port)
                started = time.monotonic()
                action()
                seconds = time.monotonic() - started
                metrics_after = scenarios.scrape(sidecar.sidecar.http_port)
                results[phase] = {
                    "seconds": seconds,
                    "bytes_from_apiserver": {n: p.bytes_from_server - bytes_before[n] for n, p in proxies.items()},
                    "sidecar_requests": metrics_after.get("discovery_api_requests_total", 0)
                    - metrics_before.get("discovery_api_requests_total", 0),
                    "sidecar_body_bytes": metrics_after.get("discovery_api_received_bytes_total", 0)
                    - metrics_before.get("discovery_api_received_bytes_total", 0),
                }
            return results
        finally:
            self.stop_observers(observers)
            for proxy in proxies.values():
                proxy.close()

    def rolling_restart(self) -> None:
        """Every peer in turn: deleted, re-created under the same name (new UID), ready, re-registered."""
        assert self.workload is not None and self.cluster is not None
        for name in sorted(self.workload.pods)[: self.args.rolling_peers]:
            old = self.workload.pods[name]
            self.cluster.delete_pod(NAMESPACE, name, grace_seconds=0)
            wait_for(
                lambda n=name: self.cluster.get_or_none(f"/api/v1/namespaces/{NAMESPACE}/pods/{n}") is None,  # type: ignore[union-attr]
                30,
                what=f"{name} deleted",
            )
            pod = self.cluster.start_pod(NAMESPACE, name, old["metadata"].get("labels") or LABELS)
            self.workload.write_cr(pod, 0)
            self.workload.pods[name] = pod


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "go": version(["go", "version"]),
        "rustc": version(["rustc", "--version"]),
        **pinned_versions(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser.add_argument("--sizes", type=ints, default=[100, 1000, 5000], help="peer counts for latency")
    parser.add_argument("--memory-sizes", type=ints, default=[100, 1000, 5000, 10000], help="peer counts for RSS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cr-writes", type=int, default=60, help="CR updates per round")
    parser.add_argument("--toggles", type=int, default=20, help="readiness flips (unready+ready) per round")
    parser.add_argument("--churn-size", type=int, default=1000, help="at least this many peers during churn")
    parser.add_argument("--churn-writers", type=ints, default=[2, 4, 8])
    parser.add_argument("--churn-seconds", type=float, default=10)
    parser.add_argument("--rolling-peers", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (sizes 20/50, one round)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.memory_sizes, args.rounds = [20], [20, 50], 1
        args.cr_writes, args.toggles, args.churn_size = 10, 4, 50
        args.churn_writers, args.churn_seconds, args.rolling_peers = [2], 3, 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="discovery-bench-") as tmp:
        bench = Bench(pathlib.Path(tmp), args)
        results: dict[str, Any] = {"machine": machine(), "args": vars(args), "started": started}
        try:
            bench.start()
            results["sizes"] = bench.sizes_phase()
            results["churn"] = bench.churn_phase()
            results["restart"] = bench.restart_phase()
            results["cost"] = bench.cost_phase()
        finally:
            bench.stop()
    # The sidecar's own capacity, measured with the control plane stopped: nothing else on the machine.
    say("pipeline capacity (control plane stopped)")
    results["churn"]["pipeline"] = pipeline.median_of_runs(peers=args.churn_size, runs=3)
    results["duration_seconds"] = time.time() - started
    out = BENCH_DIR / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps(results, indent=2))
    if not args.quick:
        report.write(results, BENCH_DIR)
    say(f"results: {out}" + ("" if args.quick else f", {BENCH_DIR / 'RESULTS.md'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
