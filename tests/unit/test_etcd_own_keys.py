"""The watch of an instance's own keys (``sidecar.etcd.own_keys``) on a scripted client: what it reads back,
which keys it watches from which revision, what it reports, and that a refresh is not a failure. The same on
a real etcd is in tests/integration/test_etcd_sidecar.py (TestOwnKeys)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from devcluster.waiting import wait_for
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdUnavailable
from sidecar.etcd.own_keys import OwnKeysWatch

DEADLINE = 10.0
LEASE = 0x2A


class Stream:
    """A watch that yields ``responses`` then stays open until closed (then fails as a closed stream does)."""

    def __init__(self, responses: list[pb.WatchResponse]) -> None:
        self.responses = responses
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[pb.WatchResponse]:
        yield from self.responses
        self.closed.wait()
        raise EtcdUnavailable("the watch was closed", "closed")

    def close(self) -> None:
        self.closed.set()


class Client:
    def __init__(self, stored: dict[str, tuple[bytes, int]]) -> None:
        self.stored = stored
        self.watches: list[list[pb.WatchCreateRequest]] = []
        self.streams: list[Stream] = []
        self.next_events: list[pb.WatchResponse] = []

    def txn(self, request: pb.TxnRequest) -> pb.TxnResponse:
        responses = []
        for op in request.success:
            key = op.request_range.key.decode()
            value, lease = self.stored.get(key, (b"", -1))
            kvs = [pb.KeyValue(key=key.encode(), value=value, lease=lease)] if lease >= 0 else []
            responses.append(pb.ResponseOp(response_range=pb.RangeResponse(kvs=kvs)))
        return pb.TxnResponse(succeeded=True, responses=responses, header=pb.ResponseHeader(revision=41))

    def watch(self, creates: list[pb.WatchCreateRequest], **_: Any) -> Stream:
        self.watches.append(list(creates))
        stream = Stream(self.next_events)
        self.next_events = []
        self.streams.append(stream)
        return stream


class Publisher:
    def __init__(self, written: dict[str, bytes | None]) -> None:
        self.written = written
        self.checked: list[tuple[str, bytes | None, int]] = []

    def written_snapshot(self) -> tuple[int, dict[str, bytes | None]]:
        return LEASE, dict(self.written)

    def check(self, lease: int, key: str, value: bytes | None, key_lease: int) -> None:
        assert lease == LEASE
        self.checked.append((key, value, key_lease))


def start(client: Client, publisher: Publisher) -> OwnKeysWatch:
    watch = OwnKeysWatch(client, publisher, backoff_max=0.05)  # type: ignore[arg-type]
    watch.start()
    return watch


def test_reads_back_reports_what_differs_then_watches_exactly_its_keys_from_the_next_revision() -> None:
    client = Client({"k/a": (b"A", LEASE), "k/b": (b"other", 0)})
    publisher = Publisher({"k/a": b"A", "k/b": b"B", "k/c": b"C"})
    watch = start(client, publisher)
    try:
        wait_for(lambda: client.watches, DEADLINE, "the watch")
        assert publisher.checked == [("k/b", b"other", 0), ("k/c", None, 0)], "different, and missing"
        (creates,) = client.watches
        assert [(c.key, c.range_end, c.start_revision) for c in creates] == [
            (b"k/a", b"", 42), (b"k/b", b"", 42), (b"k/c", b"", 42)
        ], "one watcher per key, no range: nobody else's keys travel"
        assert watch.healthy
    finally:
        watch.stop()


def test_events_are_reported_and_a_refresh_follows_the_new_keys_without_counting_a_failure() -> None:
    client = Client({"k/a": (b"A", LEASE)})
    deleted = pb.WatchResponse(watch_id=1, events=[pb.Event(type=pb.Event.DELETE, kv=pb.KeyValue(key=b"k/a"))])
    client.next_events = [deleted]
    publisher = Publisher({"k/a": b"A"})
    watch = start(client, publisher)
    try:
        wait_for(lambda: publisher.checked, DEADLINE, "the deletion reported")
        assert publisher.checked == [("k/a", None, 0)]
        publisher.written = {"k/a": b"A", "k/n": b"N"}
        client.stored["k/n"] = (b"N", LEASE)
        watch.refresh()
        wait_for(lambda: len(client.watches) == 2, DEADLINE, "the watch of the new keys")
        assert [c.key for c in client.watches[1]] == [b"k/a", b"k/n"]
        assert watch.healthy and watch.backoff.attempts == 0, "a refresh is not a failure"
    finally:
        watch.stop()
