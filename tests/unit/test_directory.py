"""Tests for sidecar.core.directory, including a model-based property test of the whole core.

The model test drives a ``PeerDirectory`` with random operations over a small universe (3 pod names
with 2 incarnations each, 3 EndpointSlices, 4 CRs) and, after every step, checks it against a peer set
computed from scratch from the current "cluster truth" by an independent function written here; checks
that the log is exactly the difference, that replaying it rebuilds the peer set, and that any client's
projection of it (in any chunking, and resuming from any revision) reaches that client's snapshot.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.directory import PeerDirectory
from sidecar.core.eventlog import ApiStatus, LogEntry, PeerChange, StatusChange
from sidecar.core.instance_id import instance_id
from sidecar.core.join import PeerJoin
from sidecar.core.peer import Document, Peer, PeerState, PortInfo
from sidecar.core.projection import GroupedPeer, PeerFilter, project, snapshot_peers
from sidecar.core.records import EndpointEntry, MetadataRecord, ReadinessRecord
from sidecar.core.resources import parse_endpoint_slice, parse_worker_metadata
from sidecar.core.selectors import parse_selector
from sidecar.core.workers import Worker
from tests.unit.strict_client import apply_messages

NS = "ns"
SLICE_SOURCE, CR_SOURCE = "endpointslices", "dynamoworkermetadatas"
SOURCES = (SLICE_SOURCE, CR_SOURCE)
_rv = itertools.count(1)


# -- builders -----------------------------------------------------------------------------------------------


def raw_endpoint(
    uid: str,
    name: str,
    addresses: tuple[str, ...] = ("10.0.0.1",),
    conditions: Mapping[str, bool | None] | None = None,
    node: str = "",
) -> dict[str, Any]:
    return {
        "addresses": list(addresses),
        # the EndpointSlice controller always sets ``ready``; unset reads as not ready (as Dynamo reads it)
        "conditions": {k: v for k, v in (conditions or {"ready": True}).items() if v is not None},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "uid": uid, "name": name, "namespace": NS},
    }


def raw_from_entry(entry: EndpointEntry) -> dict[str, Any]:
    """The raw endpoint an already parsed entry came from (to rebuild a slice with a change)."""
    conditions = {"ready": entry.ready, "serving": entry.serving, "terminating": entry.terminating}
    return raw_endpoint(entry.pod_uid, entry.pod_name, entry.addresses, conditions, entry.node_name)


def make_slice(name: str, endpoints: list[dict[str, Any]], ports: tuple[int, ...] = (9000,)) -> ReadinessRecord:
    return parse_endpoint_slice(
        {
            "metadata": {"name": name, "namespace": NS, "resourceVersion": str(next(_rv))},
            "endpoints": endpoints,
            "ports": [{"name": f"p{p}", "port": p} for p in ports],
        }
    )


Owners = str | tuple[str, ...] | None
"""A CR's owner pod UIDs: one, several (extra owners merged into its ownerReferences), or none."""


def make_cr(name: str, owner: Owners, data: Any, labels: Mapping[str, str] | None = None) -> MetadataRecord:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": NS,
        "uid": f"cr-{name}",
        "resourceVersion": str(next(_rv)),
        "labels": dict(labels or {}),
    }
    owners = (owner,) if isinstance(owner, str) else owner or ()
    if owners:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid} for uid in owners]
    return parse_worker_metadata({"metadata": meta, "spec": {"data": data}})


def key(name: str) -> str:
    return f"{NS}/{name}"


def new_log_entries(directory: PeerDirectory, head: int) -> list[LogEntry]:
    entries = directory.log.entries_after(head)
    assert entries is not None
    return entries


# -- example tests ------------------------------------------------------------------------------------------


def test_synced_only_after_both_relists() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    assert not d.synced
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", []))
    d.apply(CR_SOURCE, key("p"), make_cr("p", "u", {}))
    assert not d.synced  # watch events alone never sync
    d.replace(SLICE_SOURCE, {})
    assert not d.synced
    d.replace(CR_SOURCE, {})
    assert d.synced
    d2 = PeerDirectory("h", 100, SOURCES)
    d2.replace(CR_SOURCE, {})
    assert not d2.synced
    d2.replace(SLICE_SOURCE, {})
    assert d2.synced


