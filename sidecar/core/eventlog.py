"""The revisioned event log: every change to the peer set, in order, with bounded history.

Each entry gets the next revision. The log keeps the last ``capacity`` entries; a reader that asks
for the changes after a revision the log no longer holds is told so (``None``) and must start over
from a snapshot. That is what makes resume-by-revision possible for clients of ``WatchPeers`` and
what bounds the sidecar's memory whatever its clients do: the log is shared, and a subscriber holds
nothing but its position in it.

Each entry also carries when the event that produced it was received (``received``, a monotonic time
passed in by the shell, so the core stays clock-free): the stream layer turns it into the
propagation-lag metric without a second, unlocked table beside the log.

``history_id`` names one history. Revisions from another sidecar process (another history) mean
nothing here, so a resume request carries both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sidecar.core.peer import Peer


class ApiStatus(enum.Enum):
    """Whether the sidecar can reach the source of truth (the API server, or etcd)."""

    CONNECTED = "connected"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class PeerChange:
    """Peer ``uid`` went from ``before`` to ``after`` (None: absent)."""

    uid: str
    before: Peer | None
    after: Peer | None


@dataclass(frozen=True)
class StatusChange:
    """The API status became ``status`` (why: ``reason``); it was ``previous`` (None: the initial status)."""

    status: ApiStatus
    reason: str
    previous: ApiStatus | None = None


@dataclass(frozen=True)
class LogEntry:
    """One change at one revision; ``received`` is when its cause reached the sidecar (monotonic, or None)."""

    revision: int
    change: PeerChange | StatusChange
    received: float | None = None


ENTRY_BYTES = 512
"""What an entry costs besides its peer's data (the entry, the Peer, its tuples), for the byte bound."""


def entry_cost(change: PeerChange | StatusChange) -> int:
    """Bytes an entry keeps alive, estimated: its own overhead plus the data of the peer it leads to."""
    after = change.after if isinstance(change, PeerChange) else None
    return ENTRY_BYTES + (after.document.size if after is not None else 0)


class EventLog:
    """Owns the ring of the last entries and the head revision; the directory appends.

    History is bounded twice: at most ``capacity`` entries, and at most ``max_bytes`` of estimated
    memory (``entry_cost``), whichever binds first; the oldest entries go first, and the newest is
    always kept. Counting alone would let a few peers with large metadata fill the memory limit.
    """

    def __init__(self, history_id: str, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("event log capacity must be at least 1")
        self.history_id = history_id
        self.capacity = capacity
        self.max_bytes = max_bytes
        # A ring buffer: the entry of revision r sits at (r - 1) % capacity, so a reader near the head
        # (the common case) is served in O(entries read), not O(history).
        self._ring: list[LogEntry | None] = [None] * capacity
        self._costs: list[int] = [0] * capacity
        self._bytes = 0
        self._size = 0
        self._head = 0

    @property
    def bytes(self) -> int:
        """The estimated memory the held entries keep alive."""
        return self._bytes

    @property
    def head_revision(self) -> int:
        """The revision of the newest entry (0 before any)."""
        return self._head

    @property
    def oldest_resumable_revision(self) -> int:
        """The smallest revision R for which ``entries_after(R)`` still returns the full history."""
        return self._head - self._size

    def append(self, change: PeerChange | StatusChange, received: float | None = None) -> LogEntry:
        if self._size == self.capacity:
            self._evict_oldest()
        self._head += 1
        entry = LogEntry(self._head, change, received)
        slot = (self._head - 1) % self.capacity
        self._ring[slot] = entry
        self._costs[slot] = cost = entry_cost(change)
        self._bytes += cost
        self._size += 1
        if self.max_bytes is not None:
            while self._bytes > self.max_bytes and self._size > 1:
                self._evict_oldest()
        return entry

    def _evict_oldest(self) -> None:
        slot = (self._head - self._size) % self.capacity
        self._ring[slot] = None
        self._bytes -= self._costs[slot]
        self._costs[slot] = 0
        self._size -= 1

    def covers(self, revision: int) -> bool:
        """True when every entry after ``revision`` is still held (and ``revision`` is not in the future)."""
        return self.oldest_resumable_revision <= revision <= self._head

    def entries_after(self, revision: int, limit: int | None = None) -> list[LogEntry] | None:
        """The entries with a revision above ``revision`` (at most ``limit``), or None if evicted."""
        if not self.covers(revision):
            return None
        last = self._head if limit is None else min(self._head, revision + limit)
        ring, capacity = self._ring, self.capacity
        return [ring[(r - 1) % capacity] for r in range(revision + 1, last + 1)]  # type: ignore[misc]

    def __len__(self) -> int:
        return self._size
