"""``python -m bench.rollout`` (``make bench-rollout``): what a real rollout costs, by subscriber arm (issue #23).

``bench.cost`` replaced pods by hand at a fixed rate. Here the rollout is a real one: a Deployment of
``P`` replicas, its pods run by kwok's simulated kubelets (``devcluster.kwok``: IPs, Ready, graceful
termination, deletion), rolled by ``kubectl rollout restart`` through the real Deployment, ReplicaSet and
EndpointSlice controllers with the Deployment's default strategy (25% surge, 25% unavailable). Each pod's
sidecar registration is played by ``Registrar``: the pod's DynamoWorkerMetadata is applied once kwok has
started it, deleted when the pod is deleted (the sidecar's SIGTERM), as the sidecar does.

The subscribers to the peer set are one *arm* (``Subscribers``); every arm meets the same kind of
rollout on the same plane, one after the other:

* ``every-pod`` (``W = P``): each pod's sidecar watches the API server: a ``bench.watchers`` process
  holding one simulated sidecar per live pod (the sidecar's requests; a new pod's sidecar starts with a
  fresh sync when kwok starts the pod, an old one's stops when its pod is gone);
* ``routers`` (``W = R``, 10 by default): only routers watch the API server, through the whole rollout;
* ``relays``: every pod follows one of 3 ``discovery-sidecar relay`` replicas over ``WatchPeers``
  (``RelaySubscribers``); ``relays-kill`` likewise, with one replica killed (SIGKILL) mid-rollout: its
  followers move to the others.

Per arm: the connect phase (the subscribers' initial sync), then the rollout: bytes the subscribers
received and the API server's own count of watch-event bytes, CPU seconds of kube-apiserver, etcd,
kube-controller-manager, kwok and the arm's processes, their peak RSS, and the convergence: for every
subscriber alive at the end, the time from the last new pod's Ready (as seen on a watch) to that
subscriber holding the final peer set (p50, p99, max). The peer set a simulated sidecar holds is the one
the sidecar would serve from what it received (``bench.watchers.PeerView``).

That convergence includes the control plane's own delay: under load the EndpointSlice controller may publish
the last readiness and removals well after the last Ready. So the harness also runs a *truth watcher*
(``bench.truth.TruthWatcher``, started once with the registrar, its history marked at each restart): a direct
watch of the same API server's slices and CRs, joined as a sidecar joins them.
``truth_last_change_after_last_ready_s`` is when its set last changed (``truth_matches_final``: to the final
set), and ``convergence_after_truth_s`` each subscriber's (and probe's) last change after it: the delay of what
lies between the API server and the subscriber, in the relay arms the relay tier's own. The truth watcher is
the harness's: what it received (``truth_watcher_bytes``) is taken out of ``apiserver_watch_event_bytes``.

Results: ``bench/results/rollout-p<P>-<arm>[-<tag>].json``, ``bench/results/ROLLOUT.md`` and
``bench/plots/rollout.png`` (against ``bench/COST_MODEL.md``'s model). Benchmarks measure; nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from bench.cost import (
    PLOTS_DIR,
    RESULTS_DIR,
    SLICE_SELECTOR,
    JsonLinesChild,
    RssSampler,
    Simulator,
    cpu_seconds,
    delta,
    list_all,
    prepare_workload,
    rv_map,
    scrape,
)
from bench.truth import TruthWatcher, join_peers
from bench.watchers import live_endpoints
from bench.workload import LABELS, NAMESPACE, SERVICE, metadata
from devcluster.build import ROOT, ensure_built
from devcluster.cluster import ControlPlane
from devcluster.kwok import Kwok, pod_template_spec
from devcluster.objects import ENDPOINT_SLICES, PODS, SERVICE_ACCOUNTS, WORKER_METADATA, Cluster
from devcluster.relays import RelayProcess, launch_relay, make_relay_tls
from devcluster.sidecars import write_token_kubeconfig
from devcluster.waiting import wait_for
from devcluster.watching import CollectionWatch
from sidecar.kube.api import ApiError, KubeApi

DEPLOYMENT = "workers"


def say(message: str) -> None:
    print(f"[bench.rollout] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- the arms ---------------------------------------------------------------------------------------------------
class Subscribers(Protocol):
    """One arm: a population of subscribers to the peer set, driven through a rollout by ``RolloutBench``.

    Call order: ``start(pods)`` (the connect phase: returns once every subscriber holds its initial set);
    then, during the rollout, ``pod_started``/``pod_gone`` from the registrar's thread for every pod that
    kwok starts or that is deleted; ``stats()`` at each phase's edges; ``converge(...)`` once the cluster
    has settled; ``close()``. ``processes()`` names every process the arm runs, for CPU and peak RSS."""

    name: str
    """The arm's label in results: "every-pod", "routers", "relays"."""

    def start(self, pods: Sequence[str]) -> None: ...

    def pod_started(self, pod: str) -> None: ...

    def pod_gone(self, pod: str) -> None: ...

    def stats(self) -> dict[str, Any]:
        """Counters since start: ``bytes``, ``events``, ``requests``, ``errors`` (each a dict of counts) and
        ``watchers`` (subscribers now). Bytes are what the subscribers received (from the API server, or
        from the relays: the relays' egress)."""
        ...

    def converge(self, truth: dict[str, dict[str, str]], peers: dict[str, str], timeout: float) -> dict[str, Any]:
        """Wait until every subscriber holds ``peers`` (pod name -> READY/DRAINING; API-server watchers also
        ``truth``, the name -> resourceVersion maps); reply ``converged``, ``behind_count`` and
        ``last_peer_change`` (subscriber id -> ``time.monotonic()`` of its last peer-set change)."""
        ...

    def processes(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class ProcessSubscribers:
    """Subscribers in a child process speaking ``bench.watchers``'s JSON-lines commands (``start``, ``stop``,
    ``wait_ready``, ``stats``, ``converge`` with ``peers``). Every arm is one of these; they differ in the
    process's argv and in whether subscribers follow the pods (``every_pod``) or are a fixed set."""

    def __init__(self, name: str, child: JsonLinesChild, every_pod: bool, fixed: int = 0, wave: int = 0) -> None:
        self.name = name
        self.child = child
        self.every_pod = every_pod
        self.fixed = fixed
        self.wave = wave  # > 0: connect this many, wait for their first sync, then the next (``--connect-wave``)
        self.lock = threading.Lock()  # one command at a time on the child's pipe

    def call(self, **command: Any) -> dict[str, Any]:
        with self.lock:
            return self.child.call(**command)

    def start(self, pods: Sequence[str]) -> None:
        ids = list(pods) if self.every_pod else [f"{self.name}-{i}" for i in range(self.fixed)]
        step = self.wave or 500
        for at in range(0, len(ids), step):
            self.call(cmd="start", ids=ids[at : at + step])
            if self.wave:
                self.call(cmd="wait_ready")
        self.call(cmd="wait_ready")

    def pod_started(self, pod: str) -> None:
        if self.every_pod:
            self.call(cmd="start", ids=[pod])

    def pod_gone(self, pod: str) -> None:
        if self.every_pod:
            self.call(cmd="stop", ids=[pod])

    def stats(self) -> dict[str, Any]:
        return self.call(cmd="stats")["stats"]

    def converge(self, truth: dict[str, dict[str, str]], peers: dict[str, str], timeout: float) -> dict[str, Any]:
        return self.call(cmd="converge", truth=truth, peers=peers, timeout=timeout)

    def processes(self) -> dict[str, int]:
        return {"subscribers": self.child.process.pid}

    def close(self) -> None:
        self.child.close()


def watcher_arm(
    name: str, plane: ControlPlane, token: pathlib.Path, logs: pathlib.Path, args: argparse.Namespace
) -> Subscribers:
    """``every-pod`` or ``routers``: simulated sidecars on the API server (``bench.watchers --peers``)."""
    simulator = Simulator(plane, token, 0, logs / f"subscribers-{name}.log", args.initial, extra=["--peers"])
    return ProcessSubscribers(name, simulator, every_pod=name == "every-pod", fixed=args.routers)


def peer_subscribers(
    targets: Sequence[str],
    log: pathlib.Path,
    ca: pathlib.Path | None = None,
    token: pathlib.Path | None = None,
    processes: int = 1,
) -> JsonLinesChild:
    """A ``bench.peer_subscribers`` process: subscribers following ``WatchPeers`` streams, spread over
    ``targets`` (host:port), verified with ``ca`` (else plaintext), presenting ``token`` if given, spread
    over ``processes`` worker processes behind it (1: in that one process)."""
    argv = [sys.executable, "-m", "bench.peer_subscribers", "--targets", ",".join(targets)]
    argv += ["--ca", str(ca)] if ca else []
    argv += ["--token-file", str(token)] if token else []
    argv += ["--processes", str(processes)] if processes > 1 else []
    return JsonLinesChild(argv, log)


RELAY_NAMESPACE = "discovery-sidecar"
RELAY_SERVICE_ACCOUNT = "discovery-sidecar-relay"
RELAY_RBAC = ROOT / "manifests" / "components" / "relay" / "relay-rbac.yaml"
DEFAULT_RELAYS = 3  # replicas of the relay arms; another count is reported as an arm of its own


def relay_kubeconfig(plane: ControlPlane, work: pathlib.Path) -> pathlib.Path:
    """The relays' own credentials: the relay's ServiceAccount with the ClusterRole the manifests ship
    (``manifests/components/relay/relay-rbac.yaml``), so the benchmark runs the relay with exactly the
    rights a deployment gives it."""
    api = KubeApi.from_kubeconfig(str(plane.kubeconfig))
    try:
        cluster = Cluster(api)
        with contextlib.suppress(ApiError):  # already there from an earlier arm
            cluster.create_namespace(RELAY_NAMESPACE)
        kubectl = [str(plane.kubectl), f"--kubeconfig={plane.kubeconfig}", f"--namespace={RELAY_NAMESPACE}"]
        subprocess.run([*kubectl, "apply", "-f", str(RELAY_RBAC)], check=True, capture_output=True, timeout=120)
        cluster.wait_for_service_account(RELAY_NAMESPACE, RELAY_SERVICE_ACCOUNT)
        reply = api.create(
            SERVICE_ACCOUNTS.item(RELAY_NAMESPACE, RELAY_SERVICE_ACCOUNT) + "/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 7200},
            },
        )
    finally:
        api.close()
    return write_token_kubeconfig(plane, reply["status"]["token"], work / "relay.kubeconfig")


