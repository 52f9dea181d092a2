"""Peer discovery scenarios on the real control plane, checked against the truth after every step.

One observer pod runs the sidecar; its peers register the way Dynamo's own runtime does (server-side
apply of a DynamoWorkerMetadata owned by the pod), which also proves a mixed deployment joins. After
each step the stream's peer set is compared with the truth computed from the API server: pods ready
(or draining) in the Service's EndpointSlices whose UID owns a CR.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devcluster.cluster import ControlPlane
from devcluster.objects import ENDPOINT_SLICES, PODS, WORKER_METADATA, Cluster
from devcluster.relays import RelayProcess
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import DiscoveryClient, PeerSetView
from sidecar.kube.api import ApiError
from tests.conftest import Relays, Sidecars
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration
SERVICE = "workers"
OBSERVER = "observer"


def register_like_dynamo(cluster: Cluster, pod: dict, data: dict | None = None) -> dict:
    """What Dynamo's runtime writes for its pod (see Cluster.register_like_dynamo)."""
    return cluster.register_like_dynamo(pod, data)


def truth(cluster: Cluster, namespace: str) -> dict[str, str]:
    """pod name -> PEER_STATE_* from the API server's own objects, excluding the observer."""
    crs = cluster.api.get(WORKER_METADATA.collection(namespace)).get("items", [])
    owners = {ref["uid"] for c in crs for ref in c["metadata"].get("ownerReferences") or () if ref.get("kind") == "Pod"}
    states: dict[str, str] = {}
    for item in cluster.endpoint_slices(namespace, SERVICE):
        for e in item.get("endpoints") or ():
            ref = e.get("targetRef") or {}
            if ref.get("uid") not in owners or ref.get("name") == OBSERVER:
                continue
            c = e.get("conditions") or {}
            ready = c.get("ready") is not False
            if ready:
                states[ref["name"]] = "PEER_STATE_READY"
            elif c.get("serving") and c.get("terminating") and states.get(ref["name"]) != "PEER_STATE_READY":
                states[ref["name"]] = "PEER_STATE_DRAINING"
    return states


class World:
    """One namespace with the workers' Service and an observer pod whose sidecar watches the API server, or,
    given ``relays``, follows a relay that does (the same scenarios must hold through the relay tier)."""

    def __init__(self, cluster: Cluster, namespace: str, sidecars: Sidecars, relays: Relays | None = None) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.sidecars = sidecars
        cluster.create_service(namespace, SERVICE, {"app": "w"})
        observer_pod = cluster.start_pod(namespace, OBSERVER, {"app": "w", "role": "router"})
        follow: dict[str, str] = {}
        self.relay: RelayProcess | None = None
        if relays is not None:
            self.relay = relays.start({"DISCOVERY_NAMESPACES": namespace, "DISCOVERY_SERVICE_NAME": SERVICE})
            follow = relays.follow_env(self.relay.wait_ready())
        self.observer = sidecars.start(observer_pod, SERVICE, extra_env=follow).wait_ready()

    def log_events(self) -> list[dict]:
        """What the observer logged, and the relay it follows (which watches the peers for it), if any."""
        return self.observer.log_events() + (self.relay.log_events() if self.relay is not None else [])

    def worker(self, name: str, role: str = "prefill", ready: bool = True, ip: str | None = None) -> dict:
        pod = self.cluster.start_pod(self.namespace, name, {"app": "w", "role": role}, ready=ready, ip=ip)
        register_like_dynamo(self.cluster, pod)
        return pod

    def wait_truth(self, expected: dict[str, str], timeout: float = 45.0) -> None:
        """Wait until the API's own objects say ``expected`` (the control plane's part, before any stream's)."""
        wait_for(lambda: truth(self.cluster, self.namespace) == expected, timeout, what=f"API truth == {expected}")

    def settle(self, stream: StreamRecorder, expected: dict[str, str], timeout: float = 45.0) -> None:
        """Wait until the API's truth and the stream both equal ``expected``."""
        self.wait_truth(expected, timeout)
        stream.wait_until(lambda r: r.names() == expected, timeout, f"stream == {expected}")