def test_apply_add_update_remove_logs_each_change() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    assert d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")])) == []
    (added,) = d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {}}))
    assert isinstance(added.change, PeerChange)
    assert added.revision == 1 and added.change.before is None and added.change.after is not None
    assert added.change.after.instance_id == instance_id("pod-1")
    assert dict(d.peers) == {"u1": added.change.after}
    (updated,) = d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {"x": {}}}))
    assert updated.revision == 2 and updated.change.before == added.change.after
    (removed,) = d.apply(SLICE_SOURCE, key("s1"), None)
    assert removed.change.after is None and dict(d.peers) == {}
    assert d.log.head_revision == 3


def test_unchanged_peer_produces_no_entry() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {}}))
    head = d.log.head_revision
    # new resourceVersions, same content
    assert d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")])) == []
    assert d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {}})) == []
    # a second slice listing the same pod with the same address and port: still the same peer
    assert d.apply(SLICE_SOURCE, key("s2"), make_slice("s2", [raw_endpoint("u1", "pod-1")])) == []
    assert d.log.head_revision == head


def test_relist_with_unchanged_content_appends_nothing() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    slices = {key(f"s{i}"): make_slice(f"s{i}", [raw_endpoint(f"u{i}", f"pod-{i}")]) for i in range(3)}
    crs = {key(f"pod-{i}"): make_cr(f"pod-{i}", f"u{i}", {"endpoints": {}}) for i in range(3)}
    d.replace(SLICE_SOURCE, slices)
    assert len(d.replace(CR_SOURCE, crs)) == 3
    head = d.log.head_revision
    assert d.replace(SLICE_SOURCE, slices) == []
    assert d.replace(CR_SOURCE, crs) == []
    # the same objects re-read from the API server (new resourceVersions): still nothing
    fresh_slices = {key(f"s{i}"): make_slice(f"s{i}", [raw_endpoint(f"u{i}", f"pod-{i}")]) for i in range(3)}
    fresh_crs = {key(f"pod-{i}"): make_cr(f"pod-{i}", f"u{i}", {"endpoints": {}}) for i in range(3)}
    assert d.replace(SLICE_SOURCE, fresh_slices) == []
    assert d.replace(CR_SOURCE, fresh_crs) == []
    assert d.log.head_revision == head
    assert set(d.peers) == {"u0", "u1", "u2"}


def test_relist_that_drops_an_object_removes_exactly_its_peers() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    slices = {
        key("s1"): make_slice("s1", [raw_endpoint("u1", "pod-1"), raw_endpoint("u2", "pod-2")]),
        key("s2"): make_slice("s2", [raw_endpoint("u2", "pod-2"), raw_endpoint("u3", "pod-3")]),
    }
    crs = {key(f"pod-{i}"): make_cr(f"pod-{i}", f"u{i}", {}) for i in (1, 2, 3)}
    d.replace(SLICE_SOURCE, slices)
    d.replace(CR_SOURCE, crs)
    assert set(d.peers) == {"u1", "u2", "u3"}
    # s1 vanished while the watch was down: u1 goes; u2 stays (still in s2) and is unchanged
    entries = d.replace(SLICE_SOURCE, {key("s2"): slices[key("s2")]})
    assert [(e.change.uid, e.change.after) for e in entries if isinstance(e.change, PeerChange)] == [("u1", None)]
    assert set(d.peers) == {"u2", "u3"}
    # the CR of pod-3 vanished too
    entries = d.replace(CR_SOURCE, {k: v for k, v in crs.items() if k != key("pod-3")})
    assert [(e.change.uid, e.change.after) for e in entries if isinstance(e.change, PeerChange)] == [("u3", None)]
    assert set(d.peers) == {"u2"}


def test_status_changes() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    assert d.status == StatusChange(ApiStatus.CONNECTED, "")
    assert d.set_status(ApiStatus.CONNECTED, "again") == []
    (entry,) = d.set_status(ApiStatus.DEGRADED, "watch failed")
    assert entry.change == StatusChange(ApiStatus.DEGRADED, "watch failed", previous=ApiStatus.CONNECTED)
    assert d.status == entry.change
    assert d.set_status(ApiStatus.DEGRADED, "still failing") == []  # only transitions are logged
    (entry,) = d.set_status(ApiStatus.CONNECTED, "")
    assert entry.revision == 2
    assert entry.change.previous is ApiStatus.DEGRADED