class RelaySubscribers(ProcessSubscribers):
    """Every pod's sidecar follows one of the relay replicas: one WatchPeers stream each, over TLS, with the
    sidecar service account's token, spread round-robin over the replicas and moved to the next one when its
    relay fails (``bench.peer_subscribers``). ``kill_at``: once that fraction of ``P`` new pods has started
    during the rollout, the first replica is killed (``relays-kill``); its followers fail over to the others."""

    def __init__(
        self,
        name: str,
        relays: list[RelayProcess],
        child: JsonLinesChild,
        probes: JsonLinesChild,
        kill_at: float | None = None,
        wave: int = 0,
    ) -> None:
        super().__init__(name, child, every_pod=True, wave=wave)
        self.relays = relays
        # One more subscriber per replica, in a process of its own that does nothing else: how soon a reader
        # that keeps up hears the final set (the pods' simulator, one Python thread for all of them, falls
        # behind on this shared machine, so its convergence is partly its own backlog).
        self.probes = ProcessSubscribers("probes", probes, every_pod=False, fixed=len(relays))
        self.kill_at = kill_at
        self.kill_after: int | None = None  # new pods started before the kill; set by start() from P
        self.started_during_rollout = 0
        self.killed_at: float | None = None  # monotonic
        self.workers: dict[str, int] | None = None  # the simulator's worker processes (``--subscriber-processes``)

    def start(self, pods: Sequence[str]) -> None:
        if self.kill_at is not None:
            self.kill_after = max(1, int(self.kill_at * len(pods)))
        self.probes.start(())
        super().start(pods)

    def pod_started(self, pod: str) -> None:
        super().pod_started(pod)
        self.started_during_rollout += 1
        if self.kill_after is not None and self.killed_at is None and self.started_during_rollout >= self.kill_after:
            self.killed_at = time.monotonic()
            say(f"  killing relay-0 after {self.started_during_rollout} new pods")
            self.relays[0].kill()

    def converge(self, truth: dict[str, dict[str, str]], peers: dict[str, str], timeout: float) -> dict[str, Any]:
        reply = super().converge(truth, peers, timeout)
        failovers = reply.pop("failover_s", None) or []
        reply["failover_s"] = {
            "streams": len(failovers),
            "p50": percentile(failovers, 50),
            "p99": percentile(failovers, 99),
            "max": max(failovers) if failovers else None,
        }
        reply["killed_at"] = self.killed_at
        probes = self.probes.converge(truth, peers, timeout)
        reply["probes"] = {
            "converged": probes["converged"],
            "lost": probes.get("lost"),
            "phantom": probes.get("phantom"),
            "last_peer_change": probes["last_peer_change"],
        }
        return reply

    def processes(self) -> dict[str, int]:
        if self.workers is None:
            self.workers = self.call(cmd="pids")["pids"]  # "subscribers-0", ...: their CPU-s and peak RSS
        pids = {f"relay-{i}": r.process.pid for i, r in enumerate(self.relays) if r.process is not None}
        return super().processes() | self.workers | pids

    def close(self) -> None:
        try:
            self.probes.close()
            super().close()
        finally:
            for relay in self.relays:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    relay.terminate()


