"""Tests for sidecar.core.eventlog: the revisioned ring buffer of changes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.eventlog import ENTRY_BYTES, ApiStatus, EventLog, PeerChange, StatusChange
from sidecar.core.peer import Document, Peer, PeerState


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


class TestByteBound:
    """History is bounded in bytes as well as in count, so large metadata cannot fill the memory limit."""

    @staticmethod
    def change(uid: str, size: int) -> PeerChange:
        peer = Peer(
            uid=uid,
            name=uid,
            namespace="ns",
            instance_id=1,
            addresses=(),
            ports=(),
            labels={},
            state=PeerState.READY,
            document=Document({"x": "y"}, size),
        )
        return PeerChange(uid, None, peer)

    def test_oldest_entries_go_when_the_bytes_are_exceeded(self) -> None:
        """With room for about three 16 KB changes, the fourth evicts the first: resume from it is refused."""
        log = EventLog("h", capacity=100, max_bytes=3 * (16_000 + ENTRY_BYTES))
        for n in range(4):
            log.append(self.change(f"p{n}", 16_000))
        assert len(log) == 3
        assert log.bytes == 3 * (16_000 + ENTRY_BYTES)
        assert log.entries_after(0) is None
        assert [e.revision for e in log.entries_after(1) or []] == [2, 3, 4]

    def test_the_newest_entry_is_always_kept(self) -> None:
        """One change larger than the whole bound still stays, alone, so a client can follow it."""
        log = EventLog("h", capacity=100, max_bytes=1024)
        log.append(self.change("a", 10))
        log.append(self.change("b", 10_000))
        assert len(log) == 1 and log.head_revision == 2
        assert log.covers(1) and not log.covers(0)

    def test_count_eviction_releases_bytes(self) -> None:
        """When the ring wraps, the overwritten entry's bytes are released too."""
        log = EventLog("h", capacity=2, max_bytes=None)
        for n in range(5):
            log.append(self.change(f"p{n}", 1000))
        assert len(log) == 2
        assert log.bytes == 2 * (1000 + ENTRY_BYTES)
        log.append(StatusChange(ApiStatus.DEGRADED, "x"))
        assert log.bytes == (1000 + ENTRY_BYTES) + ENTRY_BYTES
