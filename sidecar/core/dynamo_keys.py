"""Dynamo's key layout in etcd, both ways: entries to keys (publishing) and keys to records (watching).

Pure (no etcd client): the etcd package's source and publisher call it with keys and values as bytes.

From ``lib/runtime/src/discovery/kv_store.rs`` and ``discovery/mod.rs``:

=================  ======================  ===============================================================
map in spec.data   bucket                  key under the bucket
=================  ======================  ===============================================================
``endpoints``      ``v1/instances``        ``{namespace}/{component}/{endpoint}/{instance_id:x}``
``model_cards``    ``v1/mdc``              ``{namespace}/{component}/{endpoint}/{instance_id:x}[/{suffix}]``
``event_channels`` ``v1/event_channels``   ``{scope path}/topic/{topic}/{instance_id:x}``
``event_sources``  ``v1/event_sources``    ``{scope path}/topic/{topic}/{publisher_id:x}``
=================  ======================  ===============================================================

The value is the entry itself: the JSON of a ``DiscoveryInstance``, tagged by ``type`` (``Endpoint``,
``Model``, ``EventChannel``, ``EventSource``). The scope path is ``namespace/{ns}``,
``namespace/{ns}/component/{c}`` or ``namespace/{ns}/component/{c}/endpoint/{e}``, each segment
percent-encoded except ``[A-Za-z0-9_-]``.

Instance IDs. Endpoints and model cards carry the process's instance ID, which on this backend is its
primary lease ID; event channels and sources carry a *publisher* ID of their own (one process may
publish several), which is why an instance is recognised by the lease its keys are attached to, not
by the hex in a key. Publishing therefore rewrites ``instance_id`` in endpoint and model entries to
the lease ID (and the key with it), and keeps event channel and source IDs as given.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.bounds import measure_metadata
from sidecar.core.dynamo_schema import encode_segment as encode_segment
from sidecar.core.dynamo_schema import fields_problem, scope_path, string_field
from sidecar.core.json_decode import loads
from sidecar.core.records import InstanceRecord


@dataclass(frozen=True)
class Bucket:
    data_map: str  # the map of spec.data this bucket holds
    prefix: str  # "v1/instances/"
    type_tag: str  # the entry's "type"


ENDPOINTS = Bucket("endpoints", "v1/instances/", "Endpoint")
MODEL_CARDS = Bucket("model_cards", "v1/mdc/", "Model")
EVENT_CHANNELS = Bucket("event_channels", "v1/event_channels/", "EventChannel")
EVENT_SOURCES = Bucket("event_sources", "v1/event_sources/", "EventSource")
BUCKETS = (ENDPOINTS, MODEL_CARDS, EVENT_CHANNELS, EVENT_SOURCES)
BY_MAP = {b.data_map: b for b in BUCKETS}

# Fields Dynamo's deserializer requires in event entries (``Option`` fields and ``#[serde(default)]`` ones
# left out). Endpoint and Model entries are checked by ``sidecar.core.dynamo_schema``, shared with the CRs.
# Event entries are keyed by a scope object here (as the 1.6.1 runtime's etcd backend writes them:
# ``EventScope``), so their checks stay local.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "EventChannel": ("scope", "topic", "instance_id", "transport"),
    "EventSource": ("scope", "topic", "publisher_id", "metadata"),
}
U64_MAX = 2**64 - 1


def bucket_of(key: str) -> Bucket | None:
    for bucket in BUCKETS:
        if key.startswith(bucket.prefix):
            return bucket
    return None


def _u64(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value!r}")
    return value


def entry_problem(bucket: Bucket, entry: Any) -> str | None:
    """Why Dynamo would refuse ``entry`` as a value of ``bucket``, or None."""
    if bucket in (ENDPOINTS, MODEL_CARDS):
        problem = fields_problem(bucket.data_map, entry)
        return None if problem is None else f"the entry{problem}"
    if not isinstance(entry, Mapping):
        return f"must be a JSON object, got {type(entry).__name__}"
    tag = entry.get("type")
    if tag != bucket.type_tag:
        return f"type must be {bucket.type_tag!r} under {bucket.prefix}, got {tag!r}"
    missing = [f for f in REQUIRED_FIELDS[bucket.type_tag] if entry.get(f) is None]
    if missing:
        return f"{bucket.type_tag} lacks {', '.join(missing)}"
    try:
        scope_path(entry.get("scope"))
        string_field(entry, "topic", "entry")
        _u64(entry, "instance_id" if bucket is EVENT_CHANNELS else "publisher_id")
    except ValueError as exc:
        return str(exc)
    return None


def entry_key(bucket: Bucket, entry: Mapping[str, Any]) -> str:
    """The full etcd key of a valid entry (``entry_problem`` is None), as Dynamo builds it."""
    if bucket in (ENDPOINTS, MODEL_CARDS):
        key = f"{entry['namespace']}/{entry['component']}/{entry['endpoint']}/{entry['instance_id']:x}"
        suffix = entry.get("model_suffix")
        if bucket is MODEL_CARDS and suffix:
            key = f"{key}/{suffix}"
        return bucket.prefix + key
    ident = entry["instance_id"] if bucket is EVENT_CHANNELS else entry["publisher_id"]
    return f"{bucket.prefix}{scope_path(entry['scope'])}/topic/{encode_segment(entry['topic'])}/{ident:x}"


def encode_value(entry: Mapping[str, Any]) -> bytes:
    """The value as Dynamo's serde_json writes it: compact JSON, keys in the entry's order."""
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class DocumentError(ValueError):
    """The metadata document cannot be registered; the message says which entry and why."""


def registration_keys(document: Mapping[str, Any], instance_id: int) -> dict[str, bytes]:
    """Every key and value this instance registers for ``document`` (shaped like ``spec.data``).

    Endpoint and model entries are re-keyed to ``instance_id`` (their ``instance_id`` field too, so the
    value and the key agree, as they do when Dynamo writes them); event channels and sources keep their
    own publisher IDs. The map keys of the document are not used: the etcd key is built from the entry,
    as Dynamo builds it. Content other than the four maps has no place in etcd and is ignored.
    Raises ``DocumentError`` naming the first entry Dynamo would refuse, or two entries with one key.
    """
    out: dict[str, bytes] = {}
    origin: dict[str, str] = {}
    for bucket in BUCKETS:
        entries = document.get(bucket.data_map)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise DocumentError(f"{bucket.data_map} must be a JSON object, got {type(entries).__name__}")
        for name, raw in entries.items():
            entry: Any = raw
            if isinstance(raw, Mapping) and bucket in (ENDPOINTS, MODEL_CARDS) and raw.get("type") == bucket.type_tag:
                entry = {**copy.deepcopy(dict(raw)), "instance_id": instance_id}
            problem = entry_problem(bucket, entry)
            if problem:
                raise DocumentError(f"{bucket.data_map}[{name!r}]: {problem}")
            key = entry_key(bucket, entry)
            if key in out:
                raise DocumentError(
                    f"{bucket.data_map}[{name!r}] and {origin[key]} both register {key}: one key holds one entry"
                )
            try:
                out[key] = encode_value(entry)
            except ValueError as exc:  # NaN or infinity: not JSON
                raise DocumentError(f"{bucket.data_map}[{name!r}]: {exc}") from exc
            origin[key] = f"{bucket.data_map}[{name!r}]"
    return out


def read_kv(key: bytes, value: bytes, lease: int) -> InstanceRecord | None:
    """What a source hands the store for one etcd key: ``parse_kv``'s record, or for a bad value a record
    that carries only the problem (``InstanceRecord.problem``), so the join decides what the key keeps.
    None for keys outside the four buckets."""
    try:
        return parse_kv(key, value, lease)
    except BadValue as exc:
        text = key.decode(errors="replace")
        bucket = bucket_of(text)
        return InstanceRecord(
            instance_id=lease,
            kind=bucket.data_map if bucket else "",
            key=text,
            name=text[len(bucket.prefix) :] if bucket else text,
            entry={},
            lease=lease,
            problem=str(exc),
        )


def decode_entry(bucket: Bucket, value: bytes) -> tuple[Mapping[str, Any] | None, int, str | None]:
    """(the entry, its estimated JSON size, None) or (None, 0, why it is unusable) for one etcd value."""
    try:
        entry = loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, 0, f"not JSON ({type(exc).__name__}: {str(exc)[:80]})"
    problem = entry_problem(bucket, entry)
    if problem:
        return None, 0, problem
    bound, size = measure_metadata(entry)
    if bound:
        return None, 0, f"the entry {bound}"
    return entry, size, None


class BadValue(ValueError):
    """A value under a ``v1/`` bucket that Dynamo would not read: ``str()`` says why."""


def parse_kv(key: bytes, value: bytes, lease: int) -> InstanceRecord | None:
    """The record of one etcd key; None for keys outside the four buckets. Raises ``BadValue``.

    The etcd twin of ``sidecar.core.resources``' parsers: what the source hands the store.
    """
    try:
        text = key.decode()
    except UnicodeDecodeError as exc:
        raise BadValue(f"the key is not UTF-8 ({exc.reason})") from exc
    bucket = bucket_of(text)
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