def relay_arm(
    name: str, plane: ControlPlane, token: pathlib.Path, logs: pathlib.Path, args: argparse.Namespace
) -> Subscribers:
    """``relays`` (and ``relays-kill``): every pod following one of ``--relays`` ``discovery-sidecar relay``
    replicas over WatchPeers (issue #23, items 1-2 and 4). The relays watch ``bench``'s EndpointSlices of
    ``workers`` and its CRs with their own ServiceAccount; the subscribers present ``token`` (the sidecar
    service account's), which the relays check with a TokenReview and a SubjectAccessReview."""
    kubeconfig = relay_kubeconfig(plane, logs)
    tls = make_relay_tls(logs / "relay-pki")  # a test CA of the relays' own, and their certificate for localhost
    watch = {"DISCOVERY_NAMESPACES": NAMESPACE, "DISCOVERY_SERVICE_NAME": SERVICE}
    relays = [launch_relay(f"{name}-relay-{i}", kubeconfig, tls, logs, watch) for i in range(args.relays)]
    try:
        for relay in relays:
            relay.wait_ready(120)
        targets = [r.address for r in relays]
        log = logs / f"subscribers-{name}.log"
        child = peer_subscribers(targets, log, tls.ca, token, processes=args.subscriber_processes)
        probes = peer_subscribers(targets, logs / f"probes-{name}.log", tls.ca, token)
    except BaseException:
        for relay in relays:
            relay.terminate()
        raise
    kill_at = args.kill_at if name == "relays-kill" else None
    return RelaySubscribers(name, relays, child, probes, kill_at, wave=args.connect_wave)


ARMS: dict[str, Callable[[str, ControlPlane, pathlib.Path, pathlib.Path, argparse.Namespace], Subscribers]] = {
    "routers": watcher_arm,
    "every-pod": watcher_arm,
    "relays": relay_arm,
    "relays-kill": relay_arm,
}


# -- the pods' side: registration, and when each pod started, turned Ready, went ------------------------------
@dataclass
class PodRecord:
    name: str
    uid: str
    started: float | None = None  # monotonic: first seen with an IP (its sidecar registers)
    ready: float | None = None  # first seen Ready
    deleting: float | None = None  # first seen with a deletionTimestamp
    gone: float | None = None  # DELETED


class Registrar:
    """Plays every pod's sidecar registration and keeps each pod's lifecycle times, from one pod watch.

    A pod first seen with an IP gets its CR (server-side apply, owned by the pod, as Dynamo writes it) and
    the arm hears ``pod_started``; a deleted pod's CR is deleted (the sidecar's SIGTERM; the garbage
    collector would do it later otherwise); a pod gone is ``pod_gone``. Writes go to a pool, off the watch's
    thread; ``_lock`` guards ``pods``, ``listener`` and ``pending``."""

    def __init__(self, api: KubeApi, cluster: Cluster, threads: int = 8) -> None:
        self.api = api
        self.cluster = cluster
        self.pods: dict[str, PodRecord] = {}
        self.listener: Subscribers | None = None
        self.pending = 0
        self.retries = 0
        self.last_write = 0.0  # monotonic: when the latest CR write (a registration or deregistration) succeeded
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="registrar")
        self._watch = CollectionWatch(
            api, PODS.collection(NAMESPACE), self._on_event, label_selector="app=worker", name="registrar"
        )

    def start(self) -> None:
        self._watch.start()
        wait_for(self._watch.synced.is_set, 60, what="the registrar's pod list")

    def stop(self) -> None:
        self._watch.stop()
        self._pool.shutdown(wait=True)

    def _submit(self, action: Callable[[], None], attempts: int = 10) -> None:
        """Run ``action`` on the pool, retrying with backoff (a loaded API server times out, as it would for
        a sidecar, which retries too); what still fails is recorded and reported."""

        def run() -> None:
            try:
                for attempt in range(attempts):
                    try:
                        action()
                        with self._lock:
                            self.last_write = max(self.last_write, time.monotonic())
                        return
                    except Exception as exc:  # noqa: BLE001 - retried, then recorded
                        if attempt == attempts - 1:
                            with self._lock:
                                self.errors.append(f"{type(exc).__name__}: {exc}")
                            return
                        with self._lock:
                            self.retries += 1
                        time.sleep(min(0.5 * 2**attempt, 10.0))  # backoff before the next try
            finally:
                with self._lock:
                    self.pending -= 1

        with self._lock:
            self.pending += 1
        self._pool.submit(run)

    def _on_event(self, kind: str, pod: Mapping[str, Any]) -> None:
        now = time.monotonic()
        meta, status = pod["metadata"], pod.get("status") or {}
        name = meta["name"]
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or ())
        writes: list[Callable[[], None]] = []  # to the API server, on the pool
        calls: list[Callable[[], None]] = []  # to the arm, in order, on this thread
        with self._lock:
            record = self.pods.get(name)
            if record is None or record.uid != meta["uid"]:
                record = self.pods[name] = PodRecord(name, meta["uid"])
            listener = self.listener
            if kind == "DELETED":
                if record.gone is None:
                    record.gone = now
                    if listener is not None:
                        calls.append(lambda: listener.pod_gone(name))
            else:
                if record.started is None and status.get("podIP") and not meta.get("deletionTimestamp"):
                    record.started = now
                    writes.append(lambda: self._register(pod))
                    if listener is not None:
                        calls.append(lambda: listener.pod_started(name))
                if ready and record.ready is None:
                    record.ready = now
                if meta.get("deletionTimestamp") and record.deleting is None:
                    record.deleting = now
                    writes.append(lambda: self._deregister(name))
        for write in writes:
            self._submit(write)
        for call in calls:
            call()

    def _register(self, pod: Mapping[str, Any]) -> None:
        self.cluster.register_like_dynamo(pod, metadata(pod["metadata"]["name"], 0))

    def _deregister(self, name: str) -> None:
        try:
            self.api.delete(WORKER_METADATA.item(NAMESPACE, name))
        except ApiError as exc:
            if exc.status != 404:
                raise

    def listen(self, arm: Subscribers | None) -> list[PodRecord]:
        """Send pod starts and ends to ``arm`` from now on (None: to no one); return every pod record so far."""
        with self._lock:
            self.listener = arm
            return list(self.pods.values())

    def live(self) -> list[PodRecord]:
        with self._lock:
            return [r for r in self.pods.values() if r.gone is None and r.deleting is None]

    def quiet(self, size: int) -> bool:
        """Exactly ``size`` pods, all Ready, none terminating, every CR write done."""
        with self._lock:
            if self.pending:
                return False
            records = [r for r in self.pods.values() if r.gone is None]
        return len(records) == size and all(r.ready is not None and r.deleting is None for r in records)


