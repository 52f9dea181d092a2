"""The peer directory: the join, the current peer set and the event log, kept consistent.

This is the one object every source feeds and the API layer reads. It is pure and single-threaded;
``sidecar.peers.hub.PeerHub`` adds the lock and the wake-ups. It knows sources only by name: each writes
records under its own keys (``apply``), or its whole set after a (re)list (``replace``), and the
directory is *synced* once every source it was built with has been listed once. Every mutation
recomputes the peers it may have touched and appends a log entry only for a peer whose value really
changed, which is why a relist after ``410 Gone`` produces no spurious remove/add pairs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from sidecar.core.eventlog import ApiStatus, EventLog, LogEntry, PeerChange, StatusChange
from sidecar.core.join import Join, PeerJoin
from sidecar.core.peer import Peer
from sidecar.core.records import Record


class PeerDirectory:
    """Owns the join, the peer set, the log, the per-source key sets and sync state, and the API status.

    Called by ``PeerHub`` only (under its lock); tests drive it directly.
    """

    def __init__(
        self,
        history_id: str,
        history_capacity: int,
        sources: Collection[str],
        join: Join | None = None,
        history_bytes: int | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a peer directory needs at least one source")
        self.join: Join = join if join is not None else PeerJoin()
        self.log = EventLog(history_id, history_capacity, history_bytes)
        self.sources = tuple(sources)
        self._keys: dict[str, set[str]] = {source: set() for source in self.sources}
        self._peers: dict[str, Peer] = {}
        self._synced: set[str] = set()
        self._status = StatusChange(ApiStatus.CONNECTED, "")

    # -- reads ------------------------------------------------------------------------------------
    @property
    def peers(self) -> Mapping[str, Peer]:
        return self._peers

    @property
    def status(self) -> StatusChange:
        return self._status

    @property
    def synced(self) -> bool:
        """Every source has been listed once: from now on an empty peer set means none."""
        return len(self._synced) == len(self.sources)

    # -- writes -----------------------------------------------------------------------------------
    def apply(self, source: str, key: str, record: Record | None, received: float | None = None) -> list[LogEntry]:
        """One object of ``source`` changed (``record``) or went away (None)."""
        return self._refresh(self._apply(source, key, record), received)

    def replace(self, source: str, records: Mapping[str, Record], received: float | None = None) -> list[LogEntry]:
        """A fresh list of all of ``source``'s objects: apply only the differences, then mark it synced."""
        affected: set[str] = set()
        for key in self._source_keys(source) - records.keys():
            affected |= self._apply(source, key, None)
        for key, record in records.items():
            affected |= self._apply(source, key, record)
        self._synced.add(source)
        return self._refresh(affected, received)

    def set_status(self, status: ApiStatus, reason: str) -> list[LogEntry]:
        if status is self._status.status:
            return []
        self._status = StatusChange(status, reason, previous=self._status.status)
        return [self.log.append(self._status)]

    def _source_keys(self, source: str) -> set[str]:
        keys = self._keys.get(source)
        if keys is None:
            raise ValueError(f"unknown source {source!r}; this directory reads {', '.join(self.sources)}")
        return keys

    def _apply(self, source: str, key: str, record: Record | None) -> set[str]:
        keys = self._source_keys(source)
        join_key = f"{source}/{key}"  # sources may reuse each other's object names
        if record is None:
            if key not in keys:
                return set()
            keys.discard(key)
            return self.join.delete(join_key)
        keys.add(key)
        return self.join.upsert(join_key, record)

    def _refresh(self, affected: Iterable[str], received: float | None) -> list[LogEntry]:
        entries = []
        for uid in sorted(affected):
            after = self.join.peer(uid)
            before = self._peers.get(uid)
            if after == before:
                continue
            if after is None:
                del self._peers[uid]
            else:
                self._peers[uid] = after
            entries.append(self.log.append(PeerChange(uid, before, after), received))
        return entries
