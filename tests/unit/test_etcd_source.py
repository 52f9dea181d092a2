"""The etcd source's loop on the scripted etcd (``tests.unit.fake_etcd``): resume revisions, relist on
compaction, bad values, health.

The same loop against a real etcd (restart, compaction while cut off, bad values) is covered in
tests/integration/test_etcd_backend.py; here the client answers exactly what each test scripts.
"""

from __future__ import annotations

from devcluster.waiting import wait_for
from sidecar.core.directory import PeerDirectory
from sidecar.core.dynamo_keys import ENDPOINTS, MODEL_CARDS
from sidecar.core.instance_join import InstanceJoin, instance_peer_key
from sidecar.etcd._pb import etcd_v3_pb2 as pb
from sidecar.etcd.client import EtcdUnavailable
from sidecar.etcd.source import SOURCE_NAME, EtcdSource
from sidecar.peers.hub import PeerHub
from sidecar.peers.ports import SourceStore
from tests.unit.fake_etcd import LEASE, ScriptedEtcd, ScriptedWatch, endpoint_value, kv
from tests.unit.fake_store import RecordingStore

DEADLINE = 10.0


def started(client: ScriptedEtcd, store: SourceStore) -> tuple[EtcdSource, ScriptedWatch]:
    source = EtcdSource(client, store, backoff_max=0.05)  # type: ignore[arg-type]
    source.start()
    stream = client.streams.get(timeout=DEADLINE)
    stream.created()
    return source, stream


def put_event(key: str, value: bytes, lease: int = LEASE, version: int = 2) -> pb.Event:
    return pb.Event(type=pb.Event.PUT, kv=kv(key, value, lease, version))


def test_lists_at_one_revision_then_watches_each_bucket_from_the_next_with_previous_values() -> None:
    client, store = ScriptedEtcd(), RecordingStore()
    client.kv["v1/instances/ns/c/e/a1"] = kv("v1/instances/ns/c/e/a1", endpoint_value("e"))
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
    client, store = ScriptedEtcd(), RecordingStore()
    source, stream = started(client, store)
    try:
        client.kv["v1/instances/ns/c/e/a1"] = kv("v1/instances/ns/c/e/a1", endpoint_value("e"))
        client.revision = 50
        stream.responses.put(pb.WatchResponse(watch_id=1, canceled=True, compact_revision=40))
        relisted = client.streams.get(timeout=DEADLINE)
        assert store.replaced == 2 and set(store.records) == {"v1/instances/ns/c/e/a1"}
        assert {c.start_revision for c in relisted.creates} == {51}
        relisted.close()
    finally:
        source.stop()


def test_a_bad_value_keeps_the_keys_last_valid_value_on_the_same_lease_only() -> None:
    """The source hands the bad value on, with its problem; the hub's join keeps the last valid value."""
    client = ScriptedEtcd()
    hub = PeerHub(PeerDirectory("h", 100, [SOURCE_NAME], join=InstanceJoin()), self_uid="")
    key = "v1/instances/ns/c/e/a1"
    client.kv[key] = kv(key, endpoint_value("e", version="1"))
    source, stream = started(client, hub.store(SOURCE_NAME))
    try:

        def endpoints() -> dict[str, object] | None:
            peer = hub.state().peers
            return dict(peer[0].data["endpoints"]) if peer else None

        wait_for(lambda: hub.synced, DEADLINE, what="the list")
        first = endpoints()
        assert first is not None and first["ns/c/e/a1"]["version"] == "1"  # type: ignore[index]
        stream.responses.put(pb.WatchResponse(watch_id=1, header=pb.ResponseHeader(revision=12),
                                              events=[put_event(key, b"garbage")]))
        wait_for(lambda: source.bad_values == 1, DEADLINE, "the bad value to be seen")
        assert endpoints() == first  # kept
        assert [p.uid for p in hub.state().peers] == [instance_peer_key(LEASE)]
        stream.responses.put(pb.WatchResponse(watch_id=1, header=pb.ResponseHeader(revision=13),
                                              events=[put_event(key, b"garbage", lease=0xB2)]))
        wait_for(lambda: endpoints() is None, DEADLINE, "the key to leave its old lease's instance")
        assert source.bad_values == 2
    finally:
        source.stop()


def test_a_permission_denied_watch_makes_the_source_unhealthy_with_the_reason() -> None:
    client, store = ScriptedEtcd(), RecordingStore()
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