# -- the benchmark ---------------------------------------------------------------------------------------------
def final_peers(api: KubeApi) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The truth: name -> resourceVersion of the slices and CRs, and the peer set a sidecar serves from them."""
    slices = list(list_all(api, ENDPOINT_SLICES.collection(NAMESPACE), SLICE_SELECTOR))
    crs = list(list_all(api, WORKER_METADATA.collection(NAMESPACE)))
    names = {i["metadata"]["name"] for i in crs}
    truth = {"endpointslices": rv_map(iter(slices)), "dynamoworkermetadatas": rv_map(iter(crs))}
    return truth, join_peers((live_endpoints(item) for item in slices), names)


def spread(values: Sequence[float]) -> dict[str, Any]:
    """p50, p99, max and min of ``values`` (None for each when there are none)."""
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values, default=None),
        "min": min(values, default=None),
    }


def after_truth(last_peer_change: Mapping[str, float], truth_change: float | None) -> dict[str, Any] | None:
    """Each subscriber's last peer-set change behind the truth watcher's (``TruthWatcher``): the delay of what
    lies between the API server and the subscriber (a relay tier, the simulator's own backlog). None if the
    truth did not change."""
    if truth_change is None:
        return None
    return {"subscribers": len(last_peer_change)} | spread([t - truth_change for t in last_peer_change.values()])


def _probes(probes: Mapping[str, Any] | None, last_ready: float, truth_change: float | None) -> dict[str, Any] | None:
    """The relay arms' probes (one prompt reader per replica): their convergence after the last Ready, and
    behind the truth watcher's last change."""
    if not probes:
        return None
    after = [t - last_ready for t in probes["last_peer_change"].values()]
    return {
        "converged": probes["converged"],
        "lost": probes["lost"],
        "phantom": probes["phantom"],
        "convergence_s": {"subscribers": len(after), "max": max(after) if after else None, "each": sorted(after)},
        "convergence_after_truth_s": after_truth(probes["last_peer_change"], truth_change),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest rank: the value at or below which q% of them lie."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


class RolloutBench:
    def __init__(self, work: pathlib.Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.logs = work / "logs"
        self.plane = ControlPlane(bin_dir=ensure_built(), work_dir=work / "controlplane", log=say)
        self.kwok: Kwok | None = None
        self.api: KubeApi | None = None
        self.cluster: Cluster | None = None
        self.registrar: Registrar | None = None
        self.truth: TruthWatcher | None = None
        self.token_file = work / "subscriber.token"

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.plane.start()
        self.api, self.cluster = prepare_workload(self.plane, self.token_file)
        self.cluster.create_service(NAMESPACE, SERVICE, LABELS)
        self.kwok = Kwok(self.plane, self.work / "kwok", log=say).start()
        self.kwok.add_nodes(self.args.nodes, zones=3)
        # The harness's own writes wait longer than the sidecar's 15 s: the API server is what is overloaded here.
        patient = KubeApi.from_kubeconfig(str(self.plane.kubeconfig), request_timeout=60)
        self.registrar = Registrar(patient, Cluster(patient), threads=self.args.registrar_threads)
        self.registrar.start()
        # The baseline: when the peer set itself last changed, seen by a direct watcher of the same API server.
        self.truth = TruthWatcher(KubeApi.from_kubeconfig(str(self.plane.kubeconfig), request_timeout=60)).start()

    def stop(self) -> None:
        if self.truth is not None:
            self.truth.stop()
            self.truth.api.close()
        if self.registrar is not None:
            self.registrar.stop()
        if self.kwok is not None:
            self.kwok.stop()
        self.plane.stop()

    def pids(self) -> dict[str, int]:
        pids = dict(self.plane.pids())
        if self.kwok is not None and self.kwok.pid is not None:
            pids["kwok"] = self.kwok.pid
        return pids

    # -- the workload ----------------------------------------------------------------------------------------
    def deployment(self, size: int) -> dict[str, Any]:
        args = self.args
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": DEPLOYMENT, "labels": dict(LABELS)},
            "spec": {
                "replicas": size,
                "selector": {"matchLabels": dict(LABELS)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": args.max_surge, "maxUnavailable": args.max_unavailable},
                },
                "template": {
                    "metadata": {
                        "labels": dict(LABELS),
                        "annotations": {
                            "devcluster.kwok/ready": args.ready,
                            "devcluster.kwok/ready-max": args.ready_max,
                            "devcluster.kwok/stop": args.stop,
                        },
                    },
                    "spec": pod_template_spec(
                        terminationGracePeriodSeconds=30,
                        serviceAccountName="discovery-sidecar",
                        automountServiceAccountToken=False,
                        containers=[
                            {
                                "name": "main",
                                "image": "example.invalid/worker:1",
                                "ports": [{"name": "http", "containerPort": 8000}],
                            }
                        ],
                    ),
                },
            },
        }

    def scale_to(self, size: int) -> None:
        assert self.api is not None and self.registrar is not None
        path = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
        try:
            self.api.create(path, self.deployment(size))
        except ApiError as exc:
            if exc.status != 409:
                raise
            self.api.merge_patch(f"{path}/{DEPLOYMENT}", {"spec": {"replicas": size}})
        started = time.monotonic()
        self.wait_settled(size, 1800, f"{size} Ready pods with their CRs")
        say(f"P={size}: {size} pods Ready in {time.monotonic() - started:.0f}s")

    def settled(self, size: int, replaced: frozenset[str] = frozenset()) -> bool:
        """The registrar's pods are quiet, none of them is in ``replaced``, and the slices and CRs say the same."""
        assert self.api is not None and self.registrar is not None
        if not self.registrar.quiet(size):
            return False
        names = {r.name for r in self.registrar.live()}
        if names & replaced:
            return False
        _, peers = final_peers(self.api)
        return peers == dict.fromkeys(names, "READY") and len(names) == size

    def wait_settled(self, size: int, timeout: float, what: str, replaced: frozenset[str] = frozenset()) -> None:
        assert self.registrar is not None
        wait_for(lambda: self.settled(size, replaced), timeout, interval=1.0, what=what)
        if self.registrar.errors:
            raise RuntimeError(f"the registrar's writes failed: {self.registrar.errors[:5]}")

    def kubectl(self, *args: str) -> None:
        argv = [str(self.plane.kubectl), f"--kubeconfig={self.plane.kubeconfig}", f"--namespace={NAMESPACE}", *args]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    # -- one arm ---------------------------------------------------------------------------------------------
    def snapshot(self, arm: Subscribers) -> dict[str, Any]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        for name, pid in arm.processes().items():
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                cpu[name] = times.user + times.system
        truth = self.truth.received_bytes() if self.truth is not None else 0
        return {"t": time.monotonic(), "cpu": cpu, "metrics": scrape(self.plane), "stats": arm.stats(), "truth": truth}

    @staticmethod
    def phase(before: dict[str, Any], after: dict[str, Any], rss: RssSampler) -> dict[str, Any]:
        def counts(key: str) -> dict[str, float]:
            return delta(after["stats"].get(key, {}), before["stats"].get(key, {}))

        metrics = delta(after["metrics"], before["metrics"])
        received = counts("bytes")
        # The truth watcher is the harness's, not the arm's: what it received is taken out of the watch events.
        truth = after.get("truth", 0) - before.get("truth", 0)
        watch_bytes = sum(v for k, v in metrics.items() if k.startswith("watch_event_sum"))
        return {
            "seconds": after["t"] - before["t"],
            "subscriber_bytes": sum(received.values()),
            "subscriber_bytes_by_stream": received,
            "subscriber_events": counts("events"),
            "subscriber_requests": counts("requests"),
            "subscriber_errors": counts("errors"),
            # The most frequent "CODE: details (before/after its snapshot)" of failed streams (relay arms).
            "subscriber_error_reasons": counts("error_reasons"),
            "apiserver_watch_event_bytes": watch_bytes - truth,
            "truth_watcher_bytes": truth,
            "apiserver_list_response_bytes": sum(v for k, v in metrics.items() if k.startswith("response_bytes LIST")),
            "apiserver_metrics": metrics,
            "cpu_s": {n: after["cpu"][n] - before["cpu"].get(n, 0.0) for n in after["cpu"]},
            "peak_rss_bytes": dict(rss.peak),
        }

    def run_arm(self, name: str, size: int) -> dict[str, Any]:
        assert self.api is not None and self.registrar is not None and self.truth is not None
        truth_watcher = self.truth
        arm = ARMS[name](name, self.plane, self.token_file, self.logs, self.args)
        result: dict[str, Any] = {"P": size, "arm": name, "initial": self.args.initial}
        result["kwok_parallelism"] = self.kwok.parallelism if self.kwok else None
        if name.startswith("relays"):
            result["subscriber_processes"] = self.args.subscriber_processes
            result["connect_wave"] = self.args.connect_wave
        pids = self.pids() | arm.processes()
        with RssSampler(pids) as rss:
            try:
                pods = sorted(r.name for r in self.registrar.live())
                before = self.snapshot(arm)
                say(f"P={size} {name}: connecting")
                arm.start(pods)
                connected = self.snapshot(arm)
                result["connect"] = self.phase(before, connected, rss)
                result["subscribers"] = connected["stats"].get("watchers")
                say(f"  connected {result['subscribers']} subscribers in {result['connect']['seconds']:.1f}s")
                rss.peak = {n: 0 for n in rss.pids}
                self.registrar.listen(arm)
                truth_watcher.mark()
                old = frozenset(r.name for r in self.registrar.live())
                restart_at = time.monotonic()
                self.kubectl("rollout", "restart", f"deployment/{DEPLOYMENT}")
                self.wait_settled(size, self.args.rollout_timeout, f"the rollout of {size} pods", replaced=old)
                settled_at = time.monotonic()
                records = self.registrar.listen(None)
                new = [r for r in records if r.name not in old and r.gone is None]
                replaced = [r for r in records if r.name in old]
                last_ready = max(r.ready for r in new if r.ready is not None)
                last_gone = max((r.gone for r in replaced if r.gone is not None), default=settled_at)
                # The peer set is final at the later of the last Ready and the last CR write (a new pod's
                # registration, an old one's deregistration): under load the writes trail the Ready by seconds.
                final_at = max(last_ready, self.registrar.last_write)
                converged: dict[str, Any] = {}
                for _ in range(10):  # the truth can move once more (a late controller write): read it again
                    truth, peers = final_peers(self.api)
                    converged = arm.converge(truth, peers, 60)
                    if converged["converged"]:
                        break
                # The truth watcher holds the final set too (it is one more watcher of the same API server).
                with contextlib.suppress(TimeoutError):
                    wait_for(lambda: truth_watcher.peers() == peers, 30, what="the truth watcher's final set")
                truth_matches = truth_watcher.peers() == peers
                truth_change, truth_changes = truth_watcher.last_change()
                done = self.snapshot(arm)
                rollout = self.phase(connected, done, rss)
                changes = converged.get("last_peer_change") or {}
                after = [t - last_ready for t in changes.values()]
                rollout.update(
                    registrar_retries=self.registrar.retries,
                    binder_retries=self.kwok.binder.failures if self.kwok else None,
                    new_pods=len(new),
                    replaced_pods=sum(1 for r in replaced if r.gone is not None),
                    last_ready_after_restart_s=last_ready - restart_at,
                    last_pod_gone_after_last_ready_s=last_gone - last_ready,
                    last_write_after_last_ready_s=self.registrar.last_write - last_ready,
                    convergence_after_final_s=spread([t - final_at for t in changes.values()]),
                    settled_after_restart_s=settled_at - restart_at,
                    converged=converged["converged"],
                    behind=converged["behind_count"],
                    behind_why=converged.get("behind_why"),
                    behind_sample=converged.get("behind"),
                    lost=converged.get("lost"),
                    phantom=converged.get("phantom"),
                    failover_s=converged.get("failover_s"),
                    probes=_probes(converged.get("probes"), last_ready, truth_change),
                    truth_matches_final=truth_matches,
                    truth_changes=truth_changes,
                    truth_last_change_after_last_ready_s=(
                        truth_change - last_ready if truth_change is not None else None
                    ),
                    convergence_after_truth_s=after_truth(changes, truth_change),
                    relay_killed_after_restart_s=(
                        converged["killed_at"] - restart_at if converged.get("killed_at") else None
                    ),
                    convergence_s={"subscribers": len(after)} | spread(after),
                )
                result["rollout"] = rollout
                conv = rollout["convergence_s"]
                behind = rollout["convergence_after_truth_s"] or {}
                say(
                    f"  rollout: {rollout['subscriber_bytes'] / 1e6:,.1f} MB to subscribers, apiserver "
                    f"{rollout['cpu_s']['kube-apiserver']:.1f} CPU-s, last Ready "
                    f"{rollout['last_ready_after_restart_s']:.1f}s after the restart; converged "
                    f"{rollout['converged']}: p50 {conv['p50']}, p99 {conv['p99']}, max {conv['max']}; the truth "
                    f"last changed {rollout['truth_last_change_after_last_ready_s']}s after the last Ready "
                    f"(matches the final set: {truth_matches}); behind it p50 {behind.get('p50')}, "
                    f"p99 {behind.get('p99')}, max {behind.get('max')}"
                )
            finally:
                self.registrar.listen(None)
                arm.close()
        return result


# -- report ----------------------------------------------------------------------------------------------------
def load_results() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("rollout-p*.json"))]


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _relays(values: Mapping[str, float], combine: Callable[[list[float]], float]) -> float | None:
    """The relay replicas' figures (``relay-0``, ...) combined: their CPU-s summed, their largest RSS."""
    found = [v for k, v in values.items() if k.startswith("relay-")]
    return combine(found) if found else None


