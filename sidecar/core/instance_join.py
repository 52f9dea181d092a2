"""The etcd join rule: a peer is one Dynamo instance, i.e. one lease, with all the entries its keys hold.

The twin of ``sidecar.core.join.PeerJoin`` for ``InstanceRecord``s. It implements the core's ``Join``
protocol, so ``PeerDirectory(..., sources=("etcd",), join=InstanceJoin())`` serves etcd peers through the
same hub, log, streams and resume as Kubernetes peers.

* Keys are grouped by instance ID (the lease ID). An instance is a peer while it has at least one key;
  its last key going away (lease expired or revoked: etcd deletes them all in one revision) removes it.
* A key whose new value is unusable (a record with a ``problem``) keeps its last valid value while it
  stays on the same lease, as Dynamo's reader keeps its last parsed instance; on another lease (or with
  no valid value before) the key counts as gone.
* The peer's data is shaped like a ``DynamoWorkerMetadata``'s ``spec.data``: the four maps
  ``endpoints``, ``model_cards``, ``event_channels``, ``event_sources`` (always present, empty when the
  instance has no such key), keyed by the key under its bucket, valued by the entry as stored. A
  client therefore reads the same document from either backend.
* What etcd cannot know is empty: no addresses, ports, labels, node or zone, and no pod. ``uid`` (the
  peer's identity in the log and in every client) is ``etcd/{instance_id:x}``, ``name`` the instance
  ID in hex, ``namespace`` empty; the state is always READY (an instance that stops serving loses its
  lease, and with it its keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.core.dynamo_keys import BUCKETS
from sidecar.core.peer import Document, Peer, PeerState
from sidecar.core.records import InstanceRecord, Record

PEER_KEY_PREFIX = "etcd/"


def instance_peer_key(instance_id: int) -> str:
    """The peer key (``Peer.uid``) of the Dynamo instance ``instance_id`` (its lease): ``etcd/{id:x}``."""
    return f"{PEER_KEY_PREFIX}{instance_id:x}"


class InstanceJoin:
    """Owns the last valid record of every key and the index from instance to keys; the directory is its
    only caller."""

    def __init__(self) -> None:
        self._records: dict[str, InstanceRecord] = {}
        self._by_instance: dict[str, set[str]] = {}  # peer key -> directory keys of its records

    def upsert(self, key: str, record: Record) -> set[str]:
        if not isinstance(record, InstanceRecord):
            return set()  # not an etcd record: another join's business
        old = self._records.get(key)
        if record.problem is not None:
            if old is not None and old.lease == record.lease:
                return set()  # the last valid value stays
            return self._unlink(key, self._records.pop(key, None))
        if old == record:
            return set()
        affected = self._unlink(key, old)
        self._records[key] = record
        peer = instance_peer_key(record.instance_id)
        self._by_instance.setdefault(peer, set()).add(key)
        affected.add(peer)
        return affected

    def delete(self, key: str) -> set[str]:
        return self._unlink(key, self._records.pop(key, None))

    def _unlink(self, key: str, record: InstanceRecord | None) -> set[str]:
        if record is None:
            return set()
        peer = instance_peer_key(record.instance_id)
        keys = self._by_instance.get(peer)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_instance[peer]
        return {peer}

    def peer(self, peer_key: str) -> Peer | None:
        keys = self._by_instance.get(peer_key)
        if not keys:
            return None
        records = [self._records[k] for k in sorted(keys)]
        maps: dict[str, dict[str, Any]] = {bucket.data_map: {} for bucket in BUCKETS}
        size = 2
        for record in records:
            maps[record.kind][record.name] = record.entry
            size += record.size + len(record.name) + 4
        instance_id = records[0].instance_id
        data: Mapping[str, Any] = maps
        return Peer(
            uid=peer_key,
            name=f"{instance_id:x}",
            namespace="",
            instance_id=instance_id,
            addresses=(),
            ports=(),
            labels={},
            state=PeerState.READY,
            document=Document(data, size),
        )