def test_sources_have_their_own_key_spaces() -> None:
    """Two sources may name objects alike; a relist of one never touches the other's objects."""
    d = PeerDirectory("h", 100, (SLICE_SOURCE, "other-slices", CR_SOURCE))
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    d.apply("other-slices", key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {}))
    assert set(d.peers) == {"u1"}
    assert d.replace(SLICE_SOURCE, {}) == []  # still listed by the other source
    assert set(d.peers) == {"u1"}
    (removed,) = d.replace("other-slices", {})
    assert isinstance(removed.change, PeerChange) and removed.change.after is None


def test_unknown_source_is_refused_with_the_known_ones() -> None:
    """A write for a source the directory was not built with is a wiring bug: say which sources exist."""
    d = PeerDirectory("h", 100, SOURCES)
    with pytest.raises(ValueError, match="unknown source 'pods'.*endpointslices, dynamoworkermetadatas"):
        d.apply("pods", key("p"), None)
    with pytest.raises(ValueError, match="at least one source"):
        PeerDirectory("h", 100, ())


def test_synced_needs_every_source() -> None:
    """Synced means every source the directory reads has listed once, however many there are."""
    d = PeerDirectory("h", 100, ("a", "b", "c"))
    for source in ("a", "b"):
        d.replace(source, {})
        assert not d.synced
    d.replace("c", {})
    assert d.synced


def test_deleting_unknown_objects_is_a_noop() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    assert d.apply(SLICE_SOURCE, key("nope"), None) == []
    assert d.apply(CR_SOURCE, key("nope"), None) == []
    assert d.log.head_revision == 0


def test_draining_is_an_update() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {}))
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    (entry,) = d.apply(
        SLICE_SOURCE,
        key("s1"),
        make_slice(
            "s1", [raw_endpoint("u1", "pod-1", conditions={"ready": False, "serving": True, "terminating": True})]
        ),
    )
    assert isinstance(entry.change, PeerChange)
    assert entry.change.after is not None and entry.change.after.state is PeerState.DRAINING
    (entry,) = d.apply(
        SLICE_SOURCE,
        key("s1"),
        make_slice(
            "s1", [raw_endpoint("u1", "pod-1", conditions={"ready": False, "serving": False, "terminating": True})]
        ),
    )
    assert isinstance(entry.change, PeerChange) and entry.change.after is None


def test_a_new_incarnation_replaces_the_old_one() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("old", "pod-1")]))
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "old", {"endpoints": {"v": 1}}))
    assert set(d.peers) == {"old"}
    # the pod is recreated: the slice now lists the new UID, the stale CR still names the old one
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("new", "pod-1")]))
    assert set(d.peers) == set()
    # the new sidecar fences the CR
    entries = d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "new", {"endpoints": {"v": 2}}))
    assert [e.change.uid for e in entries if isinstance(e.change, PeerChange)] == ["new"]
    assert d.peers["new"].data == {"endpoints": {"v": 2}}


def test_data_changes_are_compared_exactly() -> None:
    # 1, 1.0 and True are equal in Python but are different JSON a client must hear about
    d = PeerDirectory("h", 100, SOURCES)
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {"e": {"x": 1}}}))
    for value in (1.0, True, 1):
        (entry,) = d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {"e": {"x": value}}}))
        assert isinstance(entry.change, PeerChange) and entry.change.after is not None
        assert entry.change.after.data_json == json.dumps({"endpoints": {"e": {"x": value}}}, separators=(",", ":"))
    assert d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {"e": {"x": 1}}})) == []


def test_invalid_metadata_update_keeps_the_peer() -> None:
    d = PeerDirectory("h", 100, SOURCES)
    d.apply(SLICE_SOURCE, key("s1"), make_slice("s1", [raw_endpoint("u1", "pod-1")]))
    d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": {"v": 1}}))
    assert d.apply(CR_SOURCE, key("pod-1"), make_cr("pod-1", "u1", {"endpoints": ["not", "a", "map"]})) == []
    assert d.peers["u1"].data == {"endpoints": {"v": 1}}


