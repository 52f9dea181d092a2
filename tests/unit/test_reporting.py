"""Tests for sidecar.peers.reporting: what operators read when peers change."""

from __future__ import annotations

import dataclasses

import structlog
from structlog.testing import capture_logs

from sidecar.core.eventlog import LogEntry, PeerChange
from sidecar.core.peer import Document, Peer, PeerState
from sidecar.core.workers import Worker
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import HubChange
from sidecar.peers.reporting import PeerChangeReporter

PEER = Peer(
    uid="u1",
    name="w-0",
    namespace="ns",
    instance_id=1,
    addresses=("10.0.0.1",),
    ports=(),
    labels={},
    state=PeerState.READY,
    document=Document({}),
    workers=(Worker("http://10.0.0.1:8080", 8080, "http"),),
    worker_problems=("annotation smg.ai/worker-ports: 'x' is not a port (1-65535)",),
)


def report(*changes: PeerChange) -> list[dict[str, object]]:
    reporter = PeerChangeReporter(structlog.get_logger(), Metrics())
    with capture_logs() as logs:
        reporter(HubChange(tuple(LogEntry(revision, change) for revision, change in enumerate(changes, 1))))
    return [e for e in logs if str(e["event"]).startswith("workers skipped")]


class TestSkippedWorkers:
    def test_a_bad_annotation_is_logged_with_what_was_kept(self) -> None:
        """One warning naming the peer, the problems and the workers that remain."""
        (event,) = report(PeerChange("u1", None, PEER))
        assert event["log_level"] == "warning" and event["peer"] == "w-0"
        assert event["problems"] == list(PEER.worker_problems)
        assert event["workers"] == ["http://10.0.0.1:8080"]

    def test_logged_once_per_change_of_the_problems(self) -> None:
        """An update that keeps the same problems (another label changed) does not repeat the warning."""
        relabelled = dataclasses.replace(PEER, labels={"a": "b"})
        assert len(report(PeerChange("u1", None, PEER), PeerChange("u1", PEER, relabelled))) == 1

    def test_no_problems_no_warning(self) -> None:
        assert report(PeerChange("u1", None, dataclasses.replace(PEER, worker_problems=()))) == []
