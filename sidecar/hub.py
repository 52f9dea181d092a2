"""The thread-safe face of the peer directory.

Watch threads write into it; gRPC stream threads, the HTTP debug endpoint and the registrar read it.
One lock guards the pure ``PeerDirectory``; a condition variable wakes readers when the log grows or
the sync/stop state changes. Readers never hold the lock while doing IO: they copy what they need
(a slice of log entries, the peer set) and release it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import structlog

from sidecar.core.directory import ENDPOINT_SLICES, WORKER_METADATA, PeerDirectory
from sidecar.core.eventlog import ApiStatus, LogEntry, StatusChange
from sidecar.core.peer import Peer
from sidecar.core.resources import (
    SliceView,
    WorkerMetadata,
    object_key,
    parse_endpoint_slice,
    parse_worker_metadata,
)

EntryListener = Callable[[list[LogEntry]], None]


class PeerHub:
    def __init__(self, directory: PeerDirectory, self_uid: str) -> None:
        self._directory = directory
        self.self_uid = self_uid
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._listeners: list[EntryListener] = []
        self._source_health: dict[str, str] = {}  # source -> reason it is unhealthy
        # revision -> monotonic time the API event that produced it was received (for lag metrics).
        self.received_at: dict[int, float] = {}

    @property
    def history_id(self) -> str:
        return self._directory.log.history_id

    def add_listener(self, listener: EntryListener) -> None:
        """Called (outside the lock) with every batch of new entries; used for logs and metrics."""
        self._listeners.append(listener)

    # -- writes (watch threads) -------------------------------------------------------------------
    def _commit(
        self, mutate: Callable[[PeerDirectory], list[LogEntry]], received: float | None = None
    ) -> list[LogEntry]:
        with self._changed:
            entries = mutate(self._directory)
            if entries:
                stamp = received if received is not None else time.monotonic()
                for entry in entries:
                    self.received_at[entry.revision] = stamp
                oldest = self._directory.log.oldest_resumable_revision
                if len(self.received_at) > 2 * self._directory.log.capacity:
                    self.received_at = {r: t for r, t in self.received_at.items() if r > oldest}
            self._changed.notify_all()
        for listener in self._listeners:
            listener(entries)
        return entries

    def upsert(self, source: str, obj: Mapping[str, Any], received: float | None = None) -> list[LogEntry]:
        key = object_key(obj)
        if source == ENDPOINT_SLICES:
            view = parse_endpoint_slice(obj)
            return self._commit(lambda d: d.apply_slice(key, view), received)
        record = parse_worker_metadata(obj)
        if record.data_error:
            structlog.get_logger("sidecar.hub").warning(
                "invalid worker metadata; keeping the last valid data of this pod incarnation",
                cr=record.name,
                owners=list(record.owner_pod_uids),
                reason=record.data_error,
            )
        return self._commit(lambda d: d.apply_metadata(key, record), received)

    def delete(self, source: str, obj: Mapping[str, Any], received: float | None = None) -> list[LogEntry]:
        key = object_key(obj)
        if source == ENDPOINT_SLICES:
            return self._commit(lambda d: d.apply_slice(key, None), received)
        return self._commit(lambda d: d.apply_metadata(key, None), received)

    @staticmethod
    def parse(source: str, obj: Mapping[str, Any]) -> SliceView | WorkerMetadata:
        """The compact record the join keeps for a raw object (the raw object can then be dropped)."""
        return parse_endpoint_slice(obj) if source == ENDPOINT_SLICES else parse_worker_metadata(obj)

    def replace(self, source: str, records: Mapping[str, SliceView | WorkerMetadata]) -> list[LogEntry]:
        """A full relist, already parsed (see ``parse``), keyed by ``namespace/name``."""
        if source == ENDPOINT_SLICES:
            views = cast("Mapping[str, SliceView]", records)
            return self._commit(lambda d: d.replace_slices(views))
        metadata = cast("Mapping[str, WorkerMetadata]", records)
        return self._commit(lambda d: d.replace_metadata(metadata))

    def replace_objects(self, source: str, objs: Iterable[Mapping[str, Any]]) -> list[LogEntry]:
        """``replace`` from raw objects."""
        return self.replace(source, {object_key(o): self.parse(source, o) for o in objs})

    def set_source_health(self, source: str, healthy: bool, reason: str = "") -> None:
        """A watch reports whether it can reach the API server; any unhealthy source degrades the hub."""
        with self._changed:
            if healthy:
                self._source_health.pop(source, None)
            else:
                self._source_health[source] = reason
            unhealthy = dict(self._source_health)
        if unhealthy:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(unhealthy.items()))
            self._commit(lambda d: d.set_status(ApiStatus.DEGRADED, why))
        else:
            self._commit(lambda d: d.set_status(ApiStatus.CONNECTED, "watches re-established"))

    def close(self) -> None:
        """Wake every reader for good (shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- reads ------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
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

    def state(self) -> tuple[int, list[Peer], StatusChange]:
        """(head revision, peers, status) taken atomically: a consistent snapshot."""
        with self._lock:
            d = self._directory
            return d.log.head_revision, list(d.peers.values()), d.status

    def head_revision(self) -> int:
        with self._lock:
            return self._directory.log.head_revision

    def covers(self, history_id: str, revision: int) -> bool:
        with self._lock:
            return history_id == self.history_id and self._directory.log.covers(revision)

    def wait_entries(self, after: int, timeout: float, limit: int) -> list[LogEntry] | None:
        """Entries after ``after`` (waiting up to ``timeout`` for one); None when the history is gone."""
        with self._changed:
            log = self._directory.log
            self._changed.wait_for(lambda: log.head_revision > after or self._closed, timeout)
            return log.entries_after(after, limit)

    def source_health(self) -> dict[str, str]:
        with self._lock:
            return dict(self._source_health)


__all__ = ["ENDPOINT_SLICES", "WORKER_METADATA", "PeerHub"]
