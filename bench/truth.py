"""The ground truth's peer set over time: a direct watcher of the API server in the benchmark harness.

``bench.rollout`` times each subscriber's last peer-set change. Against the last new pod's Ready alone that
mixes two delays: the control plane's (the EndpointSlice controller publishing the last readiness and
removals, the last CR writes) and the subscribers' own (a relay tier, a simulated sidecar's backlog). The
*truth watcher* separates them: one watch of the EndpointSlices and one of the DynamoWorkerMetadata CRs on the
same API server, joined as a sidecar joins them (a live endpoint with a CR of its name; READY in any slice
wins), and the time its joined set last changed. A subscriber's last change minus that is the delay of
everything between the API server and the subscriber.

``TruthPeerSet`` is the pure part (fed events with their times, no clock, no IO); ``TruthWatcher`` is the
shell: two ``devcluster.watching.CollectionWatch`` threads feeding it under one lock. The callbacks stay
cheap (the machine is saturated during a rollout): a slice's live endpoints are derived once per event, and
only the pods that event touches are re-joined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from bench.cost import SLICE_SELECTOR
from bench.watchers import live_endpoints
from bench.workload import NAMESPACE
from devcluster.objects import ENDPOINT_SLICES, WORKER_METADATA
from devcluster.waiting import wait_for
from devcluster.watching import CollectionWatch
from sidecar.kube.api import KubeApi


def join_peers(slices: Iterable[Mapping[str, str]], crs: set[str] | frozenset[str]) -> dict[str, str]:
    """The peer set from every slice's live endpoints (pod -> READY/DRAINING) and the CR names: a pod live in
    any slice with a CR of its name, READY if any slice says so (a pod in transit between slices is one
    peer)."""
    live: dict[str, str] = {}
    for endpoints in slices:
        for pod, state in endpoints.items():
            if live.get(pod) != "READY":
                live[pod] = state
    return {pod: state for pod, state in live.items() if pod in crs}


class TruthPeerSet:
    """The joined peer set, kept per event, and when it last changed since ``mark()``.

    Per pod it counts the slices listing it READY and DRAINING, so an event re-joins only the pods it
    touches. A change is a change of the joined set (``peers``), not of a slice: a pod moving between slices,
    or a slice rewritten with the same live endpoints, changes nothing. Not thread-safe: its owner locks."""

    def __init__(self) -> None:
        self.slices: dict[str, Mapping[str, str]] = {}  # slice name -> its live endpoints
        self.crs: set[str] = set()  # CR names
        self.peers: dict[str, str] = {}  # the joined set: pod -> READY/DRAINING
        self.last_change: float | None = None  # the time of the latest event that changed ``peers``, since mark()
        self.changes = 0  # events that changed ``peers`` since mark()
        self._counts: dict[str, list[int]] = {}  # pod -> [slices listing it READY, slices listing it DRAINING]

    def mark(self) -> None:
        """Forget the change history (the rollout starts now); the set itself stays."""
        self.last_change = None
        self.changes = 0

    def set_slice(self, name: str, endpoints: Mapping[str, str] | None, at: float) -> bool:
        """Slice ``name`` now has these live endpoints (None: deleted); True if the peer set changed."""
        old = self.slices.get(name, {})
        new = {} if endpoints is None else endpoints
        if endpoints is None:
            self.slices.pop(name, None)
        else:
            self.slices[name] = endpoints
        if old == new:
            return False
        for pods, step in ((old, -1), (new, 1)):
            for pod, state in pods.items():
                counts = self._counts.setdefault(pod, [0, 0])
                counts[0 if state == "READY" else 1] += step
                if counts == [0, 0]:
                    del self._counts[pod]
        return self._rejoin(old.keys() | new.keys(), at)

    def set_cr(self, name: str, present: bool, at: float) -> bool:
        """CR ``name`` exists (or not); True if the peer set changed."""
        if present == (name in self.crs):
            return False
        if present:
            self.crs.add(name)
        else:
            self.crs.discard(name)
        return self._rejoin((name,), at)

    def _state(self, pod: str) -> str | None:
        counts = self._counts.get(pod)
        if counts is None or pod not in self.crs:
            return None
        return "READY" if counts[0] > 0 else "DRAINING"

    def _rejoin(self, pods: Iterable[str], at: float) -> bool:
        changed = False
        for pod in pods:
            state = self._state(pod)
            if self.peers.get(pod) == state:
                continue
            changed = True
            if state is None:
                del self.peers[pod]
            else:
                self.peers[pod] = state
        if changed:
            self.last_change = at
            self.changes += 1
        return changed


class TruthWatcher:
    """A direct watcher of the API server: the benchmark's baseline for when the peer set last changed.

    Started once with the harness's registrar, it lives for the whole run; ``mark()`` at each rollout's
    restart starts a new change history. Event times are ``time.monotonic()`` (system-wide on Linux, so
    comparable with the subscriber processes'), taken when the event reached this process's handler.

    ``api`` is a client of its own: the watcher counts the bytes it reads (``received``), which the API server
    counts among its watch events and ``bench.rollout`` takes out of them again (the watcher is the harness's,
    not the arm's). ``_lock`` guards ``state`` and ``received``, written from both watch threads."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.state = TruthPeerSet()
        self.received = 0  # response bytes read by ``api`` (the watches' event lines; lists, at start and after a 410)
        self._lock = threading.Lock()
        api.on_bytes = self._on_bytes
        self._watches = [
            CollectionWatch(
                api,
                ENDPOINT_SLICES.collection(NAMESPACE),
                self._on_slice,
                label_selector=SLICE_SELECTOR,
                name="truth-slices",
            ),
            CollectionWatch(api, WORKER_METADATA.collection(NAMESPACE), self._on_cr, name="truth-crs"),
        ]

    def start(self) -> TruthWatcher:
        for watch in self._watches:
            watch.start()
        for watch in self._watches:
            wait_for(watch.synced.is_set, 60, what="the truth watcher's initial list")
        return self

    def stop(self) -> None:
        for watch in self._watches:
            watch.stop()

    def _on_bytes(self, count: int) -> None:
        with self._lock:
            self.received += count

    def _on_slice(self, kind: str, item: Mapping[str, Any]) -> None:
        at = time.monotonic()
        live = None if kind == "DELETED" else live_endpoints(item)
        with self._lock:
            self.state.set_slice(item["metadata"]["name"], live, at)

    def _on_cr(self, kind: str, item: Mapping[str, Any]) -> None:
        at = time.monotonic()
        with self._lock:
            self.state.set_cr(item["metadata"]["name"], kind != "DELETED", at)

    def mark(self) -> None:
        with self._lock:
            self.state.mark()

    def received_bytes(self) -> int:
        with self._lock:
            return self.received

    def peers(self) -> dict[str, str]:
        with self._lock:
            return dict(self.state.peers)

    def last_change(self) -> tuple[float | None, int]:
        """When the joined set last changed since ``mark()`` (None: it did not), and how many events changed it."""
        with self._lock:
            return self.state.last_change, self.state.changes
