"""Tests for sidecar.core.join: EndpointSlice readiness x DynamoWorkerMetadata, keyed by pod UID."""

from __future__ import annotations

from typing import Any

from sidecar.core.instance_id import instance_id
from sidecar.core.join import PeerJoin
from sidecar.core.peer import PeerState, PortInfo, canonical_json
from sidecar.core.records import MetadataRecord, ReadinessRecord
from sidecar.core.resources import parse_endpoint_slice, parse_pod, parse_worker_metadata
from sidecar.core.workers import WorkerPolicy

NS = "ns"


def ep(
    uid: str,
    name: str,
    addresses: tuple[str, ...] = ("10.0.0.1",),
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node: str = "",
) -> dict[str, Any]:
    conditions = {
        k: v for k, v in (("ready", ready), ("serving", serving), ("terminating", terminating)) if v is not None
    }
    out: dict[str, Any] = {
        "addresses": list(addresses),
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "uid": uid, "name": name, "namespace": NS},
    }
    if node:
        out["nodeName"] = node
    return out


def slice_view(name: str, endpoints: list[dict[str, Any]], ports: tuple[int, ...] = (9000,)) -> ReadinessRecord:
    return parse_endpoint_slice(
        {
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "endpoints": endpoints,
            "ports": [{"name": f"p{p}", "port": p, "protocol": "TCP"} for p in ports],
        }
    )


def cr(name: str, owner_uid: str | None, data: Any, labels: dict[str, str] | None = None) -> MetadataRecord:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "uid": f"cr-{name}", "labels": labels or {}}
    if owner_uid is not None:
        meta["ownerReferences"] = [{"kind": "Pod", "name": name, "uid": owner_uid, "apiVersion": "v1"}]
    return parse_worker_metadata({"metadata": meta, "spec": {"data": data}})


def key(name: str) -> str:
    return f"{NS}/{name}"


def joined(uid: str = "u1", name: str = "pod-1", **ep_kwargs: Any) -> PeerJoin:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep(uid, name, **ep_kwargs)]))
    join.upsert(key(name), cr(name, uid, {"endpoints": {}}))
    return join


def test_ready_endpoint_with_owned_cr_is_a_peer() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1", node="n1")]))
    assert join.peer("u1") is None  # no CR yet
    affected = join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {"a": 1}}, {"role": "x"}))
    assert affected == {"u1"}
    peer = join.peer("u1")
    assert peer is not None
    assert (peer.uid, peer.name, peer.namespace) == ("u1", "pod-1", NS)
    assert peer.instance_id == instance_id("pod-1")
    assert peer.addresses == ("10.0.0.1",)
    assert peer.ports == (PortInfo(9000, "p9000", "TCP", ""),)
    assert peer.state is PeerState.READY
    assert peer.data == {"endpoints": {"a": 1}}
    assert peer.data_json == canonical_json({"endpoints": {"a": 1}})
    assert dict(peer.labels) == {"role": "x"}
    assert peer.node_name == "n1"


def test_cr_without_slice_is_not_a_peer() -> None:
    join = PeerJoin()
    join.upsert(key("pod-1"), cr("pod-1", "u1", {}))
    assert join.peer("u1") is None
    assert join.known_pod_uids() == {"u1"}


def test_not_ready_not_serving_is_not_a_peer() -> None:
    assert joined(ready=False).peer("u1") is None
    assert joined(ready=False, serving=True).peer("u1") is None  # serving but not terminating
    assert joined(ready=False, serving=False, terminating=True).peer("u1") is None


def test_serving_and_terminating_is_draining() -> None:
    peer = joined(ready=False, serving=True, terminating=True).peer("u1")
    assert peer is not None and peer.state is PeerState.DRAINING


def test_ready_in_one_slice_wins_over_draining_in_another() -> None:
    join = joined(ready=False, serving=True, terminating=True)
    join.upsert(key("s2"), slice_view("s2", [ep("u1", "pod-1", addresses=("10.0.0.2",))]))
    peer = join.peer("u1")
    assert peer is not None and peer.state is PeerState.READY
    assert peer.addresses == ("10.0.0.1", "10.0.0.2")


