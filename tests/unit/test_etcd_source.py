"""The etcd source's loop on a scripted client: resume revisions, relist on compaction, bad values, health.

The same loop against a real etcd (restart, compaction while cut off, bad values) is covered in
tests/integration/test_etcd_backend.py; here the client answers exactly what each test scripts.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from devcluster.etcd import wait_for
from sidecar.core.dynamo_keys import ENDPOINTS, MODEL_CARDS
from sidecar.core.records import InstanceRecord
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdUnavailable
from sidecar.etcd.settings import Endpoint
from sidecar.etcd.source import EtcdSource

DEADLINE = 10.0
LEASE = 0xA1


def endpoint_value(name: str, lease: int = LEASE, **extra: Any) -> bytes:
    return json.dumps({"type": "Endpoint", "namespace": "ns", "component": "c", "endpoint": name,
                       "instance_id": lease, "transport": {"tcp": "h:1"}, **extra}).encode()


def kv(key: str, value: bytes, lease: int = LEASE, version: int = 1) -> pb.KeyValue:
    return pb.KeyValue(key=key.encode(), value=value, lease=lease, version=version)


class ScriptedStream:
    def __init__(self, creates: list[pb.WatchCreateRequest]) -> None:
        self.creates = creates
        self.responses: queue.Queue[pb.WatchResponse | Exception | None] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchResponse]:
        while True:
            item = self.responses.get()
            if item is None or self.closed.is_set():
                raise EtcdUnavailable("closed", "closed")
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()
        self.responses.put(None)

    def created(self) -> None:
        for create in self.creates:
            self.responses.put(pb.WatchResponse(watch_id=create.watch_id, created=True))


class ScriptedClient:
    """``range_prefix`` answers from ``self.data`` at ``self.revision``; ``watch`` hands out ScriptedStreams."""

    endpoint = Endpoint("etcd", 2379, False)

    def __init__(self) -> None:
        self.data: dict[str, pb.KeyValue] = {}
        self.revision = 10
        self.ranges = 0
        self.streams: queue.Queue[ScriptedStream] = queue.Queue()

    def range_prefix(self, prefix: bytes, *, revision: int = 0, page_size: int = 500) -> tuple[int, list[pb.KeyValue]]:
        self.ranges += 1
        return revision or self.revision, [v for k, v in sorted(self.data.items()) if k.encode().startswith(prefix)]

    def watch(self, creates: list[pb.WatchCreateRequest], **_: Any) -> ScriptedStream:
        stream = ScriptedStream(list(creates))
        self.streams.put(stream)
        return stream


class RecordingStore:
    def __init__(self) -> None:
        self.records: dict[str, InstanceRecord] = {}
        self.health: list[bool] = []
        self.replaced = 0

    def upsert(self, key: str, record: InstanceRecord, received: float | None = None) -> None:
        self.records[key] = record

    def delete(self, key: str, received: float | None = None) -> None:
        self.records.pop(key, None)

    def replace(self, records: Mapping[str, InstanceRecord], received: float | None = None) -> int:
        self.records = dict(records)
        self.replaced += 1
        return 0

    def set_health(self, healthy: bool, reason: str = "") -> None:
        self.health.append(healthy)


def started(client: ScriptedClient, store: RecordingStore) -> tuple[EtcdSource, ScriptedStream]:
    source = EtcdSource(client, store, backoff_max=0.05)  # type: ignore[arg-type]
    source.start()
    stream = client.streams.get(timeout=DEADLINE)
    stream.created()
    return source, stream


def put_event(key: str, value: bytes, lease: int = LEASE, version: int = 2) -> pb.Event:
    return pb.Event(type=pb.Event.PUT, kv=kv(key, value, lease, version))


def test_lists_at_one_revision_then_watches_each_bucket_from_the_next_with_previous_values() -> None:
    client, store = ScriptedClient(), RecordingStore()
    client.data["v1/instances/ns/c/e/a1"] = kv("v1/instances/ns/c/e/a1", endpoint_value("e"))
    source, stream = started(client, store)
    try:
        assert set(store.records) == {"v1/instances/ns/c/e/a1"}
        prefixes = [b"v1/instances/", b"v1/mdc/", b"v1/event_channels/", b"v1/event_sources/"]
        assert [c.key for c in stream.creates] == prefixes
        assert {c.start_revision for c in stream.creates} == {11} and all(c.prev_kv for c in stream.creates)
        stream.responses.put(pb.WatchResponse(watch_id=1, header=pb.ResponseHeader(revision=15),
                                              events=[put_event("v1/instances/ns/c/f/a1", endpoint_value("f"))]))
        stream.responses.put(pb.WatchResponse(watch_id=-1, header=pb.ResponseHeader(revision=20)))  # progress
        wait_for(lambda: "v1/instances/ns/c/f/a1" in store.records, DEADLINE, "the watched key")
        wait_for(lambda: source._next[MODEL_CARDS.prefix] == 21, DEADLINE, "progress to move every bucket")
        assert source._next[ENDPOINTS.prefix] == 21
        stream.responses.put(EtcdUnavailable("connection lost", "unavailable"))
        resumed = client.streams.get(timeout=DEADLINE)
        assert {c.start_revision for c in resumed.creates} == {21}  # resumed, not relisted
        assert client.ranges == 4 and False in store.health
        resumed.created()
        wait_for(lambda: store.health[-1] is True, DEADLINE, "healthy once every watcher is back")
    finally:
        source.stop()


def test_a_compacted_watch_relists() -> None:
    client, store = ScriptedClient(), RecordingStore()
    source, stream = started(client, store)
    try:
        client.data["v1/instances/ns/c/e/a1"] = kv("v1/instances/ns/c/e/a1", endpoint_value("e"))
        client.revision = 50
        stream.responses.put(pb.WatchResponse(watch_id=1, canceled=True, compact_revision=40))
        relisted = client.streams.get(timeout=DEADLINE)
        assert store.replaced == 2 and set(store.records) == {"v1/instances/ns/c/e/a1"}
        assert {c.start_revision for c in relisted.creates} == {51}
        relisted.close()
    finally:
        source.stop()


def test_a_bad_value_keeps_the_keys_last_valid_value_on_the_same_lease_only() -> None:
    client, store = ScriptedClient(), RecordingStore()
    key = "v1/instances/ns/c/e/a1"
    client.data[key] = kv(key, endpoint_value("e", version="1"))
    source, stream = started(client, store)
    try:
        first = store.records[key]
        stream.responses.put(pb.WatchResponse(watch_id=1, header=pb.ResponseHeader(revision=12),
                                              events=[put_event(key, b"garbage")]))
        wait_for(lambda: source.bad_values == 1, DEADLINE, "the bad value to be seen")
        assert store.records[key] == first  # kept
        stream.responses.put(pb.WatchResponse(watch_id=1, header=pb.ResponseHeader(revision=13),
                                              events=[put_event(key, b"garbage", lease=0xB2)]))
        wait_for(lambda: key not in store.records, DEADLINE, "the key to leave its old lease's instance")
        assert source.bad_values == 2
    finally:
        source.stop()


def test_a_permission_denied_watch_makes_the_source_unhealthy_with_the_reason() -> None:
    client, store = ScriptedClient(), RecordingStore()
    reasons: list[str] = []
    store.set_health = lambda healthy, reason="": reasons.append(reason)  # type: ignore[method-assign]
    source = EtcdSource(client, store, backoff_max=0.05)  # type: ignore[arg-type]
    source.start()
    try:
        stream = client.streams.get(timeout=DEADLINE)
        stream.responses.put(pb.WatchResponse(watch_id=1, created=True, canceled=True,
                                              cancel_reason="etcdserver: permission denied"))
        wait_for(lambda: bool(reasons), DEADLINE, "the source to report itself unhealthy")
        assert "permission denied" in reasons[0] and "v1/instances/" in reasons[0]
    finally:
        source.stop()
