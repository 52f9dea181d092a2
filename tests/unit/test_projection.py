"""Tests for sidecar.core.projection: filtering, classification and per-peer coalescing of the log."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.eventlog import ApiStatus, LogEntry, PeerChange, StatusChange
from sidecar.core.peer import Document, Peer, PeerState
from sidecar.core.projection import (
    ClientEvent,
    DeltaMessage,
    EventType,
    GroupedPeer,
    PeerFilter,
    StatusMessage,
    classify,
    grouped_peer,
    project,
    snapshot_peers,
)
from sidecar.core.selectors import parse_selector
from tests.unit.strict_client import apply_messages


def peer(
    uid: str,
    labels: dict[str, str] | None = None,
    state: PeerState = PeerState.READY,
    data: Any = None,
    name: str | None = None,
    namespace: str = "ns",
) -> Peer:
    data = {} if data is None else data
    return Peer(
        uid=uid,
        name=name or f"pod-{uid}",
        namespace=namespace,
        instance_id=1,
        addresses=("10.0.0.1",),
        ports=(),
        labels=labels or {},
        state=state,
        document=Document(data),
    )


SELF = "self"
GROUPS = PeerFilter(
    groups=(("prefill", parse_selector("role=prefill")), ("any-role", parse_selector("role"))),
)


# -- PeerFilter.groups_of -------------------------------------------------------------------------------


def test_default_filter_includes_everyone_but_self() -> None:
    f = PeerFilter()
    assert f.groups_of(peer("a"), SELF) == ()
    assert f.groups_of(peer(SELF), SELF) is None
    assert PeerFilter(include_self=True).groups_of(peer(SELF), SELF) == ()


def test_ready_only() -> None:
    draining = peer("a", state=PeerState.DRAINING)
    assert PeerFilter().groups_of(draining, SELF) == ()
    assert PeerFilter(ready_only=True).groups_of(draining, SELF) is None
    assert PeerFilter(ready_only=True).groups_of(peer("a"), SELF) == ()


def test_selector() -> None:
    f = PeerFilter(selector=parse_selector("role in (prefill,decode),!canary"))
    assert f.groups_of(peer("a", {"role": "decode"}), SELF) == ()
    assert f.groups_of(peer("a", {"role": "router"}), SELF) is None
    assert f.groups_of(peer("a", {"role": "decode", "canary": ""}), SELF) is None
    assert f.groups_of(peer("a"), SELF) is None


def test_groups() -> None:
    assert GROUPS.groups_of(peer("a", {"role": "prefill"}), SELF) == ("prefill", "any-role")
    assert GROUPS.groups_of(peer("a", {"role": "decode"}), SELF) == ("any-role",)
    assert GROUPS.groups_of(peer("a"), SELF) is None  # in no group: excluded


def test_selector_and_groups_combine() -> None:
    f = PeerFilter(selector=parse_selector("zone=a"), groups=GROUPS.groups)
    assert f.groups_of(peer("a", {"role": "prefill", "zone": "a"}), SELF) == ("prefill", "any-role")
    assert f.groups_of(peer("a", {"role": "prefill", "zone": "b"}), SELF) is None


# -- classify -----------------------------------------------------------------------------------------


def test_classify() -> None:
    a1 = GroupedPeer(peer("a", data={"v": 1}), ())
    a2 = GroupedPeer(peer("a", data={"v": 2}), ())
    assert classify(None, None) is None
    assert classify(None, a1) == ClientEvent(EventType.ADDED, a1)
    assert classify(a1, None) == ClientEvent(EventType.REMOVED, a1)
    assert classify(a1, a2) == ClientEvent(EventType.UPDATED, a2)
    assert classify(a1, GroupedPeer(peer("a", data={"v": 1}), ())) is None
    # a change of groups alone is an update
    assert classify(a1, GroupedPeer(a1.peer, ("g",))) == ClientEvent(EventType.UPDATED, GroupedPeer(a1.peer, ("g",)))


def test_view_of() -> None:
    assert grouped_peer(None, PeerFilter(), SELF) is None
    assert grouped_peer(peer(SELF), PeerFilter(), SELF) is None
    assert grouped_peer(peer("a", {"role": "x"}), GROUPS, SELF) == GroupedPeer(peer("a", {"role": "x"}), ("any-role",))


# -- project ------------------------------------------------------------------------------------------


def entries(*changes: PeerChange | StatusChange) -> list[LogEntry]:
    return [LogEntry(i + 1, c) for i, c in enumerate(changes)]


def test_add_update_remove() -> None:
    a1, a2 = peer("a", data={"v": 1}), peer("a", data={"v": 2})
    log = entries(PeerChange("a", None, a1))
    assert project(log, PeerFilter(), SELF) == [DeltaMessage(1, (ClientEvent(EventType.ADDED, GroupedPeer(a1, ())),))]
    log = entries(PeerChange("a", a1, a2))
    assert project(log, PeerFilter(), SELF) == [DeltaMessage(1, (ClientEvent(EventType.UPDATED, GroupedPeer(a2, ())),))]
    log = entries(PeerChange("a", a2, None))
    assert project(log, PeerFilter(), SELF) == [DeltaMessage(1, (ClientEvent(EventType.REMOVED, GroupedPeer(a2, ())),))]


def test_coalescing_first_before_last_after() -> None:
    a1, a2, a3 = (peer("a", data={"v": i}) for i in (1, 2, 3))
    log = entries(PeerChange("a", None, a1), PeerChange("a", a1, a2), PeerChange("a", a2, a3))
    assert project(log, PeerFilter(), SELF) == [DeltaMessage(3, (ClientEvent(EventType.ADDED, GroupedPeer(a3, ())),))]
    log = entries(PeerChange("a", a1, a2), PeerChange("a", a2, None))
    assert project(log, PeerFilter(), SELF) == [DeltaMessage(2, (ClientEvent(EventType.REMOVED, GroupedPeer(a1, ())),))]


def test_flap_back_to_same_value_yields_nothing() -> None:
    a, b = peer("a", data={"v": 1}), peer("a", data={"v": 2})
    log = entries(PeerChange("a", a, b), PeerChange("a", b, a))
    assert project(log, PeerFilter(), SELF) == []
    log = entries(PeerChange("a", None, a), PeerChange("a", a, None))
    assert project(log, PeerFilter(), SELF) == []


def test_events_ordered_by_each_peers_latest_change() -> None:
    a1, a2 = peer("a", data={"v": 1}), peer("a", data={"v": 2})
    b1 = peer("b")
    log = entries(PeerChange("a", None, a1), PeerChange("b", None, b1), PeerChange("a", a1, a2))
    (message,) = project(log, PeerFilter(), SELF)
    assert isinstance(message, DeltaMessage) and message.revision == 3
    assert [e.peer.peer.uid for e in message.events] == ["b", "a"]
    assert [e.type for e in message.events] == [EventType.ADDED, EventType.ADDED]


def test_status_entries_split_runs_and_keep_order() -> None:
    a, b = peer("a"), peer("b")
    degraded = StatusChange(ApiStatus.DEGRADED, "lost")
    connected = StatusChange(ApiStatus.CONNECTED, "")
    log = entries(
        PeerChange("a", None, a),
        degraded,
        PeerChange("b", None, b),
        PeerChange("a", a, None),
        connected,
    )
    messages = project(log, PeerFilter(), SELF)
    assert messages == [
        DeltaMessage(1, (ClientEvent(EventType.ADDED, GroupedPeer(a, ())),)),
        StatusMessage(2, degraded),
        DeltaMessage(
            4, (ClientEvent(EventType.ADDED, GroupedPeer(b, ())), ClientEvent(EventType.REMOVED, GroupedPeer(a, ())))
        ),
        StatusMessage(5, connected),
    ]


def test_status_only() -> None:
    status = StatusChange(ApiStatus.DEGRADED, "x")
    assert project(entries(status), PeerFilter(), SELF) == [StatusMessage(1, status)]
    assert project([], PeerFilter(), SELF) == []


def test_filtered_out_changes_produce_no_message() -> None:
    f = PeerFilter(selector=parse_selector("role=decode"))
    x = peer("x", {"role": "router"})
    status = StatusChange(ApiStatus.DEGRADED, "x")
    assert project(entries(PeerChange("x", None, x)), f, SELF) == []
    assert project(entries(PeerChange("x", None, x), status, PeerChange("x", x, None)), f, SELF) == [
        StatusMessage(2, status)
    ]
    # changes to self are filtered by default
    me = peer(SELF)
    assert project(entries(PeerChange(SELF, None, me)), PeerFilter(), SELF) == []
    assert len(project(entries(PeerChange(SELF, None, me)), PeerFilter(include_self=True), SELF)) == 1


def test_label_change_moves_a_peer_out_of_and_into_a_filter() -> None:
    f = PeerFilter(selector=parse_selector("role=decode"))
    decode, router = peer("a", {"role": "decode"}), peer("a", {"role": "router"})
    assert project(entries(PeerChange("a", decode, router)), f, SELF) == [
        DeltaMessage(1, (ClientEvent(EventType.REMOVED, GroupedPeer(decode, ())),))
    ]
    assert project(entries(PeerChange("a", router, decode)), f, SELF) == [
        DeltaMessage(1, (ClientEvent(EventType.ADDED, GroupedPeer(decode, ())),))
    ]
    # a change invisible to the filter: none
    router2 = peer("a", {"role": "router"}, data={"v": 9})
    assert project(entries(PeerChange("a", router, router2)), f, SELF) == []


def test_draining_leaves_a_ready_only_client() -> None:
    ready, draining = peer("a"), peer("a", state=PeerState.DRAINING)
    log = entries(PeerChange("a", ready, draining))
    assert project(log, PeerFilter(ready_only=True), SELF) == [
        DeltaMessage(1, (ClientEvent(EventType.REMOVED, GroupedPeer(ready, ())),))
    ]
    assert project(log, PeerFilter(), SELF) == [
        DeltaMessage(1, (ClientEvent(EventType.UPDATED, GroupedPeer(draining, ())),))
    ]


def test_message_revision_is_last_entry_of_the_run_even_if_filtered() -> None:
    f = PeerFilter(selector=parse_selector("role=decode"))
    a = peer("a", {"role": "decode"})
    x = peer("x", {"role": "router"})
    log = entries(PeerChange("a", None, a), PeerChange("x", None, x))
    assert project(log, f, SELF) == [DeltaMessage(2, (ClientEvent(EventType.ADDED, GroupedPeer(a, ())),))]


def test_snapshot_views_order_and_filter() -> None:
    peers = [
        peer("3", name="b", namespace="ns1"),
        peer("2", name="a", namespace="ns2"),
        peer("1", name="a", namespace="ns1"),
        peer("0", name="a", namespace="ns1"),
        peer(SELF, name="0", namespace="ns0"),
    ]
    views = snapshot_peers(peers, PeerFilter(), SELF)
    assert [(v.peer.namespace, v.peer.name, v.peer.uid) for v in views] == [
        ("ns1", "a", "0"),
        ("ns1", "a", "1"),
        ("ns1", "b", "3"),
        ("ns2", "a", "2"),
    ]
    assert all(v.groups == () for v in views)
    assert snapshot_peers(peers, PeerFilter(selector=parse_selector("nope")), SELF) == []


# -- property: projecting a consistent log through any filter ---------------------------------------------

UIDS = ("a", "b", "c", SELF)
peer_values = st.builds(
    peer,
    uid=st.just("?"),
    labels=st.fixed_dictionaries({}, optional={"role": st.sampled_from(["prefill", "decode"]), "zone": st.just("z")}),
    state=st.sampled_from(PeerState),
    data=st.sampled_from([{}, {"v": 1}]),
)
filters = st.builds(
    PeerFilter,
    selector=st.sampled_from([parse_selector(s) for s in ("", "zone=z", "role!=decode", "!zone")]),
    groups=st.sampled_from([(), GROUPS.groups]),
    include_self=st.booleans(),
    ready_only=st.booleans(),
)


@st.composite
def consistent_logs(draw: st.DrawFn) -> tuple[list[LogEntry], dict[str, Peer]]:
    current: dict[str, Peer] = {}
    log: list[LogEntry] = []
    for revision in range(1, draw(st.integers(0, 25)) + 1):
        if draw(st.integers(0, 9)) == 0:
            log.append(LogEntry(revision, StatusChange(draw(st.sampled_from(ApiStatus)), "")))
            continue
        uid = draw(st.sampled_from(UIDS))
        before = current.get(uid)
        if before is not None and draw(st.booleans()):
            after = None
        else:
            template = draw(peer_values)
            after = peer(uid, dict(template.labels), template.state, dict(template.data))
        if after is None:
            del current[uid]
        else:
            current[uid] = after
        log.append(LogEntry(revision, PeerChange(uid, before, after)))
    return log, current


@settings(max_examples=300, deadline=None)
@given(consistent_logs(), filters, st.lists(st.integers(0, 25), max_size=5))
def test_projection_reaches_the_snapshot_whatever_the_chunking(
    log_and_final: tuple[list[LogEntry], dict[str, Peer]], peer_filter: PeerFilter, cuts: list[int]
) -> None:
    log, final = log_and_final
    expected = {v.peer.uid: v for v in snapshot_peers(final.values(), peer_filter, SELF)}

    view: dict[str, GroupedPeer] = {}
    messages = project(log, peer_filter, SELF)
    apply_messages(view, messages)
    assert view == expected
    revisions = [m.revision for m in messages]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    statuses = [e.change for e in log if isinstance(e.change, StatusChange)]
    assert [m.change for m in messages if isinstance(m, StatusMessage)] == statuses

    view = {}
    bounds = sorted({0, len(log), *(c for c in cuts if c <= len(log))})
    for start, end in zip(bounds, bounds[1:], strict=False):
        apply_messages(view, project(log[start:end], peer_filter, SELF))
    assert view == expected