@pytest.fixture(params=["apiserver", "relay"])
def world(
    namespace: str, cluster: Cluster, sidecars: Sidecars, relays: Relays, request: pytest.FixtureRequest
) -> World:
    """The observer watching the API server itself, and following a relay (issue 23: same semantics)."""
    return World(cluster, namespace, sidecars, relays if request.param == "relay" else None)


@pytest.fixture
def stream(world: World) -> Iterator[StreamRecorder]:
    recorder = StreamRecorder(world.observer.target)
    yield recorder
    recorder.close()


READY, DRAINING = "PEER_STATE_READY", "PEER_STATE_DRAINING"


def test_scale_up_and_down(world: World, stream: StreamRecorder) -> None:
    world.settle(stream, {})
    assert stream.kinds()[0] == "snapshot"
    for i in range(4):
        world.worker(f"w-{i}")
    world.settle(stream, {f"w-{i}": READY for i in range(4)})
    for i in range(3):
        world.cluster.delete_pod(world.namespace, f"w-{i}", grace_seconds=0)
    world.settle(stream, {"w-3": READY})
    peer = stream.peers()["w-3"]
    assert peer.uid and peer.instance_id and peer.addresses and [p.port for p in peer.ports] == [8000]
    assert peer.labels["role"] == "prefill"


def test_unready_ready_and_draining(world: World, stream: StreamRecorder) -> None:
    world.worker("w-a")
    world.worker("w-b")
    world.settle(stream, {"w-a": READY, "w-b": READY})
    world.cluster.set_pod_status(world.namespace, "w-a", ready=False)
    world.settle(stream, {"w-b": READY})
    world.cluster.set_pod_status(world.namespace, "w-a", ready=True)
    world.settle(stream, {"w-a": READY, "w-b": READY})
    # A graceful delete: no kubelet finishes it, so the pod stays terminating; the EndpointSlice
    # controller publishes it as serving && terminating, which is "draining".
    world.cluster.delete_pod(world.namespace, "w-b", grace_seconds=300)
    world.settle(stream, {"w-a": READY, "w-b": DRAINING})
    world.cluster.delete_pod(world.namespace, "w-b", grace_seconds=0)
    world.settle(stream, {"w-a": READY})


def test_force_delete_and_label_change_out_of_the_selector(world: World, stream: StreamRecorder) -> None:
    world.worker("w-f")
    world.worker("w-l")
    world.settle(stream, {"w-f": READY, "w-l": READY})
    world.cluster.delete_pod(world.namespace, "w-f", grace_seconds=0)
    world.settle(stream, {"w-l": READY})
    world.cluster.relabel_pod(world.namespace, "w-l", {"app": "elsewhere"})
    world.settle(stream, {})
    world.cluster.relabel_pod(world.namespace, "w-l", {"app": "w"})
    world.settle(stream, {"w-l": READY})


def test_ip_change_is_an_update(world: World, stream: StreamRecorder) -> None:
    world.worker("w-ip", ip="10.250.0.1")
    world.settle(stream, {"w-ip": READY})
    assert list(stream.peers()["w-ip"].addresses) == ["10.250.0.1"]
    uid = stream.peers()["w-ip"].uid
    world.cluster.set_pod_status(world.namespace, "w-ip", ready=True, ip="10.250.0.2")
    stream.wait_until(lambda r: list(r.peers()["w-ip"].addresses) == ["10.250.0.2"], 45, "the new address")
    assert stream.peers()["w-ip"].uid == uid
    removed = [p.name for u in stream.updates for p in u.removed]
    assert "w-ip" not in removed, "an address change is an update, not a remove/add"


