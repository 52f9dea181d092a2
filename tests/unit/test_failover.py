"""sidecar.core.failover: the replica a follower dials next, and when it backs off first."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.core.failover import ReplicaRotation


def rotation(seed: int = 7, first: int | None = None) -> ReplicaRotation:
    return ReplicaRotation(first=first, rng=random.Random(seed))


def test_the_first_dial_is_the_one_given() -> None:
    assert rotation(first=4).pick(3) == 1


def test_without_a_first_the_followers_spread_over_the_replicas() -> None:
    firsts = Counter(rotation(seed).pick(3) for seed in range(3000))
    assert set(firsts) == {0, 1, 2}
    assert min(firsts.values()) > 900  # ~1,000 each


def test_no_replica_is_an_error_not_a_division_by_zero() -> None:
    with pytest.raises(ValueError, match="no replica"):
        rotation().pick(0)


def test_every_replica_is_tried_once_before_the_follower_backs_off() -> None:
    follower = rotation(first=0)
    tried, backoffs = [], []
    for _ in range(3):
        tried.append(follower.pick(3))
        backoffs.append(follower.ended(3, delivered=False))
    assert sorted(tried) == [0, 1, 2]
    assert backoffs == [False, False, True]
    # After the backoff, a new round: again each replica once.
    again = []
    for _ in range(3):
        again.append(follower.pick(3))
        follower.ended(3, delivered=False)
    assert sorted(again) == [0, 1, 2]


def test_a_single_replica_backs_off_after_each_failure() -> None:
    follower = rotation()
    for _ in range(3):
        assert follower.pick(1) == 0
        assert follower.ended(1, delivered=False) is True


def test_the_list_may_change_between_picks() -> None:
    follower = rotation(first=2)
    assert follower.pick(3) == 2
    follower.ended(3, delivered=False)
    assert follower.pick(1) == 0  # two replicas went away: the one left
    follower.ended(1, delivered=False)
    assert follower.pick(5) in range(5)


def test_a_stream_that_served_the_follower_starts_a_new_run_and_moves_elsewhere() -> None:
    follower = rotation(first=0)
    assert follower.pick(3) == 0
    assert follower.ended(3, delivered=True) is False  # replica 0 served, then died: a first failure
    second = follower.pick(3)
    assert second != 0
    assert follower.ended(3, delivered=False) is False
    third = follower.pick(3)
    assert {second, third} == {1, 2}
    assert follower.ended(3, delivered=False) is True  # all three failed in a row


def test_the_followers_of_a_dead_replica_spread_over_the_others() -> None:
    moved = Counter()
    for seed in range(3000):
        follower = rotation(seed, first=0)
        follower.pick(4)
        follower.ended(4, delivered=True)
        moved[follower.pick(4)] += 1
    assert set(moved) == {1, 2, 3}
    assert min(moved.values()) > 900  # ~1,000 each, not all 3,000 on the next one in the list


def test_a_refusal_always_backs_off_as_every_replica_would_refuse() -> None:
    follower = rotation()
    follower.pick(3)
    assert follower.ended(3, delivered=False, refused=True) is True
    follower.pick(3)
    assert follower.ended(3, delivered=False) is False  # and the run starts over