# -- the model ------------------------------------------------------------------------------------------------

PODS = ("pod-a", "pod-b", "pod-c")
UIDS = tuple(f"{pod}-{n}" for pod in PODS for n in (1, 2))
SLICES = ("s1", "s2", "s3")
# "extra" is a CR not named after any pod: it may claim any pod as its owner, and must never lend one data
# (only the CR named after a pod does). CRs may also list several owners (extra ownerReferences).
CRS = (*PODS, "extra")
ADDRESSES = ("10.0.0.1", "10.0.0.2", "fd00::1")
VALID_DATA = (
    {},
    {"endpoints": {"ns/c/e/1": {"x": 1}}},
    {"endpoints": {"ns/c/e/1": {"x": 1.0}}},  # equal to the previous one in Python, not in JSON
    {"endpoints": {"ns/c/e/1": {"x": True}}},
    {"model_cards": {"m": {}}, "other": [1]},
)
INVALID_DATA = ("broken", None, {"endpoints": []}, {"event_channels": 3})


def pod_name(uid: str) -> str:
    return uid.rsplit("-", 1)[0]


COMMON_CONDITIONS = (
    {},  # all unset: not ready (Dynamo's reading of an unset ready)
    {"ready": True},
    {"ready": False, "serving": True, "terminating": True},  # draining
    {"ready": False, "serving": False, "terminating": True},  # gone
    {"ready": False},  # not ready
    {"ready": False, "serving": True},  # serving but not terminating: not a peer
)
any_conditions_st = st.fixed_dictionaries(
    {"ready": st.none() | st.booleans(), "serving": st.none() | st.booleans(), "terminating": st.none() | st.booleans()}
)
conditions_st = st.one_of(st.sampled_from(COMMON_CONDITIONS), any_conditions_st)
endpoint_st = st.builds(
    lambda uid, addresses, conditions, node: raw_endpoint(uid, pod_name(uid), tuple(addresses), conditions, node),
    st.sampled_from(UIDS),
    st.lists(st.sampled_from(ADDRESSES), unique=True, max_size=2),
    conditions_st,
    st.sampled_from(["", "n1", "n2"]),
)
slice_content_st = st.tuples(
    st.lists(endpoint_st, min_size=1, max_size=4, unique_by=lambda e: e["targetRef"]["uid"]),
    st.lists(st.sampled_from([80, 81, 82]), unique=True, max_size=2).map(tuple),
)
labels_st = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["prefill", "decode"]), "zone": st.just("a")})


data_st = st.one_of(st.sampled_from(VALID_DATA), st.sampled_from(VALID_DATA), st.sampled_from(INVALID_DATA))


def cr_content_st(name: str) -> st.SearchStrategy[tuple[Owners, Any, dict[str, str]]]:
    # Mostly owned by one of the incarnations of the pod it is named after, sometimes by anyone or no one,
    # sometimes by its pod plus others (extra owners merged in behind the registrar's back).
    own = st.sampled_from([uid for uid in UIDS if pod_name(uid) == name] or list(UIDS))
    several = st.tuples(own, st.lists(st.sampled_from(UIDS), min_size=1, max_size=3, unique=True)).map(
        lambda first_rest: (first_rest[0], *(u for u in first_rest[1] if u != first_rest[0]))
    )
    return st.tuples(
        st.one_of(own, own, own, st.sampled_from((*UIDS, None)), several),
        data_st,
        labels_st,
    )