def test_new_incarnation_never_joins_a_lingering_old_cr(world: World, stream: StreamRecorder) -> None:
    ns, cluster = world.namespace, world.cluster
    old = world.worker("w-r")
    world.settle(stream, {"w-r": READY})
    # Keep the old CR around after its pod is gone (a finalizer holds it), as a slow GC or a crashed
    # runtime would leave it.
    cluster.api.merge_patch(WORKER_METADATA.item(ns, "w-r"), {"metadata": {"finalizers": ["test.example/hold"]}})
    cluster.delete_pod(ns, "w-r", grace_seconds=0)
    world.settle(stream, {})
    new = cluster.start_pod(ns, "w-r", {"app": "w", "role": "prefill"})
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    wait_for(lambda: new["metadata"]["uid"] in str(cluster.endpoint_slices(ns, SERVICE)), 45, what="new pod in slice")
    world.worker("w-sentinel")  # once the stream shows this, it has seen the slice with the new w-r too
    world.settle(stream, {"w-sentinel": READY})
    assert "w-r" not in stream.names(), "the old incarnation's CR must not join the new pod"
    cluster.api.merge_patch(WORKER_METADATA.item(ns, "w-r"), {"metadata": {"finalizers": None}})
    wait_for(lambda: cluster.get_or_none(WORKER_METADATA.item(ns, "w-r")) is None, 60, what="old CR gone")
    register_like_dynamo(cluster, new)
    world.settle(stream, {"w-sentinel": READY, "w-r": READY})
    assert stream.peers()["w-r"].uid == new["metadata"]["uid"]


def manual_slice(name: str, pods: list[dict], port: int) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/service-name": SERVICE, "endpointslice.kubernetes.io/managed-by": "test"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [p["status"]["podIP"]],
                "conditions": {"ready": True},
                "targetRef": {
                    "kind": "Pod",
                    "name": p["metadata"]["name"],
                    "namespace": p["metadata"]["namespace"],
                    "uid": p["metadata"]["uid"],
                },
            }
            for p in pods
        ],
    }


def test_pod_moving_between_slices_is_never_dropped(world: World, stream: StreamRecorder) -> None:
    """Resharding: a pod listed by slice A appears in slice B before leaving A, and stays a peer throughout."""
    ns, cluster = world.namespace, world.cluster
    pod = cluster.start_pod(ns, "w-move", {"app": "unselected"})  # not behind the Service's selector
    register_like_dynamo(cluster, pod)
    collection = ENDPOINT_SLICES.collection(ns)
    cluster.api.create(collection, manual_slice("shard-a", [pod], 8000))
    stream.wait_names({"w-move"})
    cluster.api.create(collection, manual_slice("shard-b", [pod], 9000))
    stream.wait_until(lambda r: sorted(p.port for p in r.peers()["w-move"].ports) == [8000, 9000], 30, "both ports")
    cluster.api.delete(ENDPOINT_SLICES.item(ns, "shard-a"))
    stream.wait_until(lambda r: [p.port for p in r.peers()["w-move"].ports] == [9000], 30, "only slice B's port")
    removed = [p.name for u in stream.updates for p in u.removed]
    assert "w-move" not in removed, "counted once across slices, kept until gone from all"
    cluster.api.delete(ENDPOINT_SLICES.item(ns, "shard-b"))
    stream.wait_names(set())


def test_apiserver_restart_degrades_then_recovers_without_losing_peers(
    outage_control_plane: ControlPlane, world: World, stream: StreamRecorder
) -> None:
    control_plane = outage_control_plane
    for i in range(3):
        world.worker(f"w-{i}")
    world.settle(stream, {f"w-{i}": READY for i in range(3)})
    before = len(stream.updates)
    # The watch of its own CR holds a position to resume from once its first list is in; on a server that
    # has just started, that list can take a second (the new resource's watch cache is still filling).
    wait_for(
        lambda: any(e.get("event") == "listed" and e.get("source") == "registration" for e in world.log_events()),
        30,
        what="the registration watch's first list",
    )
    control_plane.stop_apiserver()
    # With the server stopped, compact past every position it handed out (even one a bookmark brought up to
    # the newest revision): the restarted server can resume none of the three watches.
    control_plane.compact_past_every_watch()
    stream.wait_until(
        lambda r: any(u.kind == "status" and not u.connected for u in r.updates[before:]),
        60,
        "the stream to report DEGRADED",
    )
    assert set(stream.names()) == {"w-0", "w-1", "w-2"}, "peers are kept while the API server is away"
    control_plane.start_apiserver()
    stream.wait_until(
        lambda r: any(u.kind == "status" and u.connected for u in r.updates[before:]),
        90,
        "the stream to report recovery",
    )
    outage = stream.updates[before:]
    assert not [p.name for u in outage for p in u.removed + u.added], "no peer lost or invented by the outage"
    # The new peer's endpoints come from kube-controller-manager, which is not under test: a fresh one publishes
    # them at once, where the one that lived through the outage may still be backing off (up to a minute).
    control_plane.restart_controller_manager()
    world.worker("w-3")  # and the watches are live again
    world.settle(stream, {f"w-{i}": READY for i in range(4)})
    assert [e for e in world.log_events() if e.get("event") == "watch failed, retrying"], "the outage was seen"

    def relisted() -> set[str]:
        return {e["source"] for e in world.log_events() if e.get("event") == "resource version expired, relisting"}

    # All three watches relist, the watch of its own CR too; that one reports to registration, not to the
    # stream's status, so it may come back (on its own backoff) after the stream said CONNECTED.
    wait_for(lambda: relisted() == {"endpointslices", "dynamoworkermetadatas", "registration"}, 30, what="3 relists")


