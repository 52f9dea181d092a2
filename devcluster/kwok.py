"""Simulated nodes and kubelets (kwok) beside a ``ControlPlane``, so that workload controllers work.

The dev control plane has no kubelet and no scheduler: tests that create Pods directly play the kubelet
themselves (``devcluster.objects``). A Deployment's pods need both, so ``Kwok`` brings

* **kwok** (``sigs.k8s.io/kwok``, built by ``python -m devcluster build`` into ``~/.cache``): it manages
  only the nodes annotated ``kwok.x-k8s.io/node=fake`` (never the hand-played ``node-a`` of the other
  tests) and every pod bound to them, through the stages in ``kwok_stages.yaml``: a pod gets an IP
  from its node's ``podCIDR`` and turns Running, then Ready; deleted, its containers stop (not Ready),
  then it is removed; each delay can be set per pod by annotation;
* **a scheduler stand-in** (``Binder``): pods that ask for ``schedulerName: kwok`` (``SCHEDULER``) are
  bound round-robin to the kwok nodes through the ``pods/binding`` subresource, as kube-scheduler binds.
  Pods under any other scheduler name are left alone, so nothing another test creates is ever bound.

``Kwok(plane, work_dir).start()``, then ``add_nodes(n)``; ``pod_template_spec()`` gives what a Deployment's
pod template needs to land on them. ``stop()`` ends both.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import pathlib
import sys
import threading
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devcluster.build import ensure_tool
from devcluster.cluster import Component, ControlPlane, free_port
from devcluster.objects import PODS
from devcluster.waiting import wait_for
from devcluster.watching import CollectionWatch
from sidecar.kube.api import ApiError, KubeApi

STAGES = pathlib.Path(__file__).with_name("kwok_stages.yaml")
NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
"""kwok manages exactly the nodes carrying this annotation (--manage-nodes-with-annotation-selector)."""
SCHEDULER = "kwok"
"""The ``schedulerName`` of pods the ``Binder`` places on kwok nodes."""
NODE_PREFIX = "kwok-node-"
POD_NETWORK = ipaddress.ip_network("10.250.0.0/16")
"""Pod IPs of kwok nodes: one /22 per node (1,022 pods each), apart from ``objects.next_pod_ip``'s 10.244/16."""
NODE_SUBNET_PREFIX = 22
NODE_IPS = ipaddress.ip_network("192.0.2.0/24")
"""Node InternalIPs: TEST-NET-1, documentation addresses that nothing ever dials."""

Log = Callable[[str], None]


def _say(message: str) -> None:
    print(f"[devcluster] {message}", file=sys.stderr, flush=True)


def node_name(index: int) -> str:
    return f"{NODE_PREFIX}{index}"


def pod_template_spec(**extra: Any) -> dict[str, Any]:
    """The pod-spec fields that put a workload's pods on kwok nodes (merge into a template's ``spec``)."""
    return {"schedulerName": SCHEDULER, **extra}


class Binder:
    """The scheduler stand-in: binds pending pods with ``schedulerName: kwok`` to kwok nodes, round-robin.

    Owns one pod watch (field selector: that scheduler name, no node yet) and a few threads that POST
    ``Binding`` objects; a pod already bound (409) or gone (404) is skipped."""

    def __init__(self, api: KubeApi, nodes: Callable[[], list[str]], log: Log = _say, threads: int = 4) -> None:
        self.api = api
        self.nodes = nodes
        self.log = log
        self.bound = 0
        self.failures = 0  # binding attempts that failed and were retried
        self.attempts = 20
        self._stop = threading.Event()
        self._turn = itertools.count()
        self._pending: set[tuple[str, str]] = set()  # (namespace, name) being bound; guarded by _lock
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kwok-binder")
        self._watch = CollectionWatch(
            api,
            PODS.collection(""),  # every namespace
            self._on_event,
            field_selector=f"spec.schedulerName={SCHEDULER},spec.nodeName=",
            name="kwok-binder",
        )

    def start(self) -> None:
        self._watch.start()
        wait_for(self._watch.synced.is_set, 30, what="the kwok binder's pod list")

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _on_event(self, kind: str, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "DELETED" or meta.get("deletionTimestamp") or (pod.get("spec") or {}).get("nodeName"):
            return
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self._pool.submit(self._bind, key, meta["uid"])

    def _bind(self, key: tuple[str, str], uid: str) -> None:
        """Bind one pod, retrying (a loaded API server times out) until it is bound, gone or out of tries."""
        namespace, name = key
        try:
            for attempt in range(self.attempts):
                nodes = self.nodes()
                if not nodes:
                    self.log(f"kwok binder: no kwok node for pod {namespace}/{name}; add_nodes() first")
                    return
                body = {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name, "uid": uid},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": nodes[next(self._turn) % len(nodes)]},
                }
                try:
                    self.api.create(PODS.item(namespace, name) + "/binding", body)
                    self.bound += 1
                    return
                except ApiError as exc:
                    if exc.status in (404, 409):  # gone, or already bound (maybe by our own timed-out try)
                        return
                    failure = f"{exc}"
                except Exception as exc:  # noqa: BLE001 - a timeout under load: try again
                    failure = f"{type(exc).__name__}: {exc}"
                self.failures += 1
                self._stop.wait(min(0.5 * 2**attempt, 10.0))  # backoff before the next try
                if self._stop.is_set():
                    return
            self.log(f"kwok binder: gave up binding {namespace}/{name} after {self.attempts} tries: {failure}")
        finally:
            with self._lock:
                self._pending.discard(key)


