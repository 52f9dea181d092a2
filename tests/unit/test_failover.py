"""sidecar.core.failover: the replica a follower dials next, and when it backs off first."""

from __future__ import annotations

import pytest

from sidecar.core.failover import ReplicaRotation


def test_replicas_are_taken_in_turn_from_the_start_given() -> None:
    rotation = ReplicaRotation(next_index=4)
    assert [rotation.pick(3) for _ in range(5)] == [1, 2, 0, 1, 2]


def test_the_list_may_change_between_picks() -> None:
    rotation = ReplicaRotation()
    assert rotation.pick(3) == 0
    assert rotation.pick(1) == 0  # two replicas went away: the one left
    assert rotation.pick(5) == 2


def test_no_replica_is_an_error_not_a_division_by_zero() -> None:
    with pytest.raises(ValueError, match="no replica"):
        ReplicaRotation().pick(0)


def test_the_next_replica_is_dialled_at_once_until_every_one_failed_in_a_row() -> None:
    rotation = ReplicaRotation()
    assert [rotation.ended(3, delivered=False) for _ in range(6)] == [False, False, True, False, False, True]


def test_a_single_replica_backs_off_after_each_failure() -> None:
    rotation = ReplicaRotation()
    assert [rotation.ended(1, delivered=False) for _ in range(3)] == [True, True, True]


def test_a_stream_that_served_the_follower_starts_a_new_run_of_failures() -> None:
    rotation = ReplicaRotation()
    assert rotation.ended(3, delivered=False) is False
    assert rotation.ended(3, delivered=False) is False
    # The third replica served a snapshot before its stream ended: a first failure, not the third.
    assert rotation.ended(3, delivered=True) is False
    assert rotation.ended(3, delivered=False) is False
    assert rotation.ended(3, delivered=False) is True


def test_a_refusal_always_backs_off_as_every_replica_would_refuse() -> None:
    rotation = ReplicaRotation()
    assert rotation.ended(3, delivered=False, refused=True) is True
    # and the run starts over afterwards
    assert rotation.ended(3, delivered=False) is False