def test_reconnect_with_last_revision_gets_exactly_what_was_missed(world: World) -> None:
    world.worker("w-keep")
    world.worker("w-gone")
    world.wait_truth({"w-keep": READY, "w-gone": READY})
    first = StreamRecorder(world.observer.target, reconnect=False)
    first.wait_names({"w-keep", "w-gone"})
    view: PeerSetView = first.view
    first.close()
    resume_at = view.revision
    world.cluster.delete_pod(world.namespace, "w-gone", grace_seconds=0)
    world.worker("w-new")
    world.wait_truth({"w-keep": READY, "w-new": READY})
    resumed_view = PeerSetView()
    resumed_view.peers = dict(view.peers)
    resumed_view.revision, resumed_view.history_id = resume_at, view.history_id
    updates = []
    with DiscoveryClient(world.observer.target) as client:
        for update in client.watch(pb.PeerFilter(), reconnect=False, view=resumed_view):
            updates.append(update)
            if {p.name for p in resumed_view.peers.values()} == {"w-keep", "w-new"}:
                break
    assert updates[0].kind == "resumed", "the sidecar still holds that history: no snapshot"
    assert not any(u.reset for u in updates)
    assert sorted(p.name for u in updates for p in u.added) == ["w-new"]
    assert sorted(p.name for u in updates for p in u.removed) == ["w-gone"]
    assert all(u.revision > resume_at for u in updates[1:])


def test_selector_and_groups_over_the_real_stream(world: World) -> None:
    world.worker("pre-1", role="prefill")
    world.worker("dec-1", role="decode")
    peer_filter = pb.PeerFilter(
        groups=[
            pb.PeerGroup(name="prefill", selector="role=prefill"),
            pb.PeerGroup(name="decode", selector="role=decode"),
        ]
    )
    recorder = StreamRecorder(world.observer.target, peer_filter)
    try:
        recorder.wait_names({"pre-1", "dec-1"})
        assert {n: list(p.groups) for n, p in recorder.peers().items()} == {"pre-1": ["prefill"], "dec-1": ["decode"]}
    finally:
        recorder.close()
    only_decode = StreamRecorder(world.observer.target, pb.PeerFilter(selector="role notin (prefill)"))
    try:
        only_decode.wait_names({"dec-1"})
    finally:
        only_decode.close()


def test_invalid_metadata_keeps_last_valid_data(world: World, stream: StreamRecorder) -> None:
    pod = world.worker("w-bad")
    world.settle(stream, {"w-bad": READY})
    good = stream.peers()["w-bad"].data_json
    try:
        world.cluster.api.merge_patch(
            WORKER_METADATA.item(world.namespace, "w-bad"), {"spec": {"data": {"endpoints": ["not", "a", "map"]}}}
        )
    except ApiError as exc:  # pragma: no cover - the CRD accepts it: data is opaque to the schema
        raise AssertionError(exc) from exc
    world.worker("w-after")  # ordering sentinel on the same watch
    world.settle(stream, {"w-bad": READY, "w-after": READY})
    assert stream.peers()["w-bad"].data_json == good
    assert any(e.get("event", "").startswith("invalid worker metadata") for e in world.log_events())
    assert pod["metadata"]["uid"] == stream.peers()["w-bad"].uid
    assert world.cluster.api.get(PODS.item(world.namespace, "w-bad"))