slice_change_st = st.tuples(st.sampled_from(SLICES), st.one_of(*[slice_content_st] * 4, st.none()))
cr_change_st = st.sampled_from(CRS).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(*[cr_content_st(name)] * 4, st.none()))
)
op_st = st.one_of(
    st.tuples(st.just("slice"), slice_change_st),
    st.tuples(st.just("slice"), slice_change_st),
    st.tuples(st.just("slice"), slice_change_st),
    st.tuples(st.just("cr"), cr_change_st),
    st.tuples(st.just("cr"), cr_change_st),
    st.tuples(st.just("cr"), cr_change_st),
    # a relist after 410 Gone: some changes were missed while the watch was down
    st.tuples(st.just("relist_slices"), st.lists(slice_change_st, max_size=3)),
    st.tuples(st.just("relist_metadata"), st.lists(cr_change_st, max_size=3)),
    st.tuples(st.just("status"), st.sampled_from(ApiStatus)),
    # targeted changes of an existing object, the common case: new data for a CR, new conditions for a pod
    st.tuples(st.just("cr_data"), st.tuples(st.sampled_from(CRS), data_st)),
    st.tuples(st.just("cr_data"), st.tuples(st.sampled_from(CRS), data_st)),
    st.tuples(st.just("endpoint"), st.tuples(st.sampled_from(SLICES), endpoint_st)),
    st.tuples(st.just("endpoint"), st.tuples(st.sampled_from(SLICES), endpoint_st)),
)


class Truth:
    """The cluster as it is, plus what the spec says must be remembered: a CR's last valid data."""

    def __init__(self, require_metadata: bool = True) -> None:
        self.require_metadata = require_metadata  # False: a live pod without usable metadata is a peer too
        self.slices: dict[str, ReadinessRecord] = {}
        self.crs: dict[str, MetadataRecord] = {}
        # CR key -> its last valid record, kept across invalid updates while the owner stays the same.
        self.last_valid: dict[str, MetadataRecord] = {}

    def set_slice(
        self, name: str, content: tuple[list[dict[str, Any]], tuple[int, ...]] | None
    ) -> ReadinessRecord | None:
        view = None if content is None else make_slice(name, content[0], content[1])
        if view is None:
            self.slices.pop(key(name), None)
        else:
            self.slices[key(name)] = view
        return view

    def set_cr(self, name: str, content: tuple[Owners, Any, dict[str, str]] | None) -> MetadataRecord | None:
        record = None if content is None else make_cr(name, *content)
        if record is None:
            self.crs.pop(key(name), None)
        else:
            self.crs[key(name)] = record
        return record

    def observe_cr(self, k: str) -> None:
        """The directory has seen the current state of CR ``k``."""
        record = self.crs.get(k)
        if record is None:
            self.last_valid.pop(k, None)
        elif record.problem is None:
            self.last_valid[k] = record
        elif k in self.last_valid and self.last_valid[k].owner_pod_uids != record.owner_pod_uids:
            del self.last_valid[k]

    def peers(self) -> dict[str, Peer]:
        """The peer set, from scratch."""
        result = {}
        for uid in UIDS:
            listed = [
                (skey, e) for skey in sorted(self.slices) for e in self.slices[skey].endpoints if e.pod_uid == uid
            ]
            live = [e for _, e in listed if e.ready or (e.serving and e.terminating)]
            if not live:
                continue
            name = pod_name(uid)
            # Only the CR named after the pod, and owning it, speaks for it: an "extra" CR, or a CR naming
            # this pod among other owners, never lends it data.
            claims = [k for k, r in self.crs.items() if r.name == name and uid in r.owner_pod_uids]
            record: MetadataRecord | None = None
            if claims:
                (chosen,) = claims
                record = self.crs[chosen]
                if record.problem is not None:
                    fallback = self.last_valid.get(chosen)
                    record = fallback if fallback is not None and uid in fallback.owner_pod_uids else None
            if record is None and self.require_metadata:
                continue
            ports: set[PortInfo] = set()
            for skey, _ in listed:
                ports.update(self.slices[skey].ports)
            # Without metadata (require_metadata False): slices say nothing of the pod, so no labels, no data.
            labels, data = ({}, {}) if record is None else (dict(record.labels), record.data)
            assert data is not None
            # Slices announce no worker ports: a peer's one worker is at its one declared port, if any.
            address = next((a for e in live for a in e.addresses), "")
            declared = sorted({p.port for p in ports})
            one = address and len(declared) == 1
            host = str(ipaddress.ip_address(address)) if address else ""
            host = f"[{host}]" if ipaddress.ip_address(host or "0.0.0.0").version == 6 else host
            workers = (Worker(f"http://{host}:{declared[0]}", declared[0], "http"),) if one else ()
            result[uid] = Peer(
                uid=uid,
                name=name,
                namespace=NS,
                instance_id=instance_id(name),
                addresses=tuple(sorted({a for e in live for a in e.addresses})),
                ports=tuple(sorted(ports)),
                labels=labels,
                state=PeerState.READY if any(e.ready for e in live) else PeerState.DRAINING,
                document=Document(dict(data)),
                node_name=live[0].node_name,
                workers=workers,
            )
        return result