def _subscribers_cpu_s(values: Mapping[str, float]) -> float | None:
    """The simulator's CPU-s: its process's, and its workers' (``subscribers-0``, ...) if it had any."""
    found = [v for k, v in values.items() if k == "subscribers" or k.startswith("subscribers-")]
    return sum(found) if found else None


def _behind_truth(row: Mapping[str, Any]) -> str:
    """The report's "behind the truth" cell: n/m for results from before the truth watcher."""
    if row.get("truth_after_ready") is None:
        return "n/m"
    flag = "" if row.get("truth_matches", True) else " truth NOT final"
    behind = f"{_num(row.get('truth_p50'), 2)} / {_num(row.get('truth_p99'), 2)}"
    return f"{behind} ({_num(row['truth_after_ready'], 2)}){flag}"


def named_replicas(arm: str, relays: int) -> int | None:
    """The replica count an arm's report row and result file name: a relay arm's, unless the default 3."""
    return relays if arm.startswith("relays") and relays != DEFAULT_RELAYS else None


def arm_label(result: Mapping[str, Any]) -> str:
    """The report's name for a result's arm: a relay arm run with other than 3 replicas says how many, so its
    runs are summarised apart from the 3-replica ones."""
    arm = str(result["arm"])
    replicas = named_replicas(arm, (result.get("args") or {}).get("relays", DEFAULT_RELAYS))
    return f"{arm}, {replicas} replicas" if replicas else arm


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (P, arm) across repeats; a relay arm with other than 3 replicas is an arm of its own."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["P"], arm_label(result)), []).append(result)
    rows = []
    for (size, arm), group in sorted(groups.items()):

        def med(get: Callable[[dict[str, Any]], float | None], group: list[dict[str, Any]] = group) -> float | None:
            values = [v for v in (get(r) for r in group) if v is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "P": size,
                "arm": arm,
                "repeats": len(group),
                "subscribers": med(lambda r: r["subscribers"]),
                "connect_bytes": med(lambda r: r["connect"]["subscriber_bytes"]),
                "connect_apiserver_cpu_s": med(lambda r: r["connect"]["cpu_s"]["kube-apiserver"]),
                "connect_seconds": med(lambda r: r["connect"]["seconds"]),
                "rollout_bytes": med(lambda r: r["rollout"]["subscriber_bytes"]),
                "apiserver_watch_bytes": med(lambda r: r["rollout"]["apiserver_watch_event_bytes"]),
                "apiserver_cpu_s": med(lambda r: r["rollout"]["cpu_s"]["kube-apiserver"]),
                "etcd_cpu_s": med(lambda r: r["rollout"]["cpu_s"].get("etcd")),
                "kcm_cpu_s": med(lambda r: r["rollout"]["cpu_s"].get("kube-controller-manager")),
                "kwok_cpu_s": med(lambda r: r["rollout"]["cpu_s"].get("kwok")),
                "subscriber_cpu_s": med(lambda r: _subscribers_cpu_s(r["rollout"]["cpu_s"])),
                "apiserver_peak_rss": med(lambda r: r["rollout"]["peak_rss_bytes"].get("kube-apiserver")),
                "last_ready_s": med(lambda r: r["rollout"]["last_ready_after_restart_s"]),
                "p50": med(lambda r: r["rollout"]["convergence_s"]["p50"]),
                "p99": med(lambda r: r["rollout"]["convergence_s"]["p99"]),
                "max": med(lambda r: r["rollout"]["convergence_s"]["max"]),
                "converged": all(r["rollout"]["converged"] for r in group),
                "args_relays": group[0].get("args", {}).get("relays"),
                "at_once": "{} / {}".format(
                    group[0].get("kwok_parallelism", "?"), group[0].get("args", {}).get("registrar_threads", "?")
                ),
                "rollout_seconds": med(lambda r: r["rollout"]["seconds"]),
                "relay_cpu_s": med(lambda r: _relays(r["rollout"]["cpu_s"], sum)),
                "relay_peak_rss": med(lambda r: _relays(r["rollout"]["peak_rss_bytes"], max)),
                "lost": med(lambda r: r["rollout"].get("lost")),
                "phantom": med(lambda r: r["rollout"].get("phantom")),
                "failover_p50": med(lambda r: (r["rollout"].get("failover_s") or {}).get("p50")),
                "failover_max": med(lambda r: (r["rollout"].get("failover_s") or {}).get("max")),
                "failover_streams": med(lambda r: (r["rollout"].get("failover_s") or {}).get("streams")),
                "load": med(lambda r: (r.get("machine") or {}).get("load_before", [None])[0]),
                "probe_max": med(lambda r: ((r["rollout"].get("probes") or {}).get("convergence_s") or {}).get("max")),
                # behind the truth watcher's last change; results from before it have no such field
                "truth_p50": med(lambda r: (r["rollout"].get("convergence_after_truth_s") or {}).get("p50")),
                "truth_p99": med(lambda r: (r["rollout"].get("convergence_after_truth_s") or {}).get("p99")),
                "truth_after_ready": med(lambda r: r["rollout"].get("truth_last_change_after_last_ready_s")),
                "truth_matches": all(r["rollout"].get("truth_matches_final", True) for r in group),
            }
        )
    return rows


