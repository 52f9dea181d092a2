"""Peers from etcd: Dynamo's four ``v1/`` buckets, listed at one revision, then watched from the next.

The etcd twin of ``sidecar.kube.reflector``, the way Dynamo's own reader does it (``kv_store.rs``,
``transports/etcd.rs``):

* List: every key of ``v1/instances/``, ``v1/mdc/``, ``v1/event_channels/`` and ``v1/event_sources/`` at
  one revision R (paginated, each page read at R), handed to the store as a whole (``replace``: the
  directory applies only the differences, so a relist removes and adds nothing that did not change).
* Watch: one gRPC ``Watch`` stream with one watcher per bucket, each from R+1 with ``prev_kv``. Each
  response moves that bucket's resume revision to the response's revision + 1, and etcd's progress
  reports (asked for every few seconds) move all of them; a stream that answers nothing at all for
  ``silence_timeout`` is abandoned.
* Reconnect: the watch resumes from the resume revisions, so nothing is missed and nothing is read
  twice; etcd's history survives a restart. A watcher cancelled because its revision was compacted
  (or a list at a compacted revision) means relist. Any other failure: the store is told the source is
  unhealthy (the stream says DEGRADED; peers are kept), jittered backoff, try again; healthy again once
  every watcher is re-created.
* Bad values (not JSON, the wrong ``type`` for the bucket, a required field missing, beyond the
  metadata bounds) are logged with the key and the reason and handed to the store as what they are, a
  record with a problem: the core's instance join keeps the key's last valid value while the key stays
  on the same lease, exactly as Dynamo's reader keeps its last parsed instance (and as the Kubernetes
  join keeps a pod's last valid metadata). Nothing else is affected: other keys, and other peers, go on.
"""

from __future__ import annotations

import time

import structlog

from sidecar.core.dynamo_keys import BUCKETS, Bucket, read_kv
from sidecar.core.records import InstanceRecord
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import (
    EtcdAuthFailed,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdPermissionDenied,
    EtcdUnavailable,
    prefix_end,
)
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import SourceStore
from sidecar.peers.source_loop import SourceLoop

SOURCE_NAME = "etcd"


class _Relist(Exception):
    """The history we hold is compacted away: list again."""