def test_cr_of_an_earlier_incarnation_never_joins() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u-new", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", "u-old", {"endpoints": {}}))
    assert join.peer("u-new") is None
    assert join.peer("u-old") is None
    # the new pod's registration replaces the CR: now it joins
    affected = join.upsert(key("pod-1"), cr("pod-1", "u-new", {"endpoints": {}}))
    assert affected == {"u-old", "u-new"}
    assert join.peer("u-new") is not None


def test_cr_without_owner_never_joins() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", None, {}))
    assert join.peer("u1") is None


def test_pod_in_several_slices_counted_once_and_stays_until_gone_from_all() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1", addresses=("10.0.0.1",))], ports=(1,)))
    join.upsert(key("s2"), slice_view("s2", [ep("u1", "pod-1", addresses=("fd00::1",))], ports=(2,)))
    join.upsert(key("pod-1"), cr("pod-1", "u1", {}))
    peer = join.peer("u1")
    assert peer is not None
    assert peer.addresses == ("10.0.0.1", "fd00::1")
    assert [p.port for p in peer.ports] == [1, 2]
    assert join.delete(key("s1")) == {"u1"}
    peer = join.peer("u1")
    assert peer is not None and peer.addresses == ("fd00::1",) and [p.port for p in peer.ports] == [2]
    # dropping the pod from s2 (slice still exists) removes it
    assert join.upsert(key("s2"), slice_view("s2", [], ports=(2,))) == {"u1"}
    assert join.peer("u1") is None
    assert join.known_pod_uids() == {"u1"}  # the CR is still known


def test_addresses_only_from_live_entries_ports_from_all_slices() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1", addresses=("10.0.0.1",))], ports=(1,)))
    join.upsert(key("s2"), slice_view("s2", [ep("u1", "pod-1", addresses=("10.9.9.9",), ready=False)], ports=(2,)))
    join.upsert(key("pod-1"), cr("pod-1", "u1", {}))
    peer = join.peer("u1")
    assert peer is not None
    assert peer.addresses == ("10.0.0.1",)
    assert [p.port for p in peer.ports] == [1, 2]


def test_invalid_data_keeps_last_valid_metadata_of_the_same_incarnation() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {"v": 1}}))
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": "broken"}))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"v": 1}}
    # several invalid updates in a row still keep it
    join.upsert(key("pod-1"), cr("pod-1", "u1", 42))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"v": 1}}
    # a valid update replaces it
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {"v": 2}}))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"v": 2}}


def test_invalid_data_first_means_no_peer() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", "u1", [1]))
    assert join.peer("u1") is None


def test_last_valid_data_does_not_survive_a_delete() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {}}))
    join.delete(key("pod-1"))
    join.upsert(key("pod-1"), cr("pod-1", "u1", "broken"))
    assert join.peer("u1") is None


def test_last_valid_data_does_not_cross_incarnations() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u-old", "pod-1"), ep("u-new", "pod-1")]))
    join.upsert(key("pod-1"), cr("pod-1", "u-old", {"endpoints": {"old": 1}}))
    assert join.peer("u-old") is not None
    # the CR is taken over by the new incarnation but with invalid data: old data must not join it
    join.upsert(key("pod-1"), cr("pod-1", "u-new", "broken"))
    assert join.peer("u-new") is None
    assert join.peer("u-old") is None
    # and flipping the owner back (invalid) does not resurrect the old data either
    join.upsert(key("pod-1"), cr("pod-1", "u-old", "still broken"))
    assert join.peer("u-old") is None


def owned_by_several(name: str, owner_uids: tuple[str, ...], data: Any) -> MetadataRecord:
    """A CR named ``name`` listing several pods as owners (what a merge patch of ownerReferences can make)."""
    refs = [{"kind": "Pod", "name": f"pod-of-{uid}", "uid": uid, "apiVersion": "v1"} for uid in owner_uids]
    meta = {"name": name, "namespace": NS, "uid": f"cr-{name}", "ownerReferences": refs}
    return parse_worker_metadata({"metadata": meta, "spec": {"data": data}})


