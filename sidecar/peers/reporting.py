"""What operators see of the peer set changing: a log line per addition/removal, and the peer gauges.

A hub subscriber: it is called in the writer's thread with each change (``HubChange``), after the
hub's lock is released, and does nothing but log and count the change's new log entries.
"""

from __future__ import annotations

from typing import Any

from sidecar.core.eventlog import ApiStatus, PeerChange, StatusChange
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import HubChange


class PeerChangeReporter:
    """Owns nothing but a logger and the metrics it updates; the daemon subscribes it to the hub."""

    def __init__(self, log: Any, metrics: Metrics) -> None:
        self.log = log
        self.metrics = metrics

    def __call__(self, change: HubChange) -> None:
        for entry in change.entries:
            if isinstance(entry.change, StatusChange):
                self._status(entry.change, entry.revision)
            else:
                self._peer(entry.change, entry.revision)

    def _status(self, change: StatusChange, revision: int) -> None:
        connected = change.status is ApiStatus.CONNECTED
        self.metrics.api_connected.set(1 if connected else 0)
        if connected:
            self.log.info("streams CONNECTED: peer set is current", revision=revision)
        else:
            # A source that lost its origin (the peer set may be stale), or this pod's registration failing.
            self.log.warning("streams DEGRADED", reason=change.reason, revision=revision)

    def _peer(self, change: PeerChange, revision: int) -> None:
        self.metrics.peer_changes.inc()
        if change.before is not None:
            self.metrics.peers.labels(change.before.state.value).dec()
        if change.after is not None:
            self.metrics.peers.labels(change.after.state.value).inc()
        peer = change.after or change.before
        if peer is None:  # a change always has one side; nothing to report otherwise
            return
        after = change.after
        if after is not None and after.worker_problems:
            before = change.before.worker_problems if change.before is not None else ()
            if after.worker_problems != before:
                # A pod's bad annotation costs that pod's worker, never the sidecar: say so, once per change.
                self.log.warning(
                    "workers skipped: the pod's annotations do not parse",
                    peer=after.name,
                    uid=after.uid,
                    problems=list(after.worker_problems),
                    workers=[w.url for w in after.workers],
                )
        event = "peer added" if change.before is None else "peer removed" if change.after is None else "peer updated"
        # Additions and removals are what operators look for; updates (metadata churn) can be many.
        emit = self.log.debug if event == "peer updated" else self.log.info
        emit(
            event,
            peer=peer.name,
            uid=peer.uid,
            state=peer.state.value,
            addresses=list(peer.addresses),
            revision=revision,
        )
