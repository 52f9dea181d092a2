"""The lock and the one change signal around the pure peer directory.

Sources write through a ``SourceStore`` bound to their name (``store``); the gRPC streams, the HTTP
debug endpoint, the SMG writer and the daemon read through the ``PeerReader`` methods and subscribe to
the hub's one change signal (``subscribe``). The hub knows no source and no transport: what a record
means is the join's business, where it came from the source's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from sidecar.core.directory import PeerDirectory
from sidecar.core.eventlog import ApiStatus, LogEntry, StatusChange
from sidecar.core.projection import status_before
from sidecar.core.records import Record
from sidecar.peers.ports import HubChange, NotWatching, PeerSetState, Subscriber

REGISTRATION = "registration"
"""The name this pod's own registration goes by in the stream's DEGRADED reason."""


class PeerHub:
    """Owns the ``PeerDirectory`` and the one lock that guards it, plus the source-health table.

    ``_lock`` guards ``_directory``, ``_source_health``, ``_registration_problem``, ``_closed``, ``_synced``,
    ``_self_uid`` and ``_on_demand``. Every change (entries appended, the first sync, a source's or the
    registration's health, closing) is signalled once, in ``_commit`` or ``close``: ``_changed`` (a
    condition on the same lock) wakes the threads blocked in ``wait_synced`` and ``wait_entries``, then
    each subscriber is called, outside the lock, in the writer's thread.
    Readers never hold the lock while doing IO: they copy what they need (a slice of log entries, the
    peer set) and release it. ``_subscribers`` is a tuple replaced whole under the lock and read without
    it (a subscriber added during a change is called from the next one).
    """

    def __init__(self, directory: PeerDirectory, self_uid: str) -> None:
        self._directory = directory
        self._self_uid = self_uid
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._synced = directory.synced  # the directory's sync, once reached (it is never lost)
        self._subscribers: tuple[Subscriber, ...] = ()
        self._source_health: dict[str, str] = {}  # source -> why it is unhealthy
        self._registration_problem = ""  # why this pod's registration cannot be written ("" while it can)
        # What a peer request does first (``demand``): nothing (watching from start-up), start the watches
        # once (on demand), or refuse (never). Set by the daemon before it serves anything.
        self._on_demand: Callable[[], None] | None = None
        self._refusal = ""

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call ``subscriber`` with a ``HubChange`` after every change from now on (``PeerReader``)."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

    def watch_on_demand(self, start: Callable[[], None]) -> None:
        """Call ``start`` (once, in the first caller's thread) when a client first asks for peers."""
        self._on_demand = start

    def refuse_peers(self, reason: str) -> None:
        """Peers are never watched here: every peer request raises ``NotWatching(reason)``."""
        self._refusal = reason

    def demand(self) -> bool:
        if self._refusal:
            raise NotWatching(self._refusal)
        with self._lock:
            start, self._on_demand = self._on_demand, None
        if start is None:
            return False
        start()
        return True

    def store(self, source: str) -> _HubStore:
        """The writer for one source (one of the directory's sources)."""
        if source not in self._directory.sources:
            raise ValueError(f"unknown source {source!r}; this hub's directory reads {self._directory.sources}")
        return _HubStore(self, source)

    # -- writes -----------------------------------------------------------------------------------
    def _commit(self, mutate: Callable[[PeerDirectory], list[LogEntry]], changed: bool = False) -> list[LogEntry]:
        """Apply ``mutate`` under the lock; signal when it appended entries, synced the directory, or
        ``changed`` says the caller changed something else the readers see (a source's health)."""
        with self._changed:
            entries = mutate(self._directory)
            # Synced once is synced for good (the directory never forgets a source listed): checked until then.
            became_synced = not self._synced and self._directory.synced
            if became_synced:
                self._synced = True
            if not (entries or changed or became_synced):
                return entries
            self._changed.notify_all()
            change = HubChange(entries, self._synced, self._closed)  # the list is this commit's own
            subscribers = self._subscribers
        for subscriber in subscribers:
            subscriber(change)
        return entries

    def _set_source_health(self, source: str, healthy: bool, reason: str) -> None:
        with self._changed:
            before = self._source_health.get(source)
            if healthy:
                self._source_health.pop(source, None)
            else:
                self._source_health[source] = reason
            changed = self._source_health.get(source) != before
        self._update_status(changed)

    def set_registration_health(self, healthy: bool, reason: str = "") -> None:
        """This pod's registration cannot be written (an object being deleted holds it, or writes fail): the
        streams say DEGRADED with the reason, as for a source that lost its origin. Not a source: readiness
        and ``source_health`` leave it out (the publisher reports it there itself). The publisher's
        ``RegistrationHealth`` calls it (its listener), on a change only."""
        with self._changed:
            before = self._registration_problem
            self._registration_problem = "" if healthy else reason
            changed = self._registration_problem != before
        self._update_status(changed)

    def _update_status(self, changed: bool) -> None:
        """Commit the API status the sources' health and the registration's say; ``changed``: one of them
        changed (subscribers are told even when the status does not flip)."""
        with self._changed:
            unhealthy = sorted(self._source_health.items())
            if self._registration_problem:
                unhealthy.append((REGISTRATION, self._registration_problem))
        if unhealthy:
            why = "; ".join(f"{name}: {reason}" for name, reason in unhealthy)
            self._commit(lambda d: d.set_status(ApiStatus.DEGRADED, why), changed)
        else:
            self._commit(lambda d: d.set_status(ApiStatus.CONNECTED, "watches re-established"), changed)

    def close(self) -> None:
        """Wake every reader and subscriber for good (shutdown)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
            change = HubChange((), self._directory.synced, closed=True)
            subscribers = self._subscribers
        for subscriber in subscribers:
            subscriber(change)

    # -- reads (PeerReader) -----------------------------------------------------------------------
    @property
    def history_id(self) -> str:
        return self._directory.log.history_id  # fixed at construction

    @property
    def self_uid(self) -> str:
        with self._lock:
            return self._self_uid

    def set_self_uid(self, uid: str) -> None:
        """Which peer is this sidecar's own (on etcd it follows the lease: a new lease is a new instance).

        Streams read it when they project, so a change applies to what they send from then on.
        """
        with self._lock:
            self._self_uid = uid

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def synced(self) -> bool:
        with self._lock:
            return self._directory.synced

    def status(self) -> StatusChange:
        with self._lock:
            return self._directory.status

    def wait_synced(self, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._directory.synced or self._closed, timeout) and not self._closed

    def state(self) -> PeerSetState:
        with self._lock:
            d = self._directory
            return PeerSetState(d.log.head_revision, list(d.peers.values()), d.status)

    def head_revision(self) -> int:
        with self._lock:
            return self._directory.log.head_revision

    def covers(self, history_id: str, revision: int) -> bool:
        with self._lock:
            return history_id == self.history_id and self._directory.log.covers(revision)

    def status_at(self, revision: int) -> ApiStatus | None:
        with self._lock:
            entries = self._directory.log.entries_after(revision)
            return None if entries is None else status_before(entries, self._directory.status)

    def wait_entries(self, after: int, timeout: float, limit: int) -> list[LogEntry] | None:
        with self._changed:
            log = self._directory.log
            self._changed.wait_for(lambda: log.head_revision > after or self._closed, timeout)
            return log.entries_after(after, limit)

    def source_health(self) -> dict[str, str]:
        with self._lock:
            return dict(self._source_health)


class _HubStore:
    """The ``SourceStore`` of one source: commits each write to the hub's directory under its lock."""

    def __init__(self, hub: PeerHub, source: str) -> None:
        self._hub = hub
        self.source = source

    def upsert(self, key: str, record: Record, received: float | None = None) -> None:
        self._hub._commit(lambda d: d.apply(self.source, key, record, received))

    def delete(self, key: str, received: float | None = None) -> None:
        self._hub._commit(lambda d: d.apply(self.source, key, None, received))

    def replace(self, records: Mapping[str, Record], received: float | None = None) -> int:
        return len(self._hub._commit(lambda d: d.replace(self.source, records, received)))

    def set_health(self, healthy: bool, reason: str = "") -> None:
        self._hub._set_source_health(self.source, healthy, reason)