def as_json(peers: Mapping[str, Peer]) -> dict[str, Any]:
    return {uid: p.to_json_dict() for uid, p in peers.items()}


def project_in_chunks(
    entries: list[LogEntry], cuts: list[int], peer_filter: PeerFilter, self_uid: str, view: dict[str, GroupedPeer]
) -> None:
    bounds = sorted({0, len(entries), *(c for c in cuts if c <= len(entries))})
    for start, end in zip(bounds, bounds[1:], strict=False):
        apply_messages(view, project(entries[start:end], peer_filter, self_uid))


FILTER_SELECTORS = [parse_selector(s) for s in ("", "role=decode", "role", "zone!=a", "!role")]
GROUP_SETS = [(), (("prefill", parse_selector("role=prefill")), ("zoned", parse_selector("zone=a")))]
filter_st = st.builds(
    PeerFilter,
    selector=st.sampled_from(FILTER_SELECTORS),
    groups=st.sampled_from(GROUP_SETS),
    include_self=st.booleans(),
    ready_only=st.booleans(),
)


class ModelRun:
    """One PeerDirectory driven alongside the truth; every step is checked against it."""

    def __init__(self, require_metadata: bool = True) -> None:
        self.directory = PeerDirectory("history", 100_000, SOURCES, PeerJoin(require_metadata=require_metadata))
        self.truth = Truth(require_metadata)
        self.status = ApiStatus.CONNECTED
        self.listed: set[str] = set()
        self.replica: dict[str, Peer] = {}
        self.history: list[tuple[int, dict[str, Peer]]] = [(0, {})]

    def _relist_slices(self) -> None:
        """Re-read every slice from the API server: same content, fresh objects and resourceVersions."""
        fresh = {
            k: parse_endpoint_slice(
                {
                    "metadata": {"name": v.name, "namespace": NS, "resourceVersion": str(next(_rv))},
                    "ports": [{"name": p.name, "port": p.port} for p in v.ports],
                    "endpoints": [raw_from_entry(e) for e in v.endpoints],
                }
            )
            for k, v in self.truth.slices.items()
        }
        assert all(replace(self.truth.slices[k], resource_version=v.resource_version) == v for k, v in fresh.items())
        self.truth.slices = fresh

    def step(self, op: str, arg: Any) -> None:
        directory, truth = self.directory, self.truth
        expected_before = truth.peers()
        head = directory.log.head_revision
        relist_unchanged = False
        if op == "slice":
            name, content = arg
            got = directory.apply(SLICE_SOURCE, key(name), truth.set_slice(name, content))
        elif op == "cr":
            name, content = arg
            got = directory.apply(CR_SOURCE, key(name), truth.set_cr(name, content))
            truth.observe_cr(key(name))
        elif op == "cr_data":
            name, new_data = arg
            current = truth.crs.get(key(name))
            content = None
            if current is not None:
                content = (current.owner_pod_uids or None, new_data, dict(current.labels))
            got = directory.apply(CR_SOURCE, key(name), truth.set_cr(name, content))
            truth.observe_cr(key(name))
        elif op == "endpoint":
            name, endpoint = arg
            current_slice = truth.slices.get(key(name))
            others = (
                []
                if current_slice is None
                else [raw_from_entry(e) for e in current_slice.endpoints if e.pod_uid != endpoint["targetRef"]["uid"]]
            )
            ports = (80,) if current_slice is None else tuple(p.port for p in current_slice.ports)
            got = directory.apply(SLICE_SOURCE, key(name), truth.set_slice(name, ([*others, endpoint], ports)))
        elif op == "relist_slices":
            # a relist after 410 Gone: the changes in ``arg`` happened while the watch was down
            for name, content in arg:
                truth.set_slice(name, content)
            relist_unchanged = not arg
            self._relist_slices()
            got = directory.replace(SLICE_SOURCE, dict(truth.slices))
            self.listed.add("slices")
        elif op == "relist_metadata":
            for name, content in arg:
                truth.set_cr(name, content)
            relist_unchanged = not arg
            got = directory.replace(CR_SOURCE, dict(truth.crs))
            for k in set(truth.last_valid) | set(truth.crs):
                truth.observe_cr(k)
            self.listed.add("metadata")
        else:
            got = directory.set_status(arg, "reason")
            assert len(got) == (0 if arg is self.status else 1)
            if got:
                assert got[0].change == StatusChange(arg, "reason", previous=self.status)
            self.status = arg
            assert directory.status.status is self.status

        expected = truth.peers()
        # what was returned is what was appended
        assert got == new_log_entries(directory, head)
        assert [e.revision for e in got] == list(range(head + 1, head + 1 + len(got)))
        # (1) the peer set equals the one computed from scratch
        assert dict(directory.peers) == expected
        assert as_json(directory.peers) == as_json(expected)
        # the log holds exactly the differences, once per peer, and nothing spurious
        changes = [e.change for e in got if isinstance(e.change, PeerChange)]
        assert len({c.uid for c in changes}) == len(changes)
        assert {c.uid: (c.before, c.after) for c in changes} == {
            uid: (expected_before.get(uid), expected.get(uid))
            for uid in expected_before.keys() | expected.keys()
            if expected_before.get(uid) != expected.get(uid)
        }
        if relist_unchanged:
            assert got == []
        # (2) replaying the log rebuilds the peer set
        for entry in got:
            if isinstance(entry.change, PeerChange):
                assert entry.change.before != entry.change.after
                assert self.replica.get(entry.change.uid) == entry.change.before
                if entry.change.after is None:
                    del self.replica[entry.change.uid]
                else:
                    self.replica[entry.change.uid] = entry.change.after
        assert self.replica == dict(directory.peers)
        assert directory.synced == (self.listed == {"slices", "metadata"})
        self.history.append((directory.log.head_revision, dict(directory.peers)))

    def check_full_replay(self) -> list[LogEntry]:
        all_entries = self.directory.log.entries_after(0)
        assert all_entries is not None and len(all_entries) == self.directory.log.head_revision
        rebuilt: dict[str, Peer] = {}
        for entry in all_entries:
            if isinstance(entry.change, PeerChange):
                if entry.change.after is None:
                    rebuilt.pop(entry.change.uid)
                else:
                    rebuilt[entry.change.uid] = entry.change.after
        assert rebuilt == dict(self.directory.peers)
        return all_entries

    def check_client(
        self,
        peer_filter: PeerFilter,
        self_uid: str,
        cuts: list[int],
        resume_at: int,
        resume_cuts: list[int],
    ) -> None:
        """(3) Projecting the whole log onto an empty view, in any chunking, or resuming from a revision on top
        of the snapshot at that revision, reaches the client's snapshot of the final peer set."""
        all_entries = self.check_full_replay()
        final = {v.peer.uid: v for v in snapshot_peers(self.directory.peers.values(), peer_filter, self_uid)}

        view: dict[str, GroupedPeer] = {}
        apply_messages(view, project(all_entries, peer_filter, self_uid))
        assert view == final

        view = {}
        project_in_chunks(all_entries, cuts, peer_filter, self_uid, view)
        assert view == final

        revision, peers_then = self.history[resume_at]
        view = {v.peer.uid: v for v in snapshot_peers(peers_then.values(), peer_filter, self_uid)}
        tail = self.directory.log.entries_after(revision)
        assert tail is not None
        project_in_chunks(tail, resume_cuts, peer_filter, self_uid, view)
        assert view == final


