"""The etcd join rule through the real directory: a peer is one lease with the entries of all its keys."""

from __future__ import annotations

import json
from typing import Any

from sidecar.core.directory import PeerDirectory
from sidecar.core.dynamo_keys import parse_kv, read_kv
from sidecar.core.instance_join import InstanceJoin, instance_peer_key
from sidecar.core.peer import PeerState
from sidecar.core.records import InstanceRecord

A, B = 0x1111, 0x2222


def record(key: str, lease: int, **entry: Any) -> InstanceRecord:
    bucket = key.split("/")[1]
    base: dict[str, Any] = {
        "instances": {"type": "Endpoint", "namespace": "ns", "component": "c", "endpoint": "e",
                      "instance_id": lease, "transport": {"tcp": "h:1"}},
        "mdc": {"type": "Model", "namespace": "ns", "component": "c", "endpoint": "e", "instance_id": lease,
                "card_json": {"name": "m"}},
    }[bucket]
    parsed = parse_kv(key.encode(), json.dumps({**base, **entry}).encode(), lease)
    assert parsed is not None
    return parsed


def directory() -> PeerDirectory:
    return PeerDirectory("h", 100, ("etcd",), join=InstanceJoin())


def test_keys_of_one_lease_make_one_peer_shaped_like_spec_data() -> None:
    d = directory()
    d.replace("etcd", {
        f"v1/instances/ns/c/e/{A:x}": record(f"v1/instances/ns/c/e/{A:x}", A),
        f"v1/mdc/ns/c/e/{A:x}": record(f"v1/mdc/ns/c/e/{A:x}", A),
        f"v1/instances/ns/c/e/{B:x}": record(f"v1/instances/ns/c/e/{B:x}", B),
    })
    assert set(d.peers) == {instance_peer_key(A), instance_peer_key(B)}
    peer = d.peers[instance_peer_key(A)]
    assert (peer.uid, peer.name, peer.namespace, peer.instance_id) == (f"etcd/{A:x}", f"{A:x}", "", A)
    assert peer.state is PeerState.READY and peer.addresses == () and dict(peer.labels) == {}
    assert peer.data == {
        "endpoints": {f"ns/c/e/{A:x}": record(f"v1/instances/ns/c/e/{A:x}", A).entry},
        "model_cards": {f"ns/c/e/{A:x}": record(f"v1/mdc/ns/c/e/{A:x}", A).entry},
        "event_channels": {},
        "event_sources": {},
    }


def test_an_instance_leaves_with_its_last_key_and_changes_are_one_entry_each() -> None:
    d = directory()
    d.replace("etcd", {})
    key, card = f"v1/instances/ns/c/e/{A:x}", f"v1/mdc/ns/c/e/{A:x}"
    assert [e.change.after is not None for e in d.apply("etcd", key, record(key, A))] == [True]
    assert d.apply("etcd", key, record(key, A)) == []  # the same value again: no change
    assert len(d.apply("etcd", card, record(card, A))) == 1  # the peer gained a model card
    assert len(d.apply("etcd", card, record(card, A, card_json={"name": "n"}))) == 1
    assert len(d.apply("etcd", key, None)) == 1 and instance_peer_key(A) in d.peers  # still has its card
    (entry,) = d.apply("etcd", card, None)
    assert entry.change.after is None and d.peers == {}


def test_a_relist_that_changes_nothing_logs_nothing() -> None:
    d = directory()
    records = {f"v1/instances/ns/c/e/{A:x}": record(f"v1/instances/ns/c/e/{A:x}", A)}
    d.replace("etcd", records)
    head = d.log.head_revision
    d.replace("etcd", {k: record(k, A) for k in records})
    assert d.log.head_revision == head


def test_a_bad_value_keeps_the_keys_last_valid_value_while_on_the_same_lease() -> None:
    """Dynamo's reader keeps its last parsed instance; so does the join (a record with a problem)."""
    d = directory()
    key = f"v1/instances/ns/c/e/{A:x}"
    d.replace("etcd", {key: record(key, A, version="1")})
    before = d.peers[instance_peer_key(A)]
    bad = read_kv(key.encode(), b"garbage", A)
    assert bad is not None and bad.problem and "not JSON" in bad.problem
    assert d.apply("etcd", key, bad) == [] and d.peers[instance_peer_key(A)] == before  # kept
    assert d.apply("etcd", key, record(key, A, version="2")) != []  # a valid value again: it changes
    (gone,) = d.apply("etcd", key, read_kv(key.encode(), b"garbage", B))  # another lease: the key is gone
    assert gone.change.after is None and d.peers == {}


def test_a_bad_value_never_valid_adds_nothing_and_a_relist_keeps_the_last_valid_value() -> None:
    d = directory()
    key = f"v1/instances/ns/c/e/{A:x}"
    d.replace("etcd", {key: read_kv(key.encode(), b"[1]", A)})  # type: ignore[dict-item]
    assert d.peers == {} and d.synced
    d.replace("etcd", {key: record(key, A)})
    before = d.peers[instance_peer_key(A)]
    d.replace("etcd", {key: read_kv(key.encode(), b"{}", A)})  # type: ignore[dict-item]
    assert d.peers == {instance_peer_key(A): before}