def write_report() -> list[dict[str, Any]]:
    results = load_results()
    rows = summarise(results)
    args = results[-1].get("args", {}) if results else {}
    lines = [
        "# A real rollout's cost, by subscriber arm (issue #23, item 5)",
        "",
        "Generated by `python -m bench.rollout` (`make bench-rollout`) from `bench/results/rollout-p*.json`; the",
        "model is `bench/COST_MODEL.md`'s. One real kube-apiserver + etcd + kube-controller-manager (Deployment,",
        f"ReplicaSet, EndpointSlice controllers) and kwok ({args.get('nodes', '?')} simulated nodes) on 2 shared",
        f"cores; `kubectl rollout restart` of a `P`-replica Deployment (maxSurge {args.get('max_surge', '?')},",
        f"maxUnavailable {args.get('max_unavailable', '?')}; kwok: a pod Ready {args.get('ready', '?')} to "
        f"{args.get('ready_max', '?')} after it started,",
        f"its containers out {args.get('stop', '?')} after its deletion). Subscribers simulated by `bench.watchers",
        "--peers` (the sidecar's requests), or for `relays` by `bench.peer_subscribers` (one WatchPeers stream",
        "per pod, over TLS, to one of 3 `discovery-sidecar relay` replicas unless the arm names another count;",
        "`relays-kill`: the first replica",
        "SIGKILLed once half the new pods started). Convergence: from the last new pod's Ready to each subscriber",
        "holding the final peer set, over every subscriber alive at the end. Lost / phantom: peers missing from /",
        "extra in the subscribers' final sets, summed. Failover: from a stream's failure to its snapshot from the",
        "next replica. Probes (relay arms): one more subscriber per replica in a process of its own, a reader that",
        "keeps up; their largest convergence. Behind the truth: each subscriber's last change after that of a direct",
        "watcher of the same API server in the harness (the slices and CRs, joined as a sidecar joins them): the",
        "delay of what lies between the API server and the subscriber (the relay tier's own); in parentheses, when",
        "that watcher's set last changed after the last Ready (n/m: a result from before it). Load: the 1-minute",
        "load average when the arm started (2 cores).",
        "MB = 10^6 bytes; medians over `n` runs.",
        "",
        "| P | arm | n | subscribers | connect MB / apiserver CPU-s / s | rollout MB to subscribers (apiserver "
        "watch-event MB) | apiserver CPU-s | etcd / kcm / kwok CPU-s | subscribers CPU-s | apiserver peak RSS MB | "
        "last Ready after restart s | convergence s p50 / p99 / max | behind the truth s p50 / p99 (truth's last "
        "change after last Ready s) | kwok / registrar writes at once | "
        "relays CPU-s (all) / peak RSS MB (largest) | lost / phantom | failover s p50 / max (streams) | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        flag = "" if r["converged"] else " NOT converged"
        probe = "" if r["probe_max"] is None else f" (probes: {r['probe_max']:.2f})"
        behind = _behind_truth(r)
        lines.append(
            f"| {r['P']} | {r['arm']} | {r['repeats']} | {_num(r['subscribers'], 0)} | "
            f"{_mb(r['connect_bytes'])} / {_num(r['connect_apiserver_cpu_s'])} / {_num(r['connect_seconds'])} | "
            f"{_mb(r['rollout_bytes'])} ({_mb(r['apiserver_watch_bytes'])}) | {_num(r['apiserver_cpu_s'])} | "
            f"{_num(r['etcd_cpu_s'])} / {_num(r['kcm_cpu_s'])} / {_num(r['kwok_cpu_s'])} | "
            f"{_num(r['subscriber_cpu_s'])} | "
            f"{_mb(r['apiserver_peak_rss'])} | {_num(r['last_ready_s'])} | "
            f"{_num(r['p50'], 2)} / {_num(r['p99'], 2)} / {_num(r['max'], 2)}{flag}{probe} | {behind} | "
            f"{r['at_once']} | "
            f"{_num(r['relay_cpu_s'])} / {_mb(r['relay_peak_rss'])} | {_num(r['lost'], 0)} / {_num(r['phantom'], 0)} | "
            f"{_num(r['failover_p50'], 2)} / {_num(r['failover_max'], 2)} ({_num(r['failover_streams'], 0)}) | "
            f"{_num(r['load'])} |"
        )
    (RESULTS_DIR / "ROLLOUT.md").write_text("\n".join(lines) + "\n")
    plot(rows)
    return rows


def plot(rows: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"every-pod": ("o", "C0"), "routers": ("s", "C1"), "relays": ("^", "C2")}
    sizes = sorted({r["P"] for r in rows})
    for arm, (marker, color) in styles.items():
        series = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["P"])
        if not series:
            continue
        xs = [r["P"] for r in series]
        axes[0].plot(
            xs, [(r["apiserver_watch_bytes"] or 0) / 1e6 for r in series], "-", marker=marker, color=color, label=arm
        )
        axes[1].plot(xs, [r["apiserver_cpu_s"] for r in series], "-", marker=marker, color=color, label=arm)
        if arm == "relays":  # what the relays send their followers: the cost that moved off the API server
            axes[0].plot(
                xs, [(r["rollout_bytes"] or 0) / 1e6 for r in series], "--", marker=marker, color=color,
                label="relays' egress",
            )  # fmt: skip
            axes[1].plot(
                xs, [r["relay_cpu_s"] for r in series], "--", marker=marker, color=color, label="relays' CPU-s"
            )
        axes[2].plot(xs, [r["p99"] for r in series], "-", marker=marker, color=color, label=f"{arm} p99")
        axes[2].plot(xs, [r["max"] for r in series], ":", marker=marker, color=color, label=f"{arm} max")
    # COST_MODEL.md: one rolling restart costs ~100 KB per (restart x watcher): P² with every pod watching,
    # R x P with R routers (or relay replicas: their watches are the API server's only subscribers).
    routers = next((r["subscribers"] for r in rows if r["arm"] == "routers"), 10) or 10
    axes[0].plot(sizes, [p * p * 100e3 / 1e6 for p in sizes], ":", color="C0", label="model: P² x 100 KB")
    axes[0].plot(
        sizes, [p * routers * 100e3 / 1e6 for p in sizes], ":", color="C1", label=f"model: {routers:.0f} x P x 100 KB"
    )
    relays = next((r["args_relays"] for r in rows if r.get("args_relays")), DEFAULT_RELAYS)
    axes[0].plot(
        sizes, [p * relays * 100e3 / 1e6 for p in sizes], ":", color="C2", label=f"model, relays: {relays} x P x 100 KB"
    )
    egress = [p * p * 2e3 / 1e6 for p in sizes]
    axes[0].plot(sizes, egress, ":", color="C2", alpha=0.5, label="model, relays' egress: P² x 2 KB")
    axes[2].axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="goal through relays: p99 1 s")
    titles = (
        "API server watch-event bytes (relays' egress), one rollout (MB)",
        "kube-apiserver CPU-s (relays' CPU-s), one rollout",
        "convergence after the last Ready (s)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("pods P")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    PLOTS_DIR.mkdir(exist_ok=True)
    fig.savefig(PLOTS_DIR / "rollout.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a real rollout's cost, by subscriber arm (issue #23)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100], help="replica counts P, in increasing order")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["routers", "every-pod"])
    parser.add_argument("--routers", type=int, default=10, help="R, the routers arm's subscribers")
    parser.add_argument("--relays", type=int, default=DEFAULT_RELAYS, help="relay replicas of the relays arm")
    parser.add_argument(
        "--subscriber-processes",
        type=int,
        default=2,
        help="relay arms: worker processes the simulated sidecars are spread over (bench.peer_subscribers)",
    )
    parser.add_argument(
        "--connect-wave",
        type=int,
        default=0,
        help="relay arms: connect the simulated sidecars this many at a time, each wave synced before the next "
        "(0: all at once). Pods of a real rollout start in waves of maxSurge; on one 2-core machine 2,000 "
        "followers connecting at once starve the relays (bench/COST_MODEL.md)",
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="relays-kill: kill a replica once this share of P new pods started"
    )
    parser.add_argument("--nodes", type=int, default=20, help="kwok nodes")
    parser.add_argument("--max-surge", default="25%", help="the Deployment's maxSurge (default: Kubernetes')")
    parser.add_argument("--max-unavailable", default="25%", help="the Deployment's maxUnavailable")
    parser.add_argument("--ready", default="1s", help="kwok: least time from a pod's start to its Ready")
    parser.add_argument("--ready-max", default="2s", help="kwok: most time from a pod's start to its Ready")
    parser.add_argument("--stop", default="500ms", help="kwok: from a pod's deletion to its containers' exit")
    parser.add_argument("--initial", choices=("list", "stream"), default="stream", help="the watchers' initial sync")
    parser.add_argument(
        "--registrar-threads", type=int, default=32, help="CR writes at once (the pods' sidecars register in parallel)"
    )
    parser.add_argument("--rollout-timeout", type=float, default=3600)
    parser.add_argument("--tag", default="", help="suffix of the result files (repeats in separate runs)")
    parser.add_argument("--work", help="keep the control plane's files and the logs in this directory")
    parser.add_argument("--report-only", action="store_true", help="rewrite ROLLOUT.md and the plot from results")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report()
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rollout-"))
        bench = RolloutBench(pathlib.Path(tmp), args)
        try:
            bench.start()
            for size in args.sizes:
                bench.scale_to(size)
                for arm in args.arms:
                    started, load = time.monotonic(), list(psutil.getloadavg())
                    result = bench.run_arm(arm, size)
                    result["wall_seconds"] = time.monotonic() - started
                    result["machine"] = {
                        "cores": psutil.cpu_count(),
                        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                        "load_before": load,
                    }
                    result["args"] = vars(args)
                    suffix = f"-{args.tag}" if args.tag else ""
                    if replicas := named_replicas(arm, args.relays):
                        suffix = f"-{replicas}replicas{suffix}"
                    (RESULTS_DIR / f"rollout-p{size}-{arm}{suffix}.json").write_text(
                        json.dumps(result, indent=1) + "\n"
                    )
        finally:
            bench.stop()
    for row in write_report():
        say(json.dumps(row))


if __name__ == "__main__":
    main()