def test_only_the_cr_named_after_the_pod_lends_it_data() -> None:
    """Dynamo's rule: a CR owned by the pod but named otherwise never joins it, not even as a fallback."""
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert(key("aaa-other"), cr("aaa-other", "u1", {"endpoints": {"other": 1}}))
    assert join.peer("u1") is None, "a CR not named after the pod must not lend it data"
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {"own": 1}}))
    peer = join.peer("u1")
    assert peer is not None
    assert peer.data == {"endpoints": {"own": 1}}
    assert peer.instance_id == instance_id("pod-1")
    # the own CR going invalid keeps its own last valid data, not the other CR's
    join.upsert(key("pod-1"), cr("pod-1", "u1", "broken"))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"own": 1}}
    # and the other CR being deleted does not affect that
    join.delete(key("aaa-other"))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"own": 1}}
    # the own CR gone: the other CR does not step in
    join.upsert(key("aaa-other"), cr("aaa-other", "u1", {"endpoints": {"other": 2}}))
    join.delete(key("pod-1"))
    assert join.peer("u1") is None


def test_extra_owners_on_a_cr_never_lend_its_data_to_other_pods() -> None:
    """Pod A's CR listing pods B and C as owners too: A joins with it, B and C (ready, no CR) do not."""
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("ua", "pod-a"), ep("ub", "pod-b"), ep("uc", "pod-c")]))
    affected = join.upsert(key("pod-a"), owned_by_several("pod-a", ("ua", "ub", "uc"), {"endpoints": {"a": 1}}))
    assert affected == {"ua", "ub", "uc"}, "every claimed owner is re-evaluated"
    peer_a = join.peer("ua")
    assert peer_a is not None and peer_a.data == {"endpoints": {"a": 1}}
    assert join.peer("ub") is None
    assert join.peer("uc") is None
    # C registers its own CR: it joins with its own data, never A's
    join.upsert(key("pod-c"), cr("pod-c", "uc", {"endpoints": {"c": 1}}))
    peer_c = join.peer("uc")
    assert peer_c is not None and peer_c.data == {"endpoints": {"c": 1}}
    assert peer_c.instance_id == instance_id("pod-c")
    # A's CR turning invalid: A keeps its last valid data only while its owners stay the same
    join.upsert(key("pod-a"), owned_by_several("pod-a", ("ua", "ub", "uc"), "broken"))
    peer_a = join.peer("ua")
    assert peer_a is not None and peer_a.data == {"endpoints": {"a": 1}}
    assert join.peer("ub") is None
    # the extra owners removed again (the registrar's repair): nothing changes for B and C
    join.upsert(key("pod-a"), cr("pod-a", "ua", {"endpoints": {"a": 2}}))
    peer_a = join.peer("ua")
    assert peer_a is not None and peer_a.data == {"endpoints": {"a": 2}}
    assert join.peer("ub") is None
    peer_c = join.peer("uc")
    assert peer_c is not None and peer_c.data == {"endpoints": {"c": 1}}


def test_a_cr_named_after_a_pod_but_owned_by_another_never_joins_either() -> None:
    """The name alone is not enough: the CR named after pod C but owned only by A lends C nothing, nor A."""
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("ua", "pod-a"), ep("uc", "pod-c")]))
    join.upsert(key("pod-c"), cr("pod-c", "ua", {"endpoints": {}}))
    assert join.peer("ua") is None
    assert join.peer("uc") is None


def test_a_cr_of_the_pods_name_in_another_namespace_never_joins() -> None:
    """Named after the pod and claiming its UID, but in another namespace: not the pod's CR."""
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "pod-1")]))
    elsewhere = parse_worker_metadata(
        {
            "metadata": {
                "name": "pod-1",
                "namespace": "elsewhere",
                "uid": "cr-x",
                "ownerReferences": [{"kind": "Pod", "name": "pod-1", "uid": "u1", "apiVersion": "v1"}],
            },
            "spec": {"data": {"endpoints": {"x": 1}}},
        }
    )
    join.upsert("elsewhere/pod-1", elsewhere)
    assert join.peer("u1") is None
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {"own": 1}}))
    peer = join.peer("u1")
    assert peer is not None and peer.data == {"endpoints": {"own": 1}} and peer.namespace == NS


def test_instance_id_from_cr_name_and_name_from_slice() -> None:
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "worker-0")]))
    join.upsert(key("worker-0"), cr("worker-0", "u1", {}))
    peer = join.peer("u1")
    assert peer is not None
    assert peer.name == "worker-0"
    assert peer.instance_id == 1186445869714687