class Kwok:
    """kwok and the binder for one control plane; ``add_nodes`` creates the nodes they serve."""

    def __init__(
        self,
        plane: ControlPlane,
        work_dir: pathlib.Path,
        binary: pathlib.Path | None = None,
        log: Log = _say,
        tie_to_parent: bool = True,
        parallelism: int = 16,
    ) -> None:
        """``parallelism``: pod stages kwok plays at once (its default, 4, is one slow kubelet for all nodes)."""
        self.plane = plane
        self.parallelism = parallelism
        self.work_dir = work_dir
        self.binary = binary
        self.log = log
        self.tie_to_parent = tie_to_parent
        self.port = free_port()
        # Patient: at thousands of pods the API server is the loaded party, and a binding must not be dropped.
        self.api = KubeApi.from_kubeconfig(str(plane.kubeconfig), request_timeout=60)
        self.nodes: list[str] = []
        self.component: Component | None = None
        self.binder = Binder(self.api, lambda: list(self.nodes), log)

    @property
    def pid(self) -> int | None:
        return self.component.process.pid if self.component and self.component.process else None

    def argv(self) -> list[str]:
        assert self.binary is not None
        return [
            str(self.binary),
            f"--kubeconfig={self.plane.kubeconfig}",
            f"--config={STAGES}",
            f"--config={self.work_dir / 'kwok-options.json'}",
            f"--manage-nodes-with-annotation-selector={'='.join(NODE_ANNOTATION)}",
            f"--server-address=127.0.0.1:{self.port}",  # /healthz (and kwok's kubelet API) on loopback only
            "--node-lease-duration-seconds=40",
            f"--node-ip={NODE_IPS[1]}",
            f"--cidr={POD_NETWORK}",
            "--v=WARN",  # not a line per lease renewal
        ]

    def start(self, timeout: float = 60.0) -> Kwok:
        self.binary = self.binary or ensure_tool("kwok", self.log)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # A KwokConfiguration given is not defaulted: every option kwok would default is spelled out (its
        # defaults in v0.8.0), but the pod stages played at once.
        options = {
            "cidr": str(POD_NETWORK),
            "manageAllNodes": False,
            "enableDebuggingHandlers": True,
            "enableContentionProfiling": False,
            "enableProfilingHandler": False,
            "podPlayStageParallelism": self.parallelism,
            "nodePlayStageParallelism": 4,
            "nodeLeaseParallelism": 4,
            "podsOnNodeSyncParallelism": 1,
            "enablePodsOnNodeSyncListPager": True,
            "enablePodsOnNodeSyncStreamWatch": False,
        }
        configuration = {"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration", "options": options}
        (self.work_dir / "kwok-options.json").write_text(json.dumps(configuration))
        # kwok reads ~/.kwok/kwok.yaml when it exists: give it a home of its own, so only STAGES applies.
        self.component = Component("kwok", self.argv(), self.work_dir / "kwok.log")
        self.log(f"starting kwok (nodes annotated {'='.join(NODE_ANNOTATION)}) on 127.0.0.1:{self.port}")
        self.component.start(self.tie_to_parent, env={"HOME": str(self.work_dir), "KWOK_WORKDIR": str(self.work_dir)})
        try:
            wait_for(self._healthy, timeout, interval=0.2, what="kwok's /healthz")
            self.binder.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.binder.stop()
        if self.component is not None:
            self.component.stop()
        self.api.close()

    def _healthy(self) -> bool:
        assert self.component is not None
        if not self.component.alive():
            raise RuntimeError(f"kwok exited during start-up; its log ends with:\n{self.component.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def add_nodes(self, count: int, zones: int = 1, timeout: float = 60.0) -> list[str]:
        """Create ``count`` more kwok nodes (zones ``zone-0``... round-robin) and wait until kwok reports them
        Ready. Each gets a /22 of ``POD_NETWORK`` as its ``podCIDR`` and an InternalIP from ``NODE_IPS``."""
        subnets = list(POD_NETWORK.subnets(new_prefix=NODE_SUBNET_PREFIX))
        start = len(self.nodes)
        if start + count > len(subnets) or start + count > NODE_IPS.num_addresses - 2:
            raise ValueError(
                f"at most {min(len(subnets), NODE_IPS.num_addresses - 2)} kwok nodes, asked for {start + count}"
            )
        created = []
        for index in range(start, start + count):
            name = node_name(index)
            zone = f"zone-{index % zones}"
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {
                        NODE_ANNOTATION[0]: NODE_ANNOTATION[1],
                        "devcluster.kwok/ip": str(NODE_IPS[index + 2]),
                    },
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "topology.kubernetes.io/zone": zone,
                    },
                },
                "spec": {"podCIDR": str(subnets[index]), "podCIDRs": [str(subnets[index])]},
            }
            try:
                self.api.create("/api/v1/nodes", body)
            except ApiError as exc:
                if exc.status != 409:
                    raise
            created.append(name)

        def all_ready() -> bool:
            for name in created:
                node = self.api.get(f"/api/v1/nodes/{name}")
                conditions = {c["type"]: c["status"] for c in (node.get("status") or {}).get("conditions") or ()}
                if conditions.get("Ready") != "True":
                    return False
            return True

        wait_for(all_ready, timeout, interval=0.2, what=f"kwok to report {count} nodes Ready")
        self.nodes += created
        return created