@settings(max_examples=80, deadline=None)
@given(st.lists(op_st, min_size=8, max_size=40), st.data(), st.booleans())
def test_model_based_directory(ops: list[tuple[str, Any]], data: st.DataObject, require_metadata: bool) -> None:
    """Shrinkable: a failure is reported as a short sequence of operations. Both join rules: metadata
    required (the default), or a live pod is a peer without it (DISCOVERY_REQUIRE_METADATA=false)."""
    run = ModelRun(require_metadata)
    for op, arg in ops:
        run.step(op, arg)
    for _ in range(3):
        run.check_client(
            data.draw(filter_st, label="filter"),
            data.draw(st.sampled_from(UIDS), label="self_uid"),
            data.draw(st.lists(st.integers(0, run.directory.log.head_revision), max_size=6), label="cuts"),
            data.draw(st.integers(0, len(run.history) - 1), label="resume at step"),
            data.draw(st.lists(st.integers(0, run.directory.log.head_revision), max_size=4), label="resume cuts"),
        )


# Long random runs: cheap to generate, so they reach deep states (pods in several slices, draining pods,
# fallbacks to last valid data, missed changes across relists) that short shrinkable sequences rarely do.
# A failure names the seed, which replays it exactly.


def random_conditions(rng: random.Random) -> dict[str, bool | None]:
    if rng.random() < 0.8:
        return dict(rng.choice(COMMON_CONDITIONS))
    return {c: rng.choice([None, True, False]) for c in ("ready", "serving", "terminating")}


