"""``python -m bench.cost`` (``make bench-cost``): what discovery costs the API server at scale (issue #13).

One real control plane, ``P`` pods behind a Service, each with its DynamoWorkerMetadata CR written as
Dynamo writes it; ``W`` watchers simulated by ``bench.watchers`` (one process holding every watch, with
a sidecar's requests, shown equal to a real sidecar's through the API server's audit log). For each
``P`` and each case (``W = P``, every pod watches; ``W = R`` routers), side by side on the same plane:

* connect: the watchers start (the initial lists and watches of a start-up storm);
* idle: ``--idle-seconds`` with nothing happening (what the watches cost at rest: bookmarks);
* rollout: a rolling restart at a fixed rate: each pod deleted and replaced by a new pod (new name and
  UID, as a Deployment does), ready, with a new CR; the old CR goes with the old pod (garbage
  collection). In the ``W = P`` case the replaced pod's watcher restarts too (its sidecar's relist).

The cases (``--cases``): ``routers`` (``W = R`` peer watchers), ``own`` (the same routers plus one
own-registration watch per pod, the watch of its own CR by field selector every sidecar holds whatever
``DISCOVERY_WATCH`` says, restarted with the new pod's name when a pod is replaced: the default
deployment since issue 19) and ``every`` (``W = P``, every pod watching its peers). ``own`` against
``routers`` is what the own-registration watches cost; against ``every``, what they cost next to the peer
watches ``DISCOVERY_WATCH=auto`` took away.
  When a whole rollout would not fit the time budget, ``--max-restarts`` replaces a prefix of the pods
  and the report scales the per-restart cost to the whole rollout (the cost per restart does not depend
  on how many came before: every restart is about two EndpointSlice updates and two CR events, fanned
  out, plus in the ``W = P`` case one watcher's fresh sync).

Per phase: bytes the watchers received, the API server's own accounting (``apiserver_watch_events_sizes``,
which also counts the control plane's own few watches, and ``apiserver_response_sizes`` of lists), its
CPU seconds (``/proc/<pid>/stat``) and peak RSS (sampled), and the time until every watcher holds the
final state (each watcher's name -> resourceVersion map equals a LIST of the truth).

The watchers' initial sync is ``--initial stream`` (the sidecar's default) or ``list`` (paged LIST); before
the cases, a real sidecar in each mode and one simulated watcher are compared in the audit log.

Results: ``bench/results/cost-p<P>[-stream][-<tag>].json`` (one per run; ``--tag`` keeps repeats made in
separate runs), ``bench/results/COST.md`` (medians over every result file) and ``bench/plots/cost.png``.
Benchmarks measure; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.watchers import OWN, normalise
from bench.workload import LABELS, NAMESPACE, SERVICE, metadata
from devcluster.build import ROOT, ensure_built
from devcluster.cluster import ControlPlane
from devcluster.objects import ENDPOINT_SLICES, SERVICE_ACCOUNTS, WORKER_METADATA, Cluster
from devcluster.sidecars import SIDECAR_SERVICE_ACCOUNT, launch_sidecar
from devcluster.waiting import wait_for
from sidecar.kube.api import KubeApi

RESULTS_DIR = ROOT / "bench" / "results"
PLOTS_DIR = ROOT / "bench" / "plots"
SLICE_SELECTOR = f"kubernetes.io/service-name={SERVICE}"
SIM_AGENT = "bench-watchers/1"
KINDS = {"endpointslices": "EndpointSlice", "dynamoworkermetadatas": "DynamoWorkerMetadata"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[bench.cost] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- the control plane, with an audit log of the sidecar's service account ---------------------------------
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "users": [f"system:serviceaccount:{NAMESPACE}:{SIDECAR_SERVICE_ACCOUNT}"]},
        {"level": "None"},
    ],
}


@dataclass
class AuditedControlPlane(ControlPlane):
    """The devcluster plane plus an audit log of the requests the sidecar's service account makes."""

    @property
    def audit_log(self) -> pathlib.Path:
        return self.work_dir / "audit.log"

    def _apiserver_argv(self, paths: dict[str, pathlib.Path]) -> list[str]:
        policy = self.work_dir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        return super()._apiserver_argv(paths) + [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-maxsize=0",
        ]


