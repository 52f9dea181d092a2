"""bench.truth: the truth watcher's joined peer set, and when it last changed."""

from __future__ import annotations

import random

from bench.truth import TruthPeerSet, join_peers


def test_join_needs_a_live_endpoint_and_a_cr_and_ready_in_any_slice_wins() -> None:
    slices = [{"a": "DRAINING", "b": "READY"}, {"a": "READY", "c": "DRAINING"}, {"d": "READY"}]
    assert join_peers(slices, {"a", "c", "x"}) == {"a": "READY", "c": "DRAINING"}
    assert join_peers([], {"a"}) == {}


class TestTruthPeerSet:
    """The joined set kept per event; a change is a change of the joined set, timed by its event."""

    def test_a_peer_appears_with_both_its_endpoint_and_its_cr(self) -> None:
        truth = TruthPeerSet()
        assert not truth.set_slice("s1", {"a": "READY"}, at=1.0), "no CR yet: no peer"
        assert truth.last_change is None
        assert truth.set_cr("a", present=True, at=2.0)
        assert truth.peers == {"a": "READY"} and truth.last_change == 2.0 and truth.changes == 1

    def test_what_leaves_the_joined_set_unchanged_is_no_change(self) -> None:
        truth = TruthPeerSet()
        truth.set_cr("a", present=True, at=1.0)
        truth.set_slice("s1", {"a": "READY"}, at=2.0)
        assert not truth.set_slice("s1", {"a": "READY"}, at=3.0), "the slice rewritten with the same endpoints"
        assert not truth.set_slice("s2", {"a": "DRAINING"}, at=4.0), "READY in s1 still wins"
        assert truth.set_slice("s1", None, at=5.0)
        assert truth.peers == {"a": "DRAINING"} and truth.last_change == 5.0, "s1 gone: DRAINING from s2"
        assert not truth.set_slice("s3", {"b": "READY"}, at=6.0), "b has no CR"
        assert not truth.set_cr("z", present=False, at=7.0), "a CR it never had"
        assert not truth.set_cr("a", present=True, at=8.0), "a CR it has (MODIFIED)"
        assert truth.last_change == 5.0 and truth.changes == 2

    def test_a_pod_moving_between_slices_changes_nothing(self) -> None:
        truth = TruthPeerSet()
        truth.set_cr("a", present=True, at=1.0)
        truth.set_slice("s1", {"a": "READY"}, at=2.0)
        assert not truth.set_slice("s2", {"a": "READY"}, at=3.0)
        assert not truth.set_slice("s1", {}, at=4.0)
        assert truth.peers == {"a": "READY"} and truth.last_change == 2.0

    def test_a_deleted_slice_or_cr_removes_the_peer(self) -> None:
        truth = TruthPeerSet()
        truth.set_cr("a", present=True, at=1.0)
        truth.set_cr("b", present=True, at=1.0)
        truth.set_slice("s1", {"a": "READY", "b": "READY"}, at=2.0)
        assert truth.set_cr("a", present=False, at=3.0)
        assert truth.peers == {"b": "READY"}
        assert truth.set_slice("s1", None, at=4.0)
        assert truth.peers == {} and truth.last_change == 4.0

    def test_mark_starts_a_new_history_and_keeps_the_set(self) -> None:
        truth = TruthPeerSet()
        truth.set_cr("a", present=True, at=1.0)
        truth.set_slice("s1", {"a": "READY"}, at=2.0)
        truth.mark()
        assert truth.last_change is None and truth.changes == 0 and truth.peers == {"a": "READY"}
        truth.set_slice("s1", {"a": "DRAINING"}, at=9.0)
        assert truth.last_change == 9.0 and truth.changes == 1

    def test_it_agrees_with_a_join_from_scratch_after_every_event(self) -> None:
        """Random slice and CR events (pods in several slices at once, in both states, slices and CRs coming
        and going): the kept set is always the join of the current state, and the last change is the time of
        the last event after which that join differed from before it."""
        rng = random.Random(23)
        pods = [f"p{i}" for i in range(12)]
        for _ in range(50):
            truth = TruthPeerSet()
            slices: dict[str, dict[str, str]] = {}
            crs: set[str] = set()
            expected: float | None = None
            for step in range(200):
                at = float(step)
                before = join_peers(slices.values(), crs)
                if rng.random() < 0.6:
                    name = rng.choice(("s1", "s2", "s3"))
                    if rng.random() < 0.15:
                        slices.pop(name, None)
                        truth.set_slice(name, None, at)
                    else:
                        chosen = rng.sample(pods, rng.randint(0, 6))
                        endpoints = {pod: rng.choice(("READY", "DRAINING")) for pod in chosen}
                        slices[name] = endpoints
                        truth.set_slice(name, dict(endpoints), at)
                else:
                    pod, present = rng.choice(pods), rng.random() < 0.6
                    if present:
                        crs.add(pod)
                    else:
                        crs.discard(pod)
                    truth.set_cr(pod, present, at)
                after = join_peers(slices.values(), crs)
                if after != before:
                    expected = at
                assert truth.peers == after
                assert truth.last_change == expected
