"""Pod-label discovery on the real control plane: Pods define readiness, no Service at all.

This is how SGLang Model Gateway finds workers, and these are its users' bug reports turned into
checks: a relabelled pod leaves, a force-deleted pod leaves, a deleting pod drains, an IP change is
followed, a same-name restart is a new peer (new UID), and loopback pod IPs (test workers) are fine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devcluster.cluster import ControlPlane
from devcluster.objects import Cluster
from devcluster.waiting import wait_for
from tests.conftest import POD_DISCOVERY_RBAC, Sidecars, kubectl
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration
SELECTOR = "app=sglang-worker"
READY, DRAINING = "PEER_STATE_READY", "PEER_STATE_DRAINING"


class PodWorld:
    """A namespace without any Service; a router pod whose sidecar selects workers by label."""

    def __init__(self, plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars, **env: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        kubectl(plane, "apply", "-f", str(POD_DISCOVERY_RBAC), namespace=namespace)
        router = cluster.start_pod(namespace, "router", {"app": "router"})
        self.router = sidecars.start(
            router, "", extra_env={"DISCOVERY_SERVICE_NAME": "", "DISCOVERY_POD_SELECTOR": SELECTOR, **env}
        ).wait_ready()

    def worker(self, name: str, ip: str, ready: bool = True) -> dict:
        pod = self.cluster.start_pod(self.namespace, name, {"app": "sglang-worker"}, ready=ready, ip=ip)
        self.cluster.register_like_dynamo(pod)
        return pod


@pytest.fixture
def world(control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars) -> PodWorld:
    return PodWorld(control_plane, cluster, namespace, sidecars)


@pytest.fixture
def bare_world(control_plane: ControlPlane, cluster: Cluster, namespace: str, sidecars: Sidecars) -> PodWorld:
    """Workers that run no sidecar: DISCOVERY_REQUIRE_METADATA=false, ports from the pods."""
    return PodWorld(
        control_plane,
        cluster,
        namespace,
        sidecars,
        DISCOVERY_REQUIRE_METADATA="false",
        DISCOVERY_WORKER_PORT="8000",
        DISCOVERY_MODEL_ID_FROM="label:model",
    )


@pytest.fixture
def stream(world: PodWorld) -> Iterator[StreamRecorder]:
    recorder = StreamRecorder(world.router.target)
    yield recorder
    recorder.close()


def test_pods_by_label_without_a_service(world: PodWorld, stream: StreamRecorder) -> None:
    """Ready+Running pods matching the selector are peers at their pod IPs (loopback allowed); unready,
    relabelled-away and force-deleted pods leave; a deleting pod drains first."""
    a = world.worker("w-a", "127.0.0.11")
    world.worker("w-b", "127.0.0.12")
    world.worker("w-c", "127.0.0.13", ready=False)
    stream.wait_until(lambda r: r.names() == {"w-a": READY, "w-b": READY}, 45, "two ready workers")
    assert list(stream.peers()["w-a"].addresses) == ["127.0.0.11"]
    assert stream.peers()["w-a"].uid == a["metadata"]["uid"]

    world.cluster.set_pod_status(world.namespace, "w-c", ready=True)
    stream.wait_until(lambda r: "w-c" in r.names(), 45, "w-c ready")

    world.cluster.set_pod_status(world.namespace, "w-b", ready=False)
    stream.wait_until(lambda r: "w-b" not in r.names(), 45, "unready w-b removed")

    world.cluster.relabel_pod(world.namespace, "w-c", {"app": "other"})
    stream.wait_until(lambda r: "w-c" not in r.names(), 45, "relabelled w-c removed")

    world.cluster.delete_pod(world.namespace, "w-a", grace_seconds=300)  # no kubelet: it stays terminating
    stream.wait_until(lambda r: r.names().get("w-a") == DRAINING, 45, "deleting w-a drains")
    world.cluster.delete_pod(world.namespace, "w-a", grace_seconds=0)
    stream.wait_until(lambda r: r.names() == {}, 45, "force-deleted w-a removed")


def test_ip_change_and_same_name_restart(world: PodWorld, stream: StreamRecorder) -> None:
    """A new IP is followed in place; a pod recreated under the same name is a new peer (new UID) whose
    old address is gone, never a stale URL."""
    first = world.worker("w-r", "127.0.0.21")
    stream.wait_until(lambda r: "w-r" in r.names(), 45, "w-r ready")
    world.cluster.set_pod_status(world.namespace, "w-r", ready=True, ip="127.0.0.22")
    stream.wait_until(lambda r: list(r.peers()["w-r"].addresses) == ["127.0.0.22"], 45, "the new IP")

    world.cluster.delete_pod(world.namespace, "w-r", grace_seconds=0)
    wait_for(lambda: world.cluster.get_or_none(f"/api/v1/namespaces/{world.namespace}/pods/w-r") is None, 30)
    second = world.worker("w-r", "127.0.0.23")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    stream.wait_until(
        lambda r: "w-r" in r.peers() and r.peers()["w-r"].uid == second["metadata"]["uid"], 45, "the new incarnation"
    )
    assert list(stream.peers()["w-r"].addresses) == ["127.0.0.23"]


def test_pods_without_a_sidecar_are_peers_with_their_own_labels(bare_world: PodWorld, sidecars: Sidecars) -> None:
    """DISCOVERY_REQUIRE_METADATA=false: ready pods with no CR are peers; their labels are the pod's and
    follow a relabelling live (within the selector); their workers follow the annotations; a pod that
    has its CR (it runs the sidecar) still joins with it, by UID."""
    world = bare_world
    stream = StreamRecorder(world.router.target)
    try:
        world.cluster.start_pod(
            world.namespace,
            "w-a",
            {"app": "sglang-worker", "model": "llama"},
            ip="127.0.0.31",
            annotations={"smg.ai/worker-ports": "8080,8081", "sglang.ai/bootstrap-port": "9080,9081"},
        )
        world.cluster.start_pod(world.namespace, "w-b", {"app": "sglang-worker", "role": "decode"}, ip="127.0.0.32")
        stream.wait_until(lambda r: r.names() == {"w-a": READY, "w-b": READY}, 45, "two bare pods")
        a = stream.peers()["w-a"]
        # the pod's own labels (Kubernetes 1.36 adds the node's zone to every pod)
        assert dict(a.labels) == {"app": "sglang-worker", "model": "llama", "topology.kubernetes.io/zone": "zone-a"}
        assert a.data_json == "{}"
        assert [(w.url, w.bootstrap_port, w.model_id) for w in a.workers] == [
            ("http://127.0.0.31:8080", 9080, "llama"),
            ("http://127.0.0.31:8081", 9081, "llama"),
        ]
        assert [w.url for w in stream.peers()["w-b"].workers] == ["http://127.0.0.32:8000"]

        world.cluster.relabel_pod(world.namespace, "w-b", {"role": "prefill"})
        stream.wait_until(lambda r: r.peers()["w-b"].labels.get("role") == "prefill", 45, "relabel followed")
        world.cluster.annotate_pod(
            world.namespace, "w-a", {"smg.ai/worker-ports": "8082", "sglang.ai/bootstrap-port": None}
        )
        stream.wait_until(
            lambda r: [w.url for w in r.peers()["w-a"].workers] == ["http://127.0.0.31:8082"], 45, "new ports"
        )

        # A bad annotation costs that worker, logged; the sidecar and the peer carry on.
        world.cluster.annotate_pod(world.namespace, "w-a", {"smg.ai/worker-ports": "8083,eighty"})
        stream.wait_until(
            lambda r: [w.url for w in r.peers()["w-a"].workers] == ["http://127.0.0.31:8083"], 45, "bad port skipped"
        )
        wait_for(
            lambda: any(
                e.get("event", "").startswith("workers skipped") and e.get("peer") == "w-a"
                for e in world.router.log_events()
            ),
            15,
            what="the skipped worker logged",
        )
        assert world.router.ready()

        # A pod that runs the sidecar: its CR (labels, data) speaks for it.
        world.worker("w-c", "127.0.0.33")
        stream.wait_until(lambda r: "w-c" in r.names() and r.peers()["w-c"].data_json != "{}", 45, "w-c with its CR")
    finally:
        stream.close()
