"""The peer directory: the join, the current peer set and the event log, kept consistent.

This is the one object the watch layer feeds and the API layer reads. It is pure and
single-threaded; ``sidecar.hub.PeerHub`` adds the lock and the wake-ups. Every mutation recomputes
the peers it may have touched and appends a log entry only for a peer whose value really changed,
which is why a relist after ``410 Gone`` (``replace_*``) produces no spurious remove/add pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sidecar.core.eventlog import ApiStatus, EventLog, LogEntry, PeerChange, StatusChange
from sidecar.core.join import PeerJoin
from sidecar.core.peer import Peer
from sidecar.core.resources import SliceView, WorkerMetadata

ENDPOINT_SLICES = "endpointslices"
WORKER_METADATA = "dynamoworkermetadatas"
SOURCES = (ENDPOINT_SLICES, WORKER_METADATA)


class PeerDirectory:
    def __init__(self, history_id: str, history_capacity: int) -> None:
        self.join = PeerJoin()
        self.log = EventLog(history_id, history_capacity)
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
        """Both sources have been listed once: from now on an empty peer set means none."""
        return self._synced.issuperset(SOURCES)

    # -- writes -----------------------------------------------------------------------------------
    def apply_slice(self, key: str, view: SliceView | None) -> list[LogEntry]:
        affected = self.join.delete_slice(key) if view is None else self.join.upsert_slice(key, view)
        return self._refresh(affected)

    def apply_metadata(self, key: str, record: WorkerMetadata | None) -> list[LogEntry]:
        affected = self.join.delete_metadata(key) if record is None else self.join.upsert_metadata(key, record)
        return self._refresh(affected)

    def replace_slices(self, views: Mapping[str, SliceView]) -> list[LogEntry]:
        """A fresh list of all slices: apply only the differences, then mark the source synced."""
        affected: set[str] = set()
        for key in self.join.slice_keys() - views.keys():
            affected |= self.join.delete_slice(key)
        for key, view in views.items():
            affected |= self.join.upsert_slice(key, view)
        self._synced.add(ENDPOINT_SLICES)
        return self._refresh(affected)

    def replace_metadata(self, records: Mapping[str, WorkerMetadata]) -> list[LogEntry]:
        affected: set[str] = set()
        for key in self.join.metadata_keys() - records.keys():
            affected |= self.join.delete_metadata(key)
        for key, record in records.items():
            affected |= self.join.upsert_metadata(key, record)
        self._synced.add(WORKER_METADATA)
        return self._refresh(affected)

    def set_status(self, status: ApiStatus, reason: str) -> list[LogEntry]:
        if status is self._status.status:
            return []
        self._status = StatusChange(status, reason)
        return [self.log.append(self._status)]

    def _refresh(self, affected: Iterable[str]) -> list[LogEntry]:
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
            entries.append(self.log.append(PeerChange(uid, before, after)))
        return entries