def test_an_endpoint_that_does_not_name_its_pod_never_joins() -> None:
    """Without the pod's name there is no CR named after it: a targetRef without a name cannot be joined
    (it used to fall back to any CR owning the UID, which is how a CR claiming other pods lent them data)."""
    join = PeerJoin()
    join.upsert(key("s1"), slice_view("s1", [ep("u1", "")]))  # targetRef without a name
    join.upsert(key("worker-0"), cr("worker-0", "u1", {}))
    assert join.peer("u1") is None
    # another slice naming the pod: now the CR named after it is found
    join.upsert(key("s2"), slice_view("s2", [ep("u1", "worker-0", addresses=("10.0.0.2",))]))
    peer = join.peer("u1")
    assert peer is not None
    assert peer.name == "worker-0"
    assert peer.instance_id == 1186445869714687
    assert peer.addresses == ("10.0.0.1", "10.0.0.2")


def test_mutators_return_affected_uids_and_noops_return_nothing() -> None:
    join = PeerJoin()
    view = slice_view("s1", [ep("u1", "pod-1"), ep("u2", "pod-2")])
    assert join.upsert(key("s1"), view) == {"u1", "u2"}
    assert join.upsert(key("s1"), view) == set()
    assert join.upsert(key("s1"), slice_view("s1", [ep("u2", "pod-2")])) == {"u1", "u2"}
    assert join.delete(key("s1")) == {"u2"}
    assert join.delete(key("s1")) == set()
    record = cr("pod-1", "u1", {})
    assert join.upsert(key("pod-1"), record) == {"u1"}
    assert join.upsert(key("pod-1"), record) == set()
    assert join.delete(key("pod-1")) == {"u1"}
    assert join.delete(key("pod-1")) == set()
    assert join.known_pod_uids() == set()
    assert join.peer("u1") is None and join.peer("u2") is None


def test_a_record_type_decides_the_side_of_the_join_whatever_its_key() -> None:
    """Keys are opaque: readiness and metadata are told apart by the record, not by a key or a source."""
    join = PeerJoin()
    join.upsert("anything", slice_view("s1", [ep("u1", "pod-1")]))
    join.upsert("something-else", cr("pod-1", "u1", {"endpoints": {}}))
    assert join.peer("u1") is not None
    assert join.delete("something-else") == {"u1"}
    assert join.peer("u1") is None
    assert join.delete("anything") == {"u1"}
    assert join.known_pod_uids() == set()


def test_cr_update_without_data_change_but_label_change_changes_peer() -> None:
    join = joined()
    before = join.peer("u1")
    join.upsert(key("pod-1"), cr("pod-1", "u1", {"endpoints": {}}, {"role": "prefill"}))
    after = join.peer("u1")
    assert before is not None and after is not None
    assert before != after
    assert dict(after.labels) == {"role": "prefill"}


def pod_view(
    uid: str, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None, **kwargs: Any
) -> ReadinessRecord:
    status: dict[str, Any] = {
        "phase": "Running",
        "podIP": kwargs.get("ip", "10.0.0.9"),
        "conditions": [{"type": "Ready", "status": "True" if kwargs.get("ready", True) else "False"}],
    }
    meta: dict[str, Any] = {"name": name, "namespace": NS, "uid": uid, "labels": labels}
    meta["annotations"] = annotations or {}
    if kwargs.get("deleting"):
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return parse_pod({"metadata": meta, "spec": {}, "status": status})


