"""bench.peer_subscribers's lean peer set: the same set as the client library's PeerSetView, kept smaller.

The relay arm's simulator keeps, per subscriber, only pod UID -> (name, state) (``LeanPeerSet``). These
tests apply hand-built ``WatchPeersResponse`` sequences (snapshots, deltas, parts of a change, a resume
that drops an incomplete change, a failover snapshot that changes nothing) to both and compare what the
benchmark reads: the name -> state map, the resume position, and whether each change changed the set.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.peer_subscribers import Interned, LeanPeerSet, merge_converge, merge_stats
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.client import PeerSetView

READY, DRAINING = pb.PEER_STATE_READY, pb.PEER_STATE_DRAINING
ADDED, UPDATED, REMOVED = pb.EVENT_TYPE_ADDED, pb.EVENT_TYPE_UPDATED, pb.EVENT_TYPE_REMOVED


def peer(name: str, state: int = READY, uid: str = "") -> pb.Peer:
    """A peer with the fields a sidecar fills, so that the lean set has to ignore them."""
    return pb.Peer(
        name=name,
        uid=uid or f"uid-{name}",
        state=state,
        namespace="bench",
        addresses=["10.0.0.1"],
        labels={"app": "worker"},
        data_json='{"endpoints": {}}',
    )


def snapshot(revision: int, *peers: pb.Peer, partial: bool = False, history: str = "h1") -> pb.WatchPeersResponse:
    return pb.WatchPeersResponse(
        revision=revision, history_id=history, partial=partial, snapshot=pb.Snapshot(peers=list(peers))
    )


def delta(
    revision: int, *events: tuple[int, pb.Peer], partial: bool = False, history: str = "h1"
) -> pb.WatchPeersResponse:
    return pb.WatchPeersResponse(
        revision=revision,
        history_id=history,
        partial=partial,
        delta=pb.Delta(events=[pb.PeerEvent(type=t, peer=p) for t, p in events]),
    )


def resumed(revision: int, history: str = "h1") -> pb.WatchPeersResponse:
    return pb.WatchPeersResponse(revision=revision, history_id=history, resumed=pb.Resumed())


RESUME = object()
"""In a sequence: the stream failed and the subscriber asks to resume (an incomplete change is dropped)."""


def names(view: PeerSetView) -> dict[str, str]:
    """What bench.peer_subscribers read of a PeerSetView before the lean set."""
    states = {READY: "READY", DRAINING: "DRAINING"}
    return {p.name: states.get(p.state, "UNKNOWN") for p in view.peers.values()}


def replay(sequence: Sequence[object]) -> list[tuple[object, ...]]:
    """Apply ``sequence`` to both; after each step, both sides' (names, revision, history id, changed)."""
    view, lean = PeerSetView(), LeanPeerSet(Interned())
    steps: list[tuple[object, ...]] = []
    for item in sequence:
        if item is RESUME:
            request, lean_request = view.resume_request(pb.PeerFilter()), lean.resume_request(pb.PeerFilter())
            assert request == lean_request
            continue
        assert isinstance(item, pb.WatchPeersResponse)
        before = names(view)
        update = view.apply(item)
        if update is None:
            expected: bool | None = None
        elif update.reset:
            expected = before != names(view)
        else:
            expected = bool(update.added or update.updated or update.removed)
        got = lean.apply(item)
        assert got == expected, item
        assert lean.names() == names(view)
        assert (lean.revision, lean.history_id) == (view.revision, view.history_id)
        steps.append((lean.names(), lean.revision, got))
    return steps