# -- process accounting -------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat (fields 14 and 15)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The peak resident size of some processes over a phase, sampled every ``interval`` seconds."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = {name: rss_bytes(pid) for name, pid in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError):
                    self.peak[name] = max(self.peak[name], rss_bytes(pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def scrape(plane: ControlPlane) -> dict[str, float]:
    """The API server's counters this benchmark reads, summed per (metric, verb or kind, resource)."""
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    request = urllib.request.Request(
        plane.server + "/metrics", headers={"Authorization": f"Bearer {plane.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        raw = response.read()
    totals: dict[str, float] = {}
    wanted_resources = set(KINDS) | set(KINDS.values())
    for family in text_string_to_metric_families(raw.decode()):
        if family.name not in ("apiserver_request", "apiserver_watch_events_sizes", "apiserver_response_sizes"):
            continue
        for sample in family.samples:
            labels = sample.labels
            resource = labels.get("resource") or labels.get("kind") or ""
            if resource not in wanted_resources:
                continue
            resource = {v: k for k, v in KINDS.items()}.get(resource, resource)
            if family.name == "apiserver_request" and sample.name == "apiserver_request_total":
                key = f"requests {labels.get('verb')} {resource}"
            elif family.name == "apiserver_watch_events_sizes" and sample.name.endswith(("_sum", "_count")):
                key = f"watch_event_{sample.name.rsplit('_', 1)[1]} {resource}"
            elif family.name == "apiserver_response_sizes" and sample.name.endswith("_sum"):
                key = f"response_bytes {labels.get('verb')} {resource}"
            else:
                continue
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# -- the simulator, as a child process -------------------------------------------------------------------
class JsonLinesChild:
    """A subscriber process driven by JSON lines on its stdin, one JSON reply per line on its stdout
    (``bench.watchers``; ``bench.peer_subscribers``)."""

    def __init__(self, argv: Sequence[str], log: pathlib.Path) -> None:
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT
            )
        self.ps = psutil.Process(self.process.pid)

    def call(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the subscriber process exited with {self.process.wait()}")
        return json.loads(line)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Simulator(JsonLinesChild):
    """``bench.watchers`` in a subprocess."""

    def __init__(
        self,
        plane: ControlPlane,
        token_file: pathlib.Path,
        watchers: int,
        log: pathlib.Path,
        initial: str = "list",
        own_names: list[str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        names_file = log.with_suffix(".own-names.json")
        names_file.write_text(json.dumps(own_names or []))
        argv = [
            sys.executable,
            "-m",
            "bench.watchers",
            "--server",
            plane.server,
            "--token-file",
            str(token_file),
            "--ca",
            str(plane.ca_file),
            "--namespace",
            NAMESPACE,
            "--watchers",
            str(watchers),
            "--slice-selector",
            SLICE_SELECTOR,
            "--initial",
            initial,
            "--own-names-file",
            str(names_file),
            *extra,
        ]
        super().__init__(argv, log)


# -- the fleet ----------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """``P`` slots; slot ``i`` holds one pod at a time, named ``peer-<i>-g<generation>`` (a Deployment's
    replacement pod has a new name and UID)."""

    cluster: Cluster
    size: int
    threads: int = 8
    generation: dict[int, int] = field(default_factory=dict)
    pods: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_write: float = 0.0

    def name(self, slot: int) -> str:
        return f"peer-{slot:05d}-g{self.generation.get(slot, 0)}"

    def _start(self, slot: int) -> None:
        name = self.name(slot)
        role = "prefill" if slot % 2 == 0 else "decode"
        pod = self.cluster.start_pod(NAMESPACE, name, {**LABELS, "role": role})
        self.cluster.register_like_dynamo(pod, metadata(name, self.generation.get(slot, 0)))
        self.pods[slot] = pod
        self.last_write = max(self.last_write, time.monotonic())

    def create(self) -> None:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self._start, range(self.size)))

    def replace(self, slot: int) -> None:
        """Delete the slot's pod (its CR goes by garbage collection) and start its successor."""
        self.cluster.delete_pod(NAMESPACE, self.name(slot), grace_seconds=0)
        self.generation[slot] = self.generation.get(slot, 0) + 1
        self._start(slot)

    def names(self) -> set[str]:
        return {self.name(slot) for slot in range(self.size)}

    def settled(self) -> bool:
        """The controllers have caught up: the slices list exactly the current pods, all ready, and the
        CRs are exactly the current pods' (the old ones garbage-collected)."""
        names = self.names()
        ready: set[str] = set()
        for item in list_all(self.cluster.api, ENDPOINT_SLICES.collection(NAMESPACE), SLICE_SELECTOR):
            for endpoint in item.get("endpoints") or ():
                ref = (endpoint.get("targetRef") or {}).get("name")
                if not (endpoint.get("conditions") or {}).get("ready") or ref not in names:
                    return False
                ready.add(ref)
        if ready != names:
            return False
        crs = {i["metadata"]["name"] for i in list_all(self.cluster.api, WORKER_METADATA.collection(NAMESPACE))}
        return crs == names

    def truth(self) -> dict[str, dict[str, str]]:
        return {
            "endpointslices": rv_map(list_all(self.cluster.api, ENDPOINT_SLICES.collection(NAMESPACE), SLICE_SELECTOR)),
            "dynamoworkermetadatas": rv_map(list_all(self.cluster.api, WORKER_METADATA.collection(NAMESPACE))),
        }


def list_all(api: KubeApi, path: str, selector: str = "") -> Iterator[dict[str, Any]]:
    token = ""
    while True:
        query = [("limit", "500")] + ([("labelSelector", selector)] if selector else [])
        if token:
            query.append(("continue", token))
        page = api.get(path, query)
        yield from page.get("items") or ()
        token = page["metadata"].get("continue") or ""
        if not token:
            return


def rv_map(items: Iterator[dict[str, Any]]) -> dict[str, str]:
    return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}


def paced(count: int, rate: float, action: Callable[[int], None], threads: int = 4) -> None:
    """Start ``action(i)`` for i in range(count) at ``rate`` per second (on a few threads, so that one slow
    request does not shift the schedule)."""
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        futures = []
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the schedule: a fixed rate, not a wait for a condition
            futures.append(pool.submit(action, i))
        for future in futures:
            future.result()


def prepare_workload(plane: ControlPlane, token_file: pathlib.Path) -> tuple[KubeApi, Cluster]:
    """On a started plane: the CRD, the bench namespace with the sidecar's RBAC, and a token of the sidecar's
    service account in ``token_file`` for the simulated subscribers (``bench.rollout`` shares this)."""
    api = KubeApi.from_kubeconfig(str(plane.kubeconfig))
    cluster = Cluster(api)
    kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}"]
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
    cluster.create_namespace(NAMESPACE)
    subprocess.run(
        kubectl + ["apply", "-n", NAMESPACE, "-f", str(manifests / "rbac.yaml")], check=True, capture_output=True
    )
    cluster.wait_for_service_account(NAMESPACE, SIDECAR_SERVICE_ACCOUNT)
    # The simulated sidecars authenticate as the sidecar's service account (RBAC and all), with a
    # token not bound to a pod: the pods they stand for come and go during the rollout.
    reply = api.create(
        SERVICE_ACCOUNTS.item(NAMESPACE, SIDECAR_SERVICE_ACCOUNT) + "/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 7200},
        },
    )
    token_file.write_text(reply["status"]["token"])
    token_file.chmod(0o600)
    return api, cluster


# -- the benchmark --------------------------------------------------------------------------------------------
class CostBench:
    def __init__(self, work: pathlib.Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.plane = AuditedControlPlane(bin_dir=ensure_built(), work_dir=work / "controlplane", log=say)
        self.api: KubeApi | None = None
        self.cluster: Cluster | None = None
        self.token_file = work / "watcher.token"

    def start(self) -> None:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.plane.start()
        self.api, self.cluster = prepare_workload(self.plane, self.token_file)
        self.cluster.ensure_node("node-a", "zone-a")
        self.cluster.create_service(NAMESPACE, SERVICE, LABELS)

    def stop(self) -> None:
        self.plane.stop()

    @property
    def apiserver_pid(self) -> int:
        return self.plane.pids()["kube-apiserver"]

    # -- request shape: one real sidecar against one simulated watcher -------------------------------------
    def request_shapes(self) -> dict[str, Any]:
        """For each initial sync (the sidecar's DISCOVERY_INITIAL_LIST), the requests of a real sidecar and
        of one simulated watcher, from the audit log."""
        return {mode: self.request_shape(mode) for mode in ("list", "stream")}

    def request_shape(self, initial: str) -> dict[str, Any]:
        assert self.cluster is not None
        logs = self.work / "logs"
        seen = {row["id"] for row in self._audit(sidecar=True) + self._audit(sidecar=False)}
        name = f"observer-{initial}"
        pod = self.cluster.start_pod(NAMESPACE, name, {"app": "observer"})
        sidecar = launch_sidecar(
            self.plane,
            self.cluster,
            pod,
            SERVICE,
            logs,
            labels={"app": "observer"},
            extra_env={"DISCOVERY_INITIAL_LIST": "pages" if initial == "list" else "stream"},
        )
        try:
            sidecar.wait_ready(60)
            # Under DISCOVERY_WATCH=auto (the default) the peer watches start on the first request for peers;
            # the watch of its own CR runs from start-up.
            wait_for(lambda: sidecar.http_get("/debug/peers")[0] == 200, 60, what="the sidecar's peer list")
            wait_for(
                lambda: len({r["shape"] for r in self._audit(True, seen) if r["verb"] == "watch"}) >= 3,
                60,
                what="the sidecar's three watches in the audit log",
            )
        finally:
            sidecar.terminate()
        # The sidecar also watches its own CR (by name): the simulated watcher follows the same name.
        simulator = Simulator(
            self.plane, self.token_file, 1, logs / f"simulator-shape-{initial}.log", initial, own_names=[name]
        )
        try:
            simulator.call(cmd="wait_ready")
            wait_for(
                lambda: len({r["shape"] for r in self._audit(False, seen) if r["verb"] == "watch"}) >= 3,
                60,
                what="the simulator's three watches in the audit log",
            )
        finally:
            simulator.close()
        self.cluster.delete_pod(NAMESPACE, name)
        real = self._audit(True, seen)
        simulated = self._audit(False, seen)

        def watch_shape(rows: list[dict[str, str]]) -> list[str]:
            return sorted({r["shape"] for r in rows if r["resource"] in KINDS and r["verb"] in ("list", "watch")})

        return {
            "sidecar": sorted({r["shape"] for r in real}),
            "simulator": sorted({r["shape"] for r in simulated}),
            "same_list_and_watch_requests": watch_shape(real) == watch_shape(simulated),
        }

    def _audit(self, sidecar: bool, seen: set[str] | None = None) -> list[dict[str, str]]:
        """The sidecar's (or the simulator's) requests in the audit log (but those in ``seen``), one row per
        request, with the query's varying values (resourceVersion, continue token, the timeout) normalised."""
        rows: dict[str, dict[str, str]] = {}
        with contextlib.suppress(OSError), self.plane.audit_log.open() as log:
            for line in log:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if (event.get("userAgent") == SIM_AGENT) == sidecar or event["auditID"] in (seen or ()):
                        continue
                    ref = event.get("objectRef") or {}
                    rows[event["auditID"]] = {
                        "id": event["auditID"],
                        "verb": event.get("verb", ""),
                        "resource": ref.get("resource", ""),
                        "shape": f"{event.get('verb', '').upper()} {normalise(event.get('requestURI', ''))}",
                    }
        return list(rows.values())

    # -- one case -----------------------------------------------------------------------------------------
    def case(
        self, fleet: Fleet, watchers: int, restarts: int, every_pod: bool, initial: str, own: bool = False
    ) -> dict[str, Any]:
        assert self.api is not None
        label = f"W={watchers}" + (" (every pod)" if every_pod else " (routers)") + (" + own" if own else "")
        more = f" and {fleet.size} own-registration watches" if own else ""
        say(f"P={fleet.size} {label}: starting {watchers} watchers ({initial}){more}")
        pids = {"kube-apiserver": self.apiserver_pid, "etcd": self.plane.pids()["etcd"]}
        result: dict[str, Any] = {
            "P": fleet.size,
            "W": watchers,
            "every_pod": every_pod,
            "initial": initial,
            "own": fleet.size if own else 0,
        }
        phase_start = self._snapshot(None)
        with RssSampler(pids) as rss:
            log = self.work / "logs" / f"sim-{fleet.size}-{watchers}{'-own' if own else ''}.log"
            names = [fleet.name(slot) for slot in range(fleet.size)] if own else None
            simulator = Simulator(self.plane, self.token_file, watchers, log, initial, own_names=names)
            rss.pids["simulator"] = simulator.process.pid
            rss.peak["simulator"] = 0
            try:
                simulator.call(cmd="wait_ready")
                connected = self._snapshot(simulator)
                result["connect"] = self._phase(phase_start, connected, rss)
                say(f"  connected in {result['connect']['seconds']:.1f}s; idle for {self.args.idle_seconds:g}s")
                rss.peak = {name: rss_bytes(pid) for name, pid in rss.pids.items()}
                time.sleep(self.args.idle_seconds)  # a measuring window, not a wait for a condition
                idled = self._snapshot(simulator)
                result["idle"] = self._phase(connected, idled, rss)
                say(
                    f"  idle: {result['idle']['watcher_bytes'] / result['idle']['seconds']:.0f} B/s to watchers, "
                    f"apiserver {result['idle']['apiserver_cpu_s'] / result['idle']['seconds']:.3f} CPU-s/s; "
                    f"rollout of {restarts} pods"
                )
                rss.peak = {name: rss_bytes(pid) for name, pid in rss.pids.items()}

                lock = threading.Lock()

                def locked_restart(slot: int) -> None:
                    fleet.replace(slot)
                    if every_pod:  # the new pod's sidecar starts: list and watch from scratch
                        with lock:  # one command at a time on the simulator's pipe
                            simulator.call(cmd="restart", ids=[slot])
                    if own:  # the new pod's sidecar watches its own (new) CR from scratch
                        with lock:
                            simulator.call(cmd="restart_own", ids=[slot], names=[fleet.name(slot)])

                rollout_start = time.monotonic()
                paced(restarts, self.args.rate, locked_restart)
                last_write = fleet.last_write
                wait_for(fleet.settled, 300, interval=0.25, what="the controllers to settle after the rollout")
                settled = time.monotonic()
                converged: dict[str, Any] = {}
                for _ in range(10):  # the truth can move once more (a late controller write): re-read it
                    converged = simulator.call(cmd="converge", truth=fleet.truth(), timeout=30)
                    if converged["converged"]:
                        break
                done = self._snapshot(simulator)
                rollout = self._phase(idled, done, rss)
                changes = [t for t in converged["last_change"] if t > 0]  # the peer watchers
                own_changes = [t for t in converged.get("own_last_change", []) if t > 0]
                rollout.update(
                    restarts=restarts,
                    rate_per_s=self.args.rate,
                    write_seconds=last_write - rollout_start,
                    settle_after_last_write_s=settled - last_write,
                    converged=converged["converged"],
                    behind=converged["behind_count"],
                    converge_after_last_write_s=max(changes + own_changes) - last_write if changes else None,
                    fanout_spread_s=max(changes) - min(changes) if changes else None,
                )
                own_bytes = rollout["watcher_bytes_by_resource"].get(OWN, 0)
                rollout["per_restart"] = {
                    "watcher_bytes": rollout["watcher_bytes"] / restarts,
                    "own_bytes": own_bytes / restarts,
                    "apiserver_cpu_s": rollout["apiserver_cpu_s"] / restarts,
                }
                rollout["full_rollout_estimate"] = {
                    "watcher_bytes": rollout["watcher_bytes"] / restarts * fleet.size,
                    "own_bytes": own_bytes / restarts * fleet.size,
                    "apiserver_cpu_s": rollout["apiserver_cpu_s"] / restarts * fleet.size,
                }
                result["rollout"] = rollout
                say(
                    f"  rollout: {rollout['watcher_bytes'] / 1e6:.1f} MB to watchers, apiserver "
                    f"{rollout['apiserver_cpu_s']:.1f} CPU-s, converged {rollout['converged']} "
                    f"{rollout['converge_after_last_write_s']}s after the last write"
                )
            finally:
                simulator.close()
        return result

    def _snapshot(self, simulator: Simulator | None) -> dict[str, Any]:
        assert self.api is not None
        pids = self.plane.pids()
        return {
            "t": time.monotonic(),
            "cpu": {n: cpu_seconds(pids[n]) for n in ("kube-apiserver", "etcd", "kube-controller-manager")},
            "metrics": scrape(self.plane),
            "sim": simulator.call(cmd="stats")["stats"] if simulator else {"bytes": {}, "events": {}, "requests": {}},
            "sim_cpu": simulator.cpu() if simulator else 0.0,
        }

    @staticmethod
    def _phase(before: dict[str, Any], after: dict[str, Any], rss: RssSampler) -> dict[str, Any]:
        sim_bytes = {k: v - before["sim"]["bytes"].get(k, 0) for k, v in after["sim"]["bytes"].items()}
        metrics = delta(after["metrics"], before["metrics"])
        return {
            "seconds": after["t"] - before["t"],
            "watcher_bytes": sum(sim_bytes.values()),
            "watcher_bytes_by_resource": sim_bytes,
            "watcher_events": delta(after["sim"]["events"], before["sim"]["events"]),
            "watcher_requests": delta(after["sim"]["requests"], before["sim"]["requests"]),
            "watcher_errors": delta(after["sim"].get("errors", {}), before["sim"].get("errors", {})),
            "apiserver_watch_event_bytes": sum(v for k, v in metrics.items() if k.startswith("watch_event_sum")),
            "apiserver_list_response_bytes": sum(v for k, v in metrics.items() if k.startswith("response_bytes LIST")),
            "apiserver_metrics": metrics,
            "apiserver_cpu_s": after["cpu"]["kube-apiserver"] - before["cpu"]["kube-apiserver"],
            "etcd_cpu_s": after["cpu"]["etcd"] - before["cpu"]["etcd"],
            "kcm_cpu_s": after["cpu"]["kube-controller-manager"] - before["cpu"]["kube-controller-manager"],
            "simulator_cpu_s": after["sim_cpu"] - before["sim_cpu"],
            "peak_rss_bytes": dict(rss.peak),
        }

    def run_size(self, size: int) -> dict[str, Any]:
        assert self.cluster is not None
        fleet = Fleet(self.cluster, size)
        say(f"P={size}: creating {size} pods with their CRs")
        started = time.monotonic()
        fleet.create()
        wait_for(fleet.settled, 600, interval=0.5, what=f"{size} ready pods with CRs")
        say(f"P={size}: created in {time.monotonic() - started:.0f}s")
        # The API server's own load with nothing happening (controllers' resyncs, leases), to read the
        # phases' CPU seconds against.
        idle_from, idle_start = cpu_seconds(self.apiserver_pid), time.monotonic()
        time.sleep(10)  # a measuring window, not a wait for a condition
        idle = (cpu_seconds(self.apiserver_pid) - idle_from) / (time.monotonic() - idle_start)
        say(f"P={size}: idle API server: {idle:.3f} CPU-s per second")
        result: dict[str, Any] = {"P": size, "idle_apiserver_cpu_per_s": idle, "cases": []}
        cases = {
            "routers": (self.args.routers, False, False),
            "own": (self.args.routers, False, True),
            "every": (size, True, False),
        }
        chosen = ["routers"] if self.args.routers_only else self.args.cases.split(",")
        for _ in range(self.args.repeats):
            for name in chosen:
                watchers, every_pod, own = cases[name]
                limit = self.args.max_restarts if every_pod else self.args.router_restarts
                restarts = min(size, limit or size)
                result["cases"].append(self.case(fleet, watchers, restarts, every_pod, self.args.initial, own))
        for slot in range(size):  # leave the namespace empty for the next size
            self.cluster.delete_pod(NAMESPACE, fleet.name(slot))
        wait_for(
            lambda: not any(True for _ in list_all(self.cluster.api, WORKER_METADATA.collection(NAMESPACE))),  # type: ignore[union-attr]
            300,
            interval=0.5,
            what="the CRs garbage-collected",
        )
        return result


# -- report -----------------------------------------------------------------------------------------------------
def summarise(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (P, W) across repeats of the figures the table shows."""
    groups: dict[tuple[int, int, str, int], list[dict[str, Any]]] = {}
    for case in cases:
        groups.setdefault((case["P"], case["W"], case["initial"], case.get("own", 0)), []).append(case)
    rows = []
    for (size, watchers, initial, own), group in sorted(groups.items()):

        def med(get: Callable[[dict[str, Any]], float | None], group: list[dict[str, Any]] = group) -> float | None:
            values = [v for v in (get(c) for c in group) if v is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "P": size,
                "W": watchers,
                "initial": initial,
                "own": own,
                "repeats": len(group),
                "restarts": group[0]["rollout"]["restarts"],
                "connect_bytes": med(lambda c: c["connect"]["watcher_bytes"]),
                "connect_apiserver_cpu_s": med(lambda c: c["connect"]["apiserver_cpu_s"]),
                "connect_seconds": med(lambda c: c["connect"]["seconds"]),
                "connect_peak_rss": med(lambda c: c["connect"]["peak_rss_bytes"]["kube-apiserver"]),
                "rollout_bytes": med(lambda c: c["rollout"]["watcher_bytes"]),
                "rollout_apiserver_watch_bytes": med(lambda c: c["rollout"]["apiserver_watch_event_bytes"]),
                "bytes_per_restart": med(lambda c: c["rollout"]["per_restart"]["watcher_bytes"]),
                "full_rollout_bytes": med(lambda c: c["rollout"]["full_rollout_estimate"]["watcher_bytes"]),
                "rollout_apiserver_cpu_s": med(lambda c: c["rollout"]["apiserver_cpu_s"]),
                "full_rollout_apiserver_cpu_s": med(lambda c: c["rollout"]["full_rollout_estimate"]["apiserver_cpu_s"]),
                "rollout_peak_rss": med(lambda c: c["rollout"]["peak_rss_bytes"]["kube-apiserver"]),
                "rollout_seconds": med(lambda c: c["rollout"]["seconds"]),
                "simulator_cpu_s": med(lambda c: c["rollout"]["simulator_cpu_s"]),
                "converge_s": med(lambda c: c["rollout"]["converge_after_last_write_s"]),
                "fanout_spread_s": med(lambda c: c["rollout"]["fanout_spread_s"]),
                "converged": all(c["rollout"]["converged"] for c in group),
                # the idle window (cases measured since issue 19), per second
                "idle_bytes_per_s": med(
                    lambda c: c["idle"]["watcher_bytes"] / c["idle"]["seconds"] if "idle" in c else None
                ),
                "idle_own_bytes_per_s": med(
                    lambda c: (
                        c["idle"]["watcher_bytes_by_resource"].get(OWN, 0) / c["idle"]["seconds"]
                        if "idle" in c
                        else None
                    )
                ),
                "idle_apiserver_cpu_per_s": med(
                    lambda c: c["idle"]["apiserver_cpu_s"] / c["idle"]["seconds"] if "idle" in c else None
                ),
                "connect_own_bytes": med(lambda c: c["connect"]["watcher_bytes_by_resource"].get(OWN, 0)),
                "own_bytes_per_restart": med(lambda c: c["rollout"]["per_restart"].get("own_bytes")),
                "full_rollout_own_bytes": med(lambda c: c["rollout"]["full_rollout_estimate"].get("own_bytes")),
            }
        )
    return rows


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_report() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    shapes: list[tuple[float, dict[str, Any]]] = []  # (when the run ended, its request shapes)
    machine: dict[str, Any] = {}
    own_runs: list[dict[str, Any]] = []  # the runs that measured the own-registration watches, alone
    for path in sorted(RESULTS_DIR.glob("cost-p*.json")):
        data = json.loads(path.read_text())
        cases += data["cases"]
        if any(c.get("own") for c in data["cases"]):
            own_runs += data["cases"]
        machine = data.get("machine", machine)
        if data.get("request_shape"):
            shapes.append((path.stat().st_mtime, data["request_shape"]))
    rows = summarise(cases)
    lines = [
        "# API server cost at scale (issue #13, items 4-5)",
        "",
        "Generated by `python -m bench.cost` (`make bench-cost`) from `bench/results/cost-p*.json`; see",
        "`bench/COST_MODEL.md` for the model these figures are set against. One real kube-apiserver + etcd +",
        f"kube-controller-manager on {machine.get('cores', '?')} shared cores; watchers simulated by `bench.watchers`",
        "(one process, every watch a sidecar's requests). Rollout: every pod replaced (new name and UID, ready,",
        "new CR) at a fixed rate; where `restarts < P` only a prefix was replaced and `full rollout` scales the",
        "per-restart figures to all `P`. Medians over `n` repeats. MB = 10^6 bytes.",
        "",
        "| P | W | initial sync | n | restarts | connect: MB / apiserver CPU-s / s | rollout MB "
        "(apiserver watch-event MB) | KB per restart | full rollout MB | rollout apiserver CPU-s (full) | "
        "apiserver peak RSS MB (connect / rollout) | converge s after last write (fan-out spread) | "
        "simulator CPU-s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        not_converged = "" if r["converged"] else " NOT converged"
        watchers = f"{r['W']} + {r['own']} own" if r["own"] else str(r["W"])
        lines.append(
            f"| {r['P']} | {watchers} | {r['initial']} | {r['repeats']} | {r['restarts']} | "
            f"{_mb(r['connect_bytes'])} / {_num(r['connect_apiserver_cpu_s'])} / {_num(r['connect_seconds'])} | "
            f"{_mb(r['rollout_bytes'])} ({_mb(r['rollout_apiserver_watch_bytes'])}) | "
            f"{_num((r['bytes_per_restart'] or 0) / 1e3)} | {_mb(r['full_rollout_bytes'])} | "
            f"{_num(r['rollout_apiserver_cpu_s'])} ({_num(r['full_rollout_apiserver_cpu_s'])}) | "
            f"{_mb(r['connect_peak_rss'])} / {_mb(r['rollout_peak_rss'])} | "
            f"{_num(r['converge_s'], 2)} ({_num(r['fanout_spread_s'], 2)}){not_converged} | "
            f"{_num(r['simulator_cpu_s'])} |"
        )
    lines += own_registration_section(summarise(own_runs), rows)
    if shapes:
        latest = max(shapes, key=lambda shape: shape[0])[1]  # the latest run's
        if "sidecar" in latest:  # a result file from before the streaming list: one paged-list shape
            latest = {"list": latest}
        lines += [
            "",
            "## Request shape: one real sidecar vs one simulated watcher (API server audit log)",
            "",
            "The sidecar's other requests are its registration (its own CR: read, apply, delete at SIGTERM), which",
            "the benchmark's workload writes as Dynamo does; the simulated watchers make only the watches' requests.",
        ]
        for mode, shape in latest.items():
            setting = "pages" if mode == "list" else mode
            lines += [
                "",
                f"`DISCOVERY_INITIAL_LIST={setting}` against `--initial {mode}`: same LIST and WATCH requests: "
                f"**{shape['same_list_and_watch_requests']}**.",
                "",
                "| request (values that vary between runs normalised) | real sidecar | simulated watcher |",
                "| --- | --- | --- |",
            ]
            real, sim = set(shape["sidecar"]), set(shape["simulator"])
            for request in sorted(real | sim, key=lambda r: (r.split("?")[0].split("/")[-1], r)):
                lines.append(
                    f"| `{request}` | {'yes' if request in real else ''} | {'yes' if request in sim else ''} |"
                )
    (RESULTS_DIR / "COST.md").write_text("\n".join(lines) + "\n")
    plot(rows)
    return rows


def _find(rows: list[dict[str, Any]], size: int, watchers: int, initial: str, own: int) -> dict[str, Any] | None:
    return next((r for r in rows if (r["P"], r["W"], r["initial"], r["own"]) == (size, watchers, initial, own)), None)


OWN_HEADER = [
    "",
    "## Own-registration watches (issue 19)",
    "",
    "Every sidecar watches its own CR (the CR collection, `fieldSelector=metadata.name=<its CR>`) whatever",
    "`DISCOVERY_WATCH` says. `+ own` is the routers case plus one such watch per pod (restarted with the new",
    "pod's name when a pod is replaced), measured in the same runs as the routers alone (medians over those runs",
    "only); the difference is what the own-registration watches cost. Idle: the bytes per second the watchers",
    "received (bookmarks) and the API server's CPU-s per second over the idle window. Rollout: the full rolling",
    "restart, as above. The last column sets the own-registration watches' rollout bytes and extra CPU-s against",
    "every pod watching its peers (`W = P`, same runs if measured there, else every run).",
    "",
    "| P | sync | idle B/s: routers / + own (own alone) | idle apiserver CPU-s/s: routers / + own | "
    "connect: own MB | rollout MB: routers / + own (own alone) | rollout apiserver CPU-s: routers / + own | "
    "own against W = P: bytes / CPU-s |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
]


def own_registration_section(rows: list[dict[str, Any]], everything: list[dict[str, Any]]) -> list[str]:
    """The cost of every pod's own-registration watch (issue 19): the ``own`` case against the routers alone,
    measured side by side in one run, and against every pod watching its peers."""
    lines: list[str] = []
    for r in sorted((r for r in rows if r["own"]), key=lambda r: (r["initial"], r["P"])):
        base = _find(rows, r["P"], r["W"], r["initial"], 0)
        every = _find(rows, r["P"], r["P"], r["initial"], 0) or _find(everything, r["P"], r["P"], r["initial"], 0)
        if base is None:
            continue
        own_cpu = (r["full_rollout_apiserver_cpu_s"] or 0) - (base["full_rollout_apiserver_cpu_s"] or 0)
        against = "-"
        if every is not None and every["full_rollout_bytes"] and every["full_rollout_apiserver_cpu_s"]:
            share_bytes = (r["full_rollout_own_bytes"] or 0) / every["full_rollout_bytes"]
            share_cpu = own_cpu / every["full_rollout_apiserver_cpu_s"]
            against = (
                f"{share_bytes:.2%} / {share_cpu:.1%} (of {_mb(every['full_rollout_bytes'])} MB / "
                f"{_num(every['full_rollout_apiserver_cpu_s'])} CPU-s)"
            )
        idle_bytes = f"{_num(base['idle_bytes_per_s'], 0)} / {_num(r['idle_bytes_per_s'], 0)}"
        idle_cpu = f"{_num(base['idle_apiserver_cpu_per_s'], 3)} / {_num(r['idle_apiserver_cpu_per_s'], 3)}"
        rollout = f"{_mb(base['full_rollout_bytes'])} / {_mb(r['full_rollout_bytes'])}"
        cpu = f"{_num(base['full_rollout_apiserver_cpu_s'])} / {_num(r['full_rollout_apiserver_cpu_s'])}"
        lines.append(
            f"| {r['P']} | {r['initial']} | {idle_bytes} ({_num(r['idle_own_bytes_per_s'], 0)}) | {idle_cpu} | "
            f"{_mb(r['connect_own_bytes'])} | {rollout} ({_mb(r['full_rollout_own_bytes'])}) | {cpu} | {against} |"
        )
    return OWN_HEADER + lines if lines else []


def plot(rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    every: list[dict[str, Any]] = []
    routers: list[dict[str, Any]] = []
    for initial, style in (("list", "-"), ("stream", "--")):
        mode = [r for r in rows if r["initial"] == initial]
        series_every = sorted((r for r in mode if r["W"] == r["P"] and not r["own"]), key=lambda r: r["P"])
        series_routers = sorted((r for r in mode if r["W"] != r["P"] and not r["own"]), key=lambda r: r["P"])
        series_own = sorted((r for r in mode if r["own"]), key=lambda r: r["P"])
        every += series_every
        routers += series_routers
        for series, label, marker, color in (
            (series_every, "W = P (every pod watches)", "o", "C0"),
            (series_routers, "W = R routers", "s", "C1"),
            (series_own, "W = R routers + every pod's own-registration watch", "^", "C2"),
        ):
            if not series:
                continue
            label = f"{label}, {initial} sync"
            sizes = [r["P"] for r in series]
            bytes_mb = [r["full_rollout_bytes"] / 1e6 for r in series]
            cpu = [r["full_rollout_apiserver_cpu_s"] for r in series]
            left.plot(sizes, bytes_mb, style, marker=marker, color=color, label=label)
            right.plot(sizes, cpu, style, marker=marker, color=color, label=label)
    listed = every + routers
    # COST_MODEL.md's prediction: per restart, every watcher receives ~4 slice updates of ~25 KB and 2 CR events
    # of ~1 KB; with W = P each replaced pod's sidecar also relists (~1.25 KB per pod).
    xs = sorted({r["P"] for r in listed})
    if every:
        left.plot(xs, [p * (p * 102e3 + p * 1.25e3) / 1e6 for p in xs], ":", color="C0", label="model: P² x ~100 KB")
    if routers:
        r_count = routers[0]["W"]
        left.plot(xs, [p * r_count * 102e3 / 1e6 for p in xs], ":", color="C1", label=f"model: {r_count} x P x ~100 KB")
    titles = ("bytes sent to watchers, one rolling restart (MB)", "kube-apiserver CPU-s, one rolling restart")
    for axis, title in zip((left, right), titles, strict=True):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("pods P")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    PLOTS_DIR.mkdir(exist_ok=True)
    fig.savefig(PLOTS_DIR / "cost.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="API server cost of discovery at scale (issue #13)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], help="pod counts P to measure")
    parser.add_argument("--routers", type=int, default=10, help="R, the watchers of the routers-only case")
    parser.add_argument("--routers-only", action="store_true", help="only the routers case (--cases routers)")
    parser.add_argument(
        "--cases",
        default="routers,own,every",
        help="comma-separated: routers (W = R), own (W = R plus every pod's own-registration watch), every (W = P)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=75.0, help="the idle window after connecting (bookmarks: ~1/min)"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="pod replacements per second in the rollout")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="in the W = P case, replace only this many pods (0: all)"
    )
    parser.add_argument(
        "--router-restarts", type=int, default=0, help="in the W = R case, replace only this many pods (0: all)"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--initial",
        choices=("list", "stream"),
        default="stream",
        help="the watchers' initial sync: stream (DISCOVERY_INITIAL_LIST=stream, the default) or list (=pages)",
    )
    parser.add_argument("--no-shape", action="store_true", help="skip the real-sidecar request-shape check")
    parser.add_argument("--tag", default="", help="suffix of the result files (repeats in separate runs)")
    parser.add_argument("--work", help="keep the control plane's files and the logs in this directory")
    parser.add_argument("--report-only", action="store_true", help="rewrite COST.md and the plot from results")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report()
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cost-"))
        bench = CostBench(pathlib.Path(tmp), args)
        try:
            bench.start()
            shape = None if args.no_shape else bench.request_shapes()
            for mode, found in (shape or {}).items():
                say(f"request shape ({mode}): same requests as a real sidecar: {found['same_list_and_watch_requests']}")
            for size in args.sizes:
                result = bench.run_size(size)
                result["request_shape"] = shape
                memory = round(psutil.virtual_memory().total / 2**30, 1)
                result["machine"] = {"cores": psutil.cpu_count(), "memory_gib": memory}
                result["args"] = vars(args)
                suffix = ("" if args.initial == "list" else f"-{args.initial}") + (f"-{args.tag}" if args.tag else "")
                (RESULTS_DIR / f"cost-p{size}{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
                shape = None
        finally:
            bench.stop()
    for row in write_report():
        say(json.dumps(row))


if __name__ == "__main__":
    main()