class TestWithoutMetadata:
    """``require_metadata=False``: a ready pod is a peer without a CR (pods that run no sidecar)."""

    def test_a_ready_pod_without_a_cr_is_a_peer_with_its_own_labels(self) -> None:
        join = PeerJoin(require_metadata=False, workers=WorkerPolicy(port=8000))
        assert join.upsert(key("w-0"), pod_view("u1", "w-0", {"app": "w", "role": "prefill"})) == {"u1"}
        peer = join.peer("u1")
        assert peer is not None
        assert (peer.name, peer.namespace, peer.state) == ("w-0", NS, PeerState.READY)
        assert dict(peer.labels) == {"app": "w", "role": "prefill"}
        assert peer.data == {} and peer.data_json == "{}"
        assert peer.instance_id == instance_id("w-0")
        assert [w.url for w in peer.workers] == ["http://10.0.0.9:8000"]

    def test_the_default_still_requires_the_cr(self) -> None:
        join = PeerJoin()
        join.upsert(key("w-0"), pod_view("u1", "w-0", {"app": "w"}))
        assert join.peer("u1") is None

    def test_relabelling_is_followed_live(self) -> None:
        """A new pod object with other labels: the peer's labels (and so every filter) follow at once."""
        join = PeerJoin(require_metadata=False)
        join.upsert(key("w-0"), pod_view("u1", "w-0", {"role": "prefill"}))
        assert join.upsert(key("w-0"), pod_view("u1", "w-0", {"role": "decode"})) == {"u1"}
        peer = join.peer("u1")
        assert peer is not None and dict(peer.labels) == {"role": "decode"}

    def test_annotations_make_the_workers(self) -> None:
        join = PeerJoin(require_metadata=False, workers=WorkerPolicy(port=8000))
        annotations = {"smg.ai/worker-ports": "8080,8081", "sglang.ai/bootstrap-port": "9080,9081"}
        join.upsert(key("w-0"), pod_view("u1", "w-0", {}, annotations))
        peer = join.peer("u1")
        assert peer is not None
        assert [(w.url, w.bootstrap_port) for w in peer.workers] == [
            ("http://10.0.0.9:8080", 9080),
            ("http://10.0.0.9:8081", 9081),
        ]

    def test_a_bad_annotation_costs_workers_not_the_peer(self) -> None:
        """The pod stays a peer; the skipped worker is reported for the shell to log."""
        join = PeerJoin(require_metadata=False, workers=WorkerPolicy(port=8000))
        join.upsert(key("w-0"), pod_view("u1", "w-0", {}, {"smg.ai/worker-ports": "8080,oops"}))
        peer = join.peer("u1")
        assert peer is not None and [w.port for w in peer.workers] == [8080]
        assert peer.worker_problems and "oops" in peer.worker_problems[0]

    def test_a_cr_of_the_pod_still_joins_with_its_data_and_labels(self) -> None:
        """A pod that runs the sidecar is described by its CR, as with require_metadata."""
        join = PeerJoin(require_metadata=False)
        join.upsert(key("w-0"), pod_view("u1", "w-0", {"from": "pod"}))
        join.upsert("cr/" + key("w-0"), cr("w-0", "u1", {"endpoints": {}}, {"from": "cr"}))
        peer = join.peer("u1")
        assert peer is not None and dict(peer.labels) == {"from": "cr"} and peer.data == {"endpoints": {}}

    def test_a_stale_cr_of_an_earlier_incarnation_lends_nothing(self) -> None:
        """The new incarnation is a peer on its own (pod labels, no data), never with the old pod's data."""
        join = PeerJoin(require_metadata=False)
        join.upsert("cr/" + key("w-0"), cr("w-0", "u-old", {"endpoints": {"x": 1}}, {"from": "cr"}))
        join.upsert(key("w-0"), pod_view("u-new", "w-0", {"from": "pod"}))
        peer = join.peer("u-new")
        assert peer is not None and peer.data == {} and dict(peer.labels) == {"from": "pod"}

    def test_unready_and_deleting_pods(self) -> None:
        join = PeerJoin(require_metadata=False)
        join.upsert(key("w-0"), pod_view("u1", "w-0", {}, ready=False))
        assert join.peer("u1") is None
        join.upsert(key("w-0"), pod_view("u1", "w-0", {}, deleting=True))
        peer = join.peer("u1")
        assert peer is not None and peer.state is PeerState.DRAINING
        join.delete(key("w-0"))
        assert join.peer("u1") is None


def test_container_mode_without_metadata_each_container_is_a_peer_of_the_pods_labels() -> None:
    """Containers that run no sidecar (DISCOVERY_REQUIRE_METADATA=false): one peer per ready container,
    named as its CR would be, with the pod's own labels and no data."""
    from sidecar.core.resources import parse_pod_containers

    raw = {
        "metadata": {"name": "w0", "namespace": NS, "uid": "u0", "labels": {"app": "w"}},
        "spec": {"containers": [{"name": "main"}, {"name": "engine"}]},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.9",
            "containerStatuses": [{"name": "main", "ready": True}, {"name": "engine", "ready": True}],
        },
    }
    join = PeerJoin(require_metadata=False)
    affected = join.upsert(key("w0"), parse_pod_containers(raw))
    peers = {p.name: p for p in (join.peer(k) for k in affected) if p is not None}
    assert set(peers) == {"w0", "w0-engine"}
    assert all(dict(p.labels) == {"app": "w"} and p.data == {} for p in peers.values())
    assert peers["w0-engine"].container == "engine" and peers["w0-engine"].instance_id == instance_id("w0-engine")