def random_endpoint(rng: random.Random, uid: str) -> dict[str, Any]:
    addresses = tuple(rng.sample(ADDRESSES, rng.randint(0, 2)))
    return raw_endpoint(uid, pod_name(uid), addresses, random_conditions(rng), rng.choice(["", "n1", "n2"]))


def random_slice_change(rng: random.Random) -> tuple[str, Any]:
    name = rng.choice(SLICES)
    if rng.random() < 0.15:
        return name, None
    endpoints = [random_endpoint(rng, uid) for uid in rng.sample(UIDS, rng.randint(1, 4))]
    return name, (endpoints, tuple(rng.sample([80, 81, 82], rng.randint(0, 2))))


def random_data(rng: random.Random) -> Any:
    return rng.choice(VALID_DATA) if rng.random() < 0.7 else rng.choice(INVALID_DATA)


def random_cr_change(rng: random.Random) -> tuple[str, Any]:
    name = rng.choice(CRS)
    if rng.random() < 0.15:
        return name, None
    own = [uid for uid in UIDS if pod_name(uid) == name] or list(UIDS)
    owner: Owners = rng.choice(own) if rng.random() < 0.8 else rng.choice([*UIDS, None])
    if owner is not None and rng.random() < 0.15:  # extra owners on top
        owner = (owner, *(u for u in rng.sample(UIDS, rng.randint(1, 3)) if u != owner))
    labels = {
        k: v
        for k, v in (("role", rng.choice(["prefill", "decode", None])), ("zone", rng.choice(["a", None])))
        if v is not None
    }
    return name, (owner, random_data(rng), labels)


def random_op(rng: random.Random) -> tuple[str, Any]:
    kind = rng.choices(
        ["slice", "cr", "cr_data", "endpoint", "relist_slices", "relist_metadata", "status"],
        weights=[3, 3, 3, 4, 1, 1, 1],
    )[0]
    if kind == "slice":
        return kind, random_slice_change(rng)
    if kind == "cr":
        return kind, random_cr_change(rng)
    if kind == "cr_data":
        return kind, (rng.choice(CRS), random_data(rng))
    if kind == "endpoint":
        return kind, (rng.choice(SLICES), random_endpoint(rng, rng.choice(UIDS)))
    if kind == "relist_slices":
        return kind, [random_slice_change(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    if kind == "relist_metadata":
        return kind, [random_cr_change(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    return kind, rng.choice(list(ApiStatus))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_model_based_directory_long_random_runs(seed: int) -> None:
    rng = random.Random(seed)
    run = ModelRun(require_metadata=rng.random() < 0.7)
    for _ in range(150):
        run.step(*random_op(rng))
    head = run.directory.log.head_revision
    for _ in range(4):
        peer_filter = PeerFilter(
            selector=rng.choice(FILTER_SELECTORS),
            groups=rng.choice(GROUP_SETS),
            include_self=rng.random() < 0.5,
            ready_only=rng.random() < 0.5,
        )
        run.check_client(
            peer_filter,
            rng.choice(UIDS),
            [rng.randint(0, head) for _ in range(rng.randint(0, 8))],
            rng.randrange(len(run.history)),
            [rng.randint(0, head) for _ in range(rng.randint(0, 8))],
        )
