"""Tests for sidecar.core.eventlog: the revisioned ring buffer of changes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.eventlog import ApiStatus, EventLog, PeerChange, StatusChange


def change(i: int) -> PeerChange:
    return PeerChange(f"u{i}", None, None)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventLog("h", 0)
    with pytest.raises(ValueError):
        EventLog("h", -3)


def test_empty_log() -> None:
    log = EventLog("hist", 4)
    assert log.history_id == "hist"
    assert log.head_revision == 0
    assert log.oldest_resumable_revision == 0
    assert len(log) == 0
    assert log.covers(0)
    assert not log.covers(1)
    assert not log.covers(-1)
    assert log.entries_after(0) == []
    assert log.entries_after(1) is None


def test_revisions_increase_by_one() -> None:
    log = EventLog("h", 10)
    entries = [log.append(change(i)) for i in range(5)]
    assert [e.revision for e in entries] == [1, 2, 3, 4, 5]
    assert [e.change for e in entries] == [change(i) for i in range(5)]
    assert log.head_revision == 5
    assert log.entries_after(0) == entries
    assert log.entries_after(3) == entries[3:]
    assert log.entries_after(5) == []
    assert log.entries_after(6) is None  # the future


def test_status_changes_are_entries_too() -> None:
    log = EventLog("h", 3)
    entry = log.append(StatusChange(ApiStatus.DEGRADED, "watch failed"))
    assert entry.revision == 1
    assert log.entries_after(0) == [entry]


def test_eviction() -> None:
    log = EventLog("h", 3)
    entries = [log.append(change(i)) for i in range(7)]  # revisions 1..7, holds 5..7
    assert len(log) == 3
    assert log.oldest_resumable_revision == 4
    assert log.entries_after(3) is None
    assert not log.covers(3)
    assert log.covers(4)
    assert log.entries_after(4) == entries[4:]
    assert log.entries_after(6) == entries[6:]
    assert log.entries_after(7) == []
    assert log.entries_after(0) is None


def test_limit() -> None:
    log = EventLog("h", 10)
    entries = [log.append(change(i)) for i in range(6)]
    assert log.entries_after(0, limit=2) == entries[:2]
    assert log.entries_after(2, limit=3) == entries[2:5]
    assert log.entries_after(4, limit=100) == entries[4:]
    assert log.entries_after(1, limit=0) == []
    assert log.entries_after(7, limit=2) is None


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 8),
    appends=st.integers(0, 30),
    revision=st.integers(-2, 35),
    limit=st.none() | st.integers(0, 10),
)
def test_against_a_list_model(capacity: int, appends: int, revision: int, limit: int | None) -> None:
    log = EventLog("h", capacity)
    all_entries = [log.append(change(i)) for i in range(appends)]
    assert log.head_revision == appends
    assert len(log) == min(appends, capacity)
    held = all_entries[-capacity:] if appends else []
    oldest = appends - len(held)
    assert log.oldest_resumable_revision == oldest
    expected_covered = oldest <= revision <= appends
    assert log.covers(revision) == expected_covered
    got = log.entries_after(revision, limit)
    if not expected_covered:
        assert got is None
    else:
        expected = [e for e in all_entries if e.revision > revision]
        if limit is not None:
            expected = expected[:limit]
        assert got == expected
        assert all(e.revision == revision + 1 + i for i, e in enumerate(got or []))
