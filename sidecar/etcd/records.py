"""What the etcd source writes into its store: one record per key under Dynamo's ``v1/`` buckets.

``InstanceRecord`` is a proposal for ``sidecar.core.records`` (next to ``ReadinessRecord`` and
``MetadataRecord``, and in the ``Record`` union): it is pure data, with no etcd type in it. Until it
moves there, ``InstanceStore`` is the narrow store protocol the source writes through; the hub's store
satisfies it as soon as ``Record`` includes ``InstanceRecord`` (its methods accept any ``Record``).

The join rule it calls for (``sidecar.etcd.join.InstanceJoin``): a peer is one instance, i.e. one
lease, carrying the entries of all its keys, grouped into the four maps of a ``DynamoWorkerMetadata``'s
``spec.data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.etcd.keys import Bucket, bucket_of, decode_entry


@dataclass(frozen=True)
class InstanceRecord:
    """One key of one Dynamo instance (one process, one lease) in etcd.

    ``instance_id`` is the key's lease ID: Dynamo attaches every key of a process to its primary lease
    and uses the lease ID as the process's instance ID. (A key without a lease, which Dynamo never
    writes, is attributed to the instance ID its value names.) ``name`` is the key relative to its
    bucket, which is also the key of the entry in the ``spec.data`` map ``kind``.
    """

    instance_id: int
    kind: str  # "endpoints", "model_cards", "event_channels" or "event_sources"
    key: str  # the full etcd key
    name: str  # the key under its bucket, e.g. "demo/backend/generate/1b8ffc03f93bc5"
    entry: Mapping[str, Any] = field(compare=False)  # the decoded value (compared through entry_json)
    entry_json: bytes = b""  # the value as stored (exact comparison)
    size: int = 0  # estimated JSON bytes (sidecar.core.bounds)
    lease: int = 0

    @property
    def problem(self) -> str | None:
        """Unusable values never become records (the source logs and skips them)."""
        return None


class InstanceStore(Protocol):
    """The writer side of the peer directory for the etcd source (``sidecar.ports.SourceStore``, narrowed)."""

    def upsert(self, key: str, record: InstanceRecord, received: float | None = None) -> None: ...

    def delete(self, key: str, received: float | None = None) -> None: ...

    def replace(self, records: Mapping[str, InstanceRecord], received: float | None = None) -> int: ...

    def set_health(self, healthy: bool, reason: str = "") -> None: ...


class BadValue(ValueError):
    """A value under a ``v1/`` bucket that Dynamo would not read: ``str()`` says why."""


def parse_kv(key: bytes, value: bytes, lease: int) -> InstanceRecord | None:
    """The record of one etcd key; None for keys outside the four buckets. Raises ``BadValue``."""
    try:
        text = key.decode()
    except UnicodeDecodeError as exc:
        raise BadValue(f"the key is not UTF-8 ({exc.reason})") from exc
    bucket: Bucket | None = bucket_of(text)
    if bucket is None:
        return None
    entry, size, problem = decode_entry(bucket, value)
    if problem or entry is None:
        raise BadValue(problem or "unusable value")
    instance_id = lease
    if not instance_id:
        ident = entry.get("publisher_id" if bucket.type_tag == "EventSource" else "instance_id")
        instance_id = ident if isinstance(ident, int) else 0
    if not instance_id:
        raise BadValue("the key has no lease and its value names no instance")
    return InstanceRecord(
        instance_id=instance_id,
        kind=bucket.data_map,
        key=text,
        name=text[len(bucket.prefix) :],
        entry=entry,
        entry_json=bytes(value),
        size=size,
        lease=lease,
    )
