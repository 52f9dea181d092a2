"""The watch of this instance's own keys in etcd, which runs whatever ``DISCOVERY_WATCH`` says.

The etcd ``OwnWatch`` (``sidecar.peers.own_watch``), the twin of ``sidecar.kube.own_registration``. An
instance's registration is its keys, all on its lease: a key deleted or overwritten by someone else, or
every key gone at once because the lease was revoked, drops the instance from every reader, and the
keep-alive would notice a revoked lease only at its next renewal (up to TTL/2 later) and a deleted key
never. So the sidecar follows exactly the keys it
wrote, and only them: one ``Watch`` stream with one watcher per key (no range: nobody else's keys
travel), from the revision at which it read them back.

* Start (and after any break, and every ``resync`` seconds): read every key back at one revision, in
  transactions of range requests, and report each one that is missing or not as written; then watch
  them from the next revision, so nothing that happens between the read and the watch is missed.
* Each event that is not this instance's own write (a DELETE, or a value or lease other than written)
  is reported to the publisher (``check``), which decides under its write lock whether it is really a
  loss (its own writes race the watch) and restores it: the lease alive, the keys are written again;
  the lease revoked, a new lease is registered (a new instance ID, as Dynamo's clients expect).
* When the publisher writes other keys, or takes a new lease, it calls ``refresh``: the stream is closed
  and the loop starts over with the new keys.

The thread, its stop, the open stream, health and backoff are the ``SourceLoop``'s; its store is the
``OwnWatchStore`` (this watch feeds no peers: a read-back is its relist, which makes it healthy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdAuthFailed, EtcdClient, EtcdCompacted, EtcdError, EtcdPermissionDenied
from sidecar.peers.own_watch import OwnWatchStore
from sidecar.peers.source_loop import SourceLoop

READ_BATCH = 64
"""Keys read back per transaction (etcd refuses more than 128 operations in one)."""


class OwnKeys(Protocol):
    """What the watch asks of the publisher."""

    def written_snapshot(self) -> tuple[int, dict[str, bytes | None]]:
        """The current lease (0: none) and every key written under it, with its value (None: unknown)."""
        ...

    def check(self, lease: int, key: str, value: bytes | None, key_lease: int) -> None:
        """``key`` now holds ``value`` on ``key_lease`` (``value`` None: deleted): restore it if that is not
        what was written."""
        ...


class OwnKeysWatch(SourceLoop):
    """Owns the watch of this instance's keys: which keys it follows and from which revision; its thread,
    open stream, health and backoff are the ``SourceLoop``'s. The etcd backend builds it for its
    publisher and the daemon starts and stops it with the publisher; the publisher calls ``refresh`` from
    its threads (``_refresh`` is an event: set from there, taken here)."""

    def __init__(
        self,
        client: EtcdClient,
        publisher: OwnKeys,
        *,
        backoff_max: float = 30.0,
        silence_timeout: float = 30.0,
        progress_interval: float = 5.0,
        resync: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.publisher = publisher
        self.silence_timeout = silence_timeout
        self.progress_interval = progress_interval
        self.resync = resync
        self.clock = clock
        self.health = OwnWatchStore()
        super().__init__(
            self.health, structlog.get_logger("sidecar.etcd.own_keys"), backoff_max, thread_name="etcd-own-keys"
        )
        self._refresh = threading.Event()  # the keys changed: start over with the new ones
        self.watched: tuple[int, frozenset[str]] = (0, frozenset())  # (lease, keys) of the open watch

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    def refresh(self) -> None:
        """The publisher wrote other keys or took another lease: follow those from now on."""
        self._refresh.set()
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            stream.close()

    def run(self) -> None:
        while not self._stop.is_set():
            self._refresh.clear()
            lease, written = self.publisher.written_snapshot()
            if not lease or not written:
                self.watched = (lease, frozenset())
                self._refresh.wait(1.0)  # poll: also woken by refresh() when keys are written
                continue
            try:
                revision = self._read_back(lease, written)
                self._watch(lease, sorted(written), revision)
            except EtcdCompacted:
                continue  # the watch's start revision is gone: read back again, from now
            except EtcdError as exc:
                if self._stop.is_set():
                    break
                if self._refresh.is_set():
                    continue  # closed on purpose by refresh(): not a failure
                needs_human = isinstance(exc, (EtcdPermissionDenied, EtcdAuthFailed))
                self._retry_later("watch of this instance's own keys failed, retrying", str(exc), None, needs_human)
            except Exception as exc:  # a bug must cost a retry, never the watch: the thread lives on
                self.log.exception("unexpected error in the watch of this instance's own keys; retrying")
                self._retry_later("watch of this instance's own keys failed, retrying", repr(exc), None, True)

    def _read_back(self, lease: int, written: dict[str, bytes | None]) -> int:
        """Read every written key at one revision; report those not as written. Returns that revision."""
        keys = sorted(written)
        revision = 0
        for start in range(0, len(keys), READ_BATCH):
            batch = keys[start : start + READ_BATCH]
            reply = self.client.txn(
                pb.TxnRequest(
                    success=[
                        pb.RequestOp(request_range=pb.RangeRequest(key=key.encode(), revision=revision))
                        for key in batch
                    ]
                )
            )
            revision = revision or reply.header.revision
            for key, response in zip(batch, reply.responses, strict=True):
                kvs = response.response_range.kvs
                if not kvs:
                    self.publisher.check(lease, key, None, 0)
                elif kvs[0].value != written[key] or kvs[0].lease != lease:
                    self.publisher.check(lease, key, kvs[0].value, kvs[0].lease)
        self._report_healthy("etcd reachable again")
        self.health.replace({})  # read back at one revision: the relist of a watch that keeps no peers
        return revision

    def _watch(self, lease: int, keys: list[str], revision: int) -> None:
        """Watch ``keys`` from ``revision`` + 1 until a refresh, the resync, a failure or the stop."""
        creates = [
            pb.WatchCreateRequest(key=key.encode(), start_revision=revision + 1, watch_id=i + 1)
            for i, key in enumerate(keys)
        ]
        stream = self.client.watch(
            creates, progress_interval=self.progress_interval, silence_timeout=self.silence_timeout
        )
        self._hold_stream(stream)
        if self._stop.is_set() or self._refresh.is_set():
            stream.close()
        self.watched = (lease, frozenset(keys))
        until = self.clock() + self.resync
        try:
            for response in stream:
                self.backoff.reset()
                if response.canceled:
                    if response.compact_revision:
                        raise EtcdCompacted("watch revision compacted", response.compact_revision)
                    raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason}", "cancelled")
                for event in response.events:
                    kv = event.kv
                    deleted = event.type == pb.Event.DELETE
                    self.publisher.check(lease, kv.key.decode(), None if deleted else kv.value, kv.lease)
                if self._stop.is_set() or self._refresh.is_set():
                    return
                if self.clock() >= until:  # read everything back now and then, should an event have been lost
                    return
        finally:
            self._hold_stream(None)
            stream.close()