class EtcdSource(SourceLoop):
    """Owns the etcd watch: its resume revisions; its thread, open stream, health and backoff are the
    ``SourceLoop``'s.

    The etcd backend constructs it and the daemon starts it; it writes into ``store``. ``stop`` may be
    called from any thread; ``_next`` is touched by the watch thread only.
    """

    def __init__(
        self,
        client: EtcdClient,
        store: SourceStore,
        metrics: Metrics | None = None,
        *,
        name: str = SOURCE_NAME,
        backoff_max: float = 30.0,
        silence_timeout: float = 30.0,
        progress_interval: float = 5.0,
        page_size: int = 500,
        buckets: tuple[Bucket, ...] = BUCKETS,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.name = name
        self.silence_timeout = silence_timeout
        self.progress_interval = progress_interval
        self.page_size = page_size
        self.buckets = buckets
        super().__init__(
            store,
            structlog.get_logger("sidecar.etcd.source").bind(source=name),
            backoff_max,
            thread_name=f"etcd-source-{name}",
        )
        self.revision = 0  # of the last list
        self.relists = 0
        self.bad_values = 0
        self._next: dict[str, int] = {}  # bucket prefix -> the revision its watcher resumes from

    def run(self) -> None:
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()
            except (_Relist, EtcdCompacted) as exc:
                self.log.info("etcd history compacted, relisting", reason=str(exc))
                self._count_restart("expired")
                need_list = True
            except EtcdUnavailable as exc:
                if self._stop.is_set():
                    break
                if exc.code == "silent":
                    self.log.warning("etcd watch silent, restarting it", silence_seconds=self.silence_timeout)
                    self._count_restart("silent")
                    continue
                self._failed(f"cannot reach etcd at {self.client.endpoint.url}: {exc}", exc)
            except EtcdError as exc:
                self._failed(str(exc), exc)
            except Exception as exc:  # a bug must cost a retry, never the watch: the thread lives on
                self.log.exception("unexpected error in the etcd watch; retrying")
                self._failed(f"unexpected error: {type(exc).__name__}: {exc}", exc)

    def _count_restart(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.watch_restarts.labels(self.name, reason).inc()

    def _failed(self, reason: str, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.api_errors.labels(f"watch-{self.name}", getattr(exc, "code", "") or "error").inc()
        self._count_restart("error")
        hint = None
        if isinstance(exc, EtcdPermissionDenied):
            hint = "grant the etcd user read on v1/instances/, v1/mdc/, v1/event_channels/ and v1/event_sources/"
        elif isinstance(exc, EtcdAuthFailed):
            hint = "check ETCD_AUTH_USERNAME and ETCD_AUTH_PASSWORD"
        needs_human = isinstance(exc, (EtcdPermissionDenied, EtcdAuthFailed))
        self._retry_later("etcd watch failed, retrying", reason, hint, needs_human)

    def _became_healthy(self) -> None:
        self.backoff.reset()
        self._report_healthy("etcd reachable again")

    # -- list ---------------------------------------------------------------------------------------
    def _list(self) -> None:
        revision = 0
        records: dict[str, InstanceRecord] = {}
        for bucket in self.buckets:
            prefix = bucket.prefix.encode()
            revision, kvs = self.client.range_prefix(prefix, revision=revision, page_size=self.page_size)
            for kv in kvs:
                record = self._parse(kv.key, kv.value, kv.lease)
                if record is not None:
                    records[record.key] = record
        self.revision = revision
        self._next = {bucket.prefix: revision + 1 for bucket in self.buckets}
        self.relists += 1
        changes = self.store.replace(dict(records), time.monotonic())
        self._became_healthy()  # after the relist is applied: CONNECTED then means current
        if self.metrics is not None:
            self.metrics.relists.labels(self.name).inc()
        self.log.info("listed etcd", keys=len(records), revision=revision, changes=changes)

    def _parse(self, key: bytes, value: bytes, lease: int) -> InstanceRecord | None:
        """The key's record (None outside the buckets); a bad value is logged, and its record says why."""
        record = read_kv(key, value, lease)
        if record is not None and record.problem is not None:
            self.bad_values += 1
            self.log.warning(
                "bad value under a Dynamo etcd prefix; skipping it (the key's last valid value on the same "
                "lease is kept)",
                key=record.key,
                lease=f"{lease:x}",
                reason=record.problem,
            )
        return record

    # -- watch --------------------------------------------------------------------------------------
    def _watch(self) -> None:
        by_id = {i + 1: bucket for i, bucket in enumerate(self.buckets)}
        creates = [
            pb.WatchCreateRequest(
                key=bucket.prefix.encode(),
                range_end=prefix_end(bucket.prefix.encode()),
                start_revision=self._next[bucket.prefix],
                prev_kv=True,
                progress_notify=True,
                watch_id=watch_id,
            )
            for watch_id, bucket in by_id.items()
        ]
        stream = self.client.watch(
            creates, progress_interval=self.progress_interval, silence_timeout=self.silence_timeout
        )
        self._hold_stream(stream)
        if self._stop.is_set():
            stream.close()
        created: set[int] = set()
        try:
            for response in stream:
                received = time.monotonic()
                if response.canceled:
                    self._canceled(response, by_id)
                if response.created:
                    created.add(response.watch_id)
                    if len(created) == len(by_id):
                        self._became_healthy()
                    continue
                revision = response.header.revision
                if response.watch_id == -1 or response.watch_id not in by_id:  # a progress report: all watchers
                    if response.events:
                        continue
                    for prefix, current in self._next.items():
                        self._next[prefix] = max(current, revision + 1)
                    continue
                bucket = by_id[response.watch_id]
                for event in response.events:
                    self._apply(event, received)
                self._next[bucket.prefix] = max(self._next[bucket.prefix], revision + 1)
                if self._stop.is_set():
                    return
        finally:
            self._hold_stream(None)
            stream.close()

    def _canceled(self, response: pb.WatchResponse, by_id: dict[int, Bucket]) -> None:
        if response.compact_revision:
            raise _Relist(f"watch revision compacted (etcd kept revisions from {response.compact_revision})")
        reason = response.cancel_reason or "etcd cancelled the watch"
        bucket = by_id.get(response.watch_id)
        where = f" on {bucket.prefix}" if bucket else ""
        if "permission denied" in reason:
            raise EtcdPermissionDenied(f"etcd refused the watch{where}: {reason}", "permission-denied")
        if "auth" in reason or "token" in reason:
            raise EtcdAuthFailed(f"etcd refused the watch{where}: {reason}", "unauthenticated")
        raise EtcdUnavailable(f"etcd cancelled the watch{where}: {reason}", "cancelled")

    def _apply(self, event: pb.Event, received: float) -> None:
        kv = event.kv
        key = kv.key.decode(errors="replace")
        if event.type == pb.Event.DELETE:
            self.store.delete(key, received)
            kind = "deleted"
        else:
            record = self._parse(kv.key, kv.value, kv.lease)
            if record is None:
                return
            self.store.upsert(key, record, received)
            kind = "modified" if kv.version > 1 else "added"
        if self.metrics is not None:
            self.metrics.events_applied.labels(self.name, kind).inc()
