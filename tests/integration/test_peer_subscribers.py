"""The relay arm's subscribers follow WatchPeers as a sidecar's client does (issue #23, item 5).

``bench.peer_subscribers`` is the subscriber side of ``bench.rollout``'s relay arm. A relay serves the
sidecar's own API, so its subscribers are checked here against a real sidecar on the real control plane:
they get the snapshot, follow a change, and report what they received, through the same JSON-lines
commands ``bench.rollout.ProcessSubscribers`` sends.
"""

from __future__ import annotations

import pathlib

import pytest

from bench.rollout import ProcessSubscribers, peer_subscribers
from devcluster.objects import Cluster
from devcluster.waiting import wait_for
from tests.conftest import Sidecars

pytestmark = pytest.mark.integration

SERVICE = "workers"
LABELS = {"app": "worker"}


@pytest.mark.parametrize("processes", [1, 2])
def test_subscribers_follow_watchpeers_from_a_sidecar(
    cluster: Cluster, namespace: str, sidecars: Sidecars, tmp_path: pathlib.Path, processes: int
) -> None:
    """In one process, and spread over two workers behind the same commands (``--processes 2``)."""
    cluster.create_service(namespace, SERVICE, LABELS)
    for name in ("peer-a", "peer-b"):
        pod = cluster.start_pod(namespace, name, LABELS)
        cluster.register_like_dynamo(pod)
    wait_for(lambda: cluster.ready_pods_in_slices(namespace, SERVICE) == {"peer-a": True, "peer-b": True}, 30)
    observer = cluster.start_pod(namespace, "observer", {"app": "observer"})  # not behind the Service
    sidecar = sidecars.start(observer, SERVICE).wait_ready()

    child = peer_subscribers([sidecar.target], tmp_path / "subscribers.log", processes=processes)
    arm = ProcessSubscribers("relays", child, every_pod=True)
    try:
        arm.start(["s-0", "s-1", "s-2"])  # returns once each has its first snapshot
        first = arm.converge({}, {"peer-a": "READY", "peer-b": "READY"}, 30)
        assert first["converged"], first
        assert set(first["last_peer_change"]) == {"s-0", "s-1", "s-2"}

        cluster.set_pod_status(namespace, "peer-b", ready=False)
        second = arm.converge({}, {"peer-a": "READY"}, 30)
        assert second["converged"], second
        for index, changed in second["last_peer_change"].items():
            assert changed > first["last_peer_change"][index], f"{index} saw no change"

        arm.pod_gone("s-2")
        stats = arm.stats()
        assert stats["watchers"] == 2
        assert stats["requests"] == {"WatchPeers fresh": 3}
        assert stats["events"]["snapshot"] == 3 and stats["events"]["delta"] >= 3
        assert stats["bytes"]["watchpeers"] > 0
        assert not stats["errors"]
    finally:
        arm.close()