class TestLeanPeerSetMatchesPeerSetView:
    def test_snapshot_then_deltas(self) -> None:
        steps = replay(
            [
                snapshot(1, peer("a"), peer("b")),
                delta(2, (ADDED, peer("c"))),
                delta(3, (UPDATED, peer("a", DRAINING))),
                delta(4, (REMOVED, peer("b")), (ADDED, peer("d", DRAINING))),
                delta(5),  # an empty delta: no change
            ]
        )
        assert steps[-2][0] == {"a": "DRAINING", "c": "READY", "d": "DRAINING"}
        assert [s[2] for s in steps] == [True, True, True, True, False]

    def test_parts_of_a_change_apply_together(self) -> None:
        steps = replay(
            [
                snapshot(1, peer("a"), partial=True),
                snapshot(1, peer("b")),
                delta(2, (ADDED, peer("c")), partial=True),
                delta(2, (REMOVED, peer("a"))),
            ]
        )
        assert steps[0] == ({}, 0, None)  # nothing applied, the resume position unmoved
        assert steps[1] == ({"a": "READY", "b": "READY"}, 1, True)
        assert steps[3] == ({"b": "READY", "c": "READY"}, 2, True)

    def test_resume_drops_an_incomplete_change(self) -> None:
        steps = replay(
            [
                snapshot(1, peer("a")),
                delta(2, (ADDED, peer("b")), partial=True),
                RESUME,
                resumed(1),
                delta(2, (ADDED, peer("c"))),
            ]
        )
        assert steps[-1][0] == {"a": "READY", "c": "READY"}  # b's part was dropped with the broken stream

    def test_failover_snapshot_that_changes_nothing(self) -> None:
        steps = replay(
            [
                snapshot(4, peer("a"), peer("b")),
                RESUME,
                snapshot(9, peer("b"), peer("a"), history="h2"),  # another replica: same set, other order
                snapshot(10, peer("a"), peer("b", DRAINING), history="h2"),
            ]
        )
        assert [s[2] for s in steps] == [True, False, True]
        assert steps[1][1] == 9

    def test_a_name_under_two_uids_and_a_removal_of_the_unknown(self) -> None:
        replay(
            [
                snapshot(1, peer("a", uid="u1"), peer("a", DRAINING, uid="u2"), peer("b")),
                delta(2, (REMOVED, peer("a", uid="u2")), (REMOVED, peer("zz"))),
                delta(3, (ADDED, peer("a", uid="u3")), (UPDATED, peer("a", DRAINING, uid="u1"))),
                delta(4, (UPDATED, peer("b", pb.PEER_STATE_UNSPECIFIED))),
            ]
        )

    def test_a_snapshot_after_the_parts_of_a_delta_ignores_them(self) -> None:
        replay([snapshot(1, peer("a")), delta(2, (ADDED, peer("b")), partial=True), snapshot(3, peer("c"))])


def test_subscribers_share_strings_and_pairs() -> None:
    interned = Interned()
    first, second = LeanPeerSet(interned), LeanPeerSet(interned)
    message = snapshot(1, peer("a"), peer("b"))
    first.apply(message)
    second.apply(pb.WatchPeersResponse.FromString(message.SerializeToString()))  # decoded apart, as each stream's
    for uid, entry in first.peers.items():
        other_uid = next(u for u in second.peers if u == uid)
        assert other_uid is uid and second.peers[uid] is entry


class TestWorkersReplies:
    """``--processes N``: the workers' replies read as one process's."""

    def test_stats_are_summed(self) -> None:
        first = {
            "bytes": {"watchpeers": 10},
            "events": {"snapshot": 2},
            "requests": {"WatchPeers fresh": 2},
            "errors": {},
            "error_reasons": {"UNAVAILABLE: x": 1},
            "watchers": 2,
            "t": 1.0,
        }
        second = {
            "bytes": {"watchpeers": 5},
            "events": {"snapshot": 1, "delta": 4},
            "requests": {},
            "errors": {"UNAVAILABLE": 1},
            "error_reasons": {"UNAVAILABLE: x": 2},
            "watchers": 1,
            "t": 2.0,
        }
        merged = merge_stats([first, second])
        assert merged["bytes"] == {"watchpeers": 15}
        assert merged["events"] == {"snapshot": 3, "delta": 4}
        assert merged["requests"] == {"WatchPeers fresh": 2}
        assert merged["errors"] == {"UNAVAILABLE": 1}
        assert merged["error_reasons"] == {"UNAVAILABLE: x": 3}
        assert merged["watchers"] == 3

    def test_converge_needs_every_worker(self) -> None:
        done = {
            "converged": True,
            "behind": [],
            "behind_count": 0,
            "lost": 0,
            "phantom": 0,
            "last_peer_change": {"a": 1.0},
            "failover_s": [0.5],
        }
        late = {
            "converged": False,
            "behind": ["b"],
            "behind_count": 1,
            "lost": 2,
            "phantom": 1,
            "last_peer_change": {"b": 2.0},
            "failover_s": [],
        }
        assert merge_converge([done, late]) == {
            "converged": False,
            "behind": ["b"],
            "behind_count": 1,
            "lost": 2,
            "phantom": 1,
            "last_peer_change": {"a": 1.0, "b": 2.0},
            "failover_s": [0.5],
        }
        assert merge_converge([done, done])["converged"]
