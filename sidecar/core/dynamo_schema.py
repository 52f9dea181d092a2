"""What Dynamo's runtime (1.6.1) requires of the entries in a ``DynamoWorkerMetadata``'s four maps.

Dynamo decodes each map's entries as a type-tagged enum and drops the *whole* CR when one entry does
not decode: one bad publish would make the pod invisible to every Dynamo reader, including for its
valid entries. So what this pod publishes is checked here first, and refused with the entry and the
field named. Reading stays tolerant (``sidecar.core.resources``): peers' data is carried as it is.

Checked: the map's type tag, the fields Dynamo requires and their JSON types, and the key shape
``{namespace}/{component}/{endpoint}/{instance_id:x}`` (``/{model_suffix}`` after it for a LoRA model)
agreeing with the entry. Event channels come in two shapes: the 1.6.1 runtime writes a ``scope``
object (and, in CRs, ``namespace``/``component`` beside it) keyed by the scope's path,
``namespace/{ns}[/component/{c}[/endpoint/{e}]]/topic/{topic}/{instance_id:x}`` (seen in the CRs and etcd
keys it writes; the same path as under etcd's ``v1/event_channels/``); older runtimes wrote
``namespace``/``component``/``topic`` keyed ``{namespace}/{component}/{topic}/{instance_id:x}``. Extra fields are
carried through untouched (newer runtimes add some). ``event_sources`` entries must carry the
``EventSource`` tag; their fields are not checked, since 1.6.1 does not define them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

U64_MAX = 2**64 - 1

# map -> (type tag, {field: JSON type}, the field standing in the key's third segment)
_STR, _INT, _OBJECT, _ANY = "a string", "an unsigned 64-bit integer", "a JSON object", "present"
# An endpoint's transport is an externally tagged enum in Dynamo: one key, the kind ({"tcp": "host:port/..."}).
# An empty object does not decode (checked with the 1.6.1 runtime: the whole CR is dropped).
_TRANSPORT = 'an object with one key, the transport kind (e.g. {"tcp": "host:port/..."})'

ENTRY_SCHEMAS: dict[str, tuple[str, dict[str, str], str | None]] = {
    "endpoints": (
        "Endpoint",
        {"namespace": _STR, "component": _STR, "endpoint": _STR, "instance_id": _INT, "transport": _TRANSPORT},
        "endpoint",
    ),
    "model_cards": (
        "Model",
        {"namespace": _STR, "component": _STR, "endpoint": _STR, "instance_id": _INT, "card_json": _ANY},
        "endpoint",
    ),
    "event_channels": (
        "EventChannel",
        {"namespace": _STR, "component": _STR, "topic": _STR, "instance_id": _INT, "transport": _OBJECT},
        "topic",
    ),
    "event_sources": ("EventSource", {}, None),
}


def encode_segment(value: str) -> str:
    """Dynamo's ``encode_event_segment``: percent-encode every byte but ``[A-Za-z0-9_-]``."""
    out = []
    for byte in value.encode():
        char = chr(byte)
        if char.isascii() and (char.isalnum() or char in "-_"):
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def scope_path(scope: Any) -> str:
    """``EventScope::path_prefix``; raises ValueError for a scope Dynamo would not deserialize."""
    if not isinstance(scope, Mapping):
        raise ValueError(f"scope must be an object, got {type(scope).__name__}")
    kind = scope.get("kind")
    if kind == "namespace":
        return f"namespace/{encode_segment(string_field(scope, 'name', 'scope'))}"
    if kind == "component":
        return (
            f"namespace/{encode_segment(string_field(scope, 'namespace', 'scope'))}"
            f"/component/{encode_segment(string_field(scope, 'component', 'scope'))}"
        )
    if kind == "endpoint":
        endpoint = scope.get("endpoint")
        if not isinstance(endpoint, Mapping):
            raise ValueError("scope.endpoint must be an object")
        return (
            f"namespace/{encode_segment(string_field(endpoint, 'namespace', 'scope.endpoint'))}"
            f"/component/{encode_segment(string_field(endpoint, 'component', 'scope.endpoint'))}"
            f"/endpoint/{encode_segment(string_field(endpoint, 'name', 'scope.endpoint'))}"
        )
    raise ValueError(f"scope.kind must be namespace, component or endpoint, got {kind!r}")


def string_field(obj: Mapping[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{where}.{name} must be a string, got {type(value).__name__}")
    return value


def _type_problem(value: Any, expected: str) -> str | None:
    if expected == _STR and not isinstance(value, str):
        return f"must be {expected}"
    if expected == _INT and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX):
        return f"must be {expected}"
    if expected == _OBJECT and not isinstance(value, Mapping):
        return f"must be {expected}"
    if expected == _TRANSPORT and (not isinstance(value, Mapping) or len(value) != 1):
        return f"must be {expected}"
    return None


def _key_problem(key: str, entry: Mapping[str, Any], middle: str) -> str | None:
    expected = f"{entry['namespace']}/{entry['component']}/{entry[middle]}/{entry['instance_id']:x}"
    suffix = entry.get("model_suffix")
    if isinstance(suffix, str) and suffix:
        expected += f"/{suffix}"
    if key != expected:
        return f"the key must be {expected!r} (namespace/component/{middle}/instance_id in hex), got {key!r}"
    return None


def fields_problem(map_name: str, entry: Any) -> str | None:
    """Why Dynamo would not decode ``entry`` as an entry of ``map_name`` (tag, required fields, their types).

    Shared by both backends: an entry of a CR's map and the value of an etcd key are the same JSON
    (``sidecar.core.dynamo_keys`` calls this for endpoints and model cards). The answer names the field
    relative to the entry (``.namespace must be a string, got int``); ``entry_problem`` adds where.
    """
    tag, fields, _ = ENTRY_SCHEMAS[map_name]
    if not isinstance(entry, Mapping):
        return f" must be a JSON object, got {type(entry).__name__}"
    if entry.get("type") != tag:
        return f".type must be {tag!r} (Dynamo tags each {map_name} entry so), got {entry.get('type')!r}"
    for name, expected in fields.items():
        if name not in entry or (expected != _ANY and entry[name] is None):
            return f".{name} is missing (Dynamo requires it in an {tag} entry)"
        problem = _type_problem(entry[name], expected)
        if problem:
            value = entry[name]
            got = f"an object with {len(value)} keys" if isinstance(value, Mapping) else type(value).__name__
            return f".{name} {problem}, got {got}"
    suffix = entry.get("model_suffix")
    if map_name == "model_cards" and suffix is not None and not isinstance(suffix, str):
        return f".model_suffix must be a string or null, got {type(suffix).__name__}"
    return None


def scoped_channel_problem(entry: Mapping[str, Any]) -> str | None:
    """Why a 1.6.1-shaped event channel (with ``scope``) would not decode, relative to the entry; or None."""
    try:
        scope_path(entry.get("scope"))
        string_field(entry, "topic", "entry")
    except ValueError as exc:
        return f".{str(exc).removeprefix('entry.')}"
    for name, expected in (("instance_id", _INT), ("transport", _OBJECT)):
        if entry.get(name) is None:
            return f".{name} is missing (Dynamo requires it in an EventChannel entry)"
        problem = _type_problem(entry[name], expected)
        if problem:
            return f".{name} {problem}, got {type(entry[name]).__name__}"
    return None


def scoped_channel_key(entry: Mapping[str, Any]) -> str:
    """The key of a valid scoped event channel: its scope's path, topic and ID, as Dynamo builds it."""
    return f"{scope_path(entry['scope'])}/topic/{encode_segment(entry['topic'])}/{entry['instance_id']:x}"


def entry_problem(map_name: str, key: str, entry: Any) -> str | None:
    """Why Dynamo would refuse this entry of ``map_name`` in a CR, under ``key``, or None."""
    _, _, middle = ENTRY_SCHEMAS[map_name]
    where = f"spec.data.{map_name}[{key!r}]"
    if map_name == "event_channels" and isinstance(entry, Mapping) and "scope" in entry:
        if entry.get("type") != "EventChannel":
            tag = entry.get("type")
            return f"{where}.type must be 'EventChannel' (Dynamo tags each event_channels entry so), got {tag!r}"
        problem = scoped_channel_problem(entry)
        if problem:
            return f"{where}{problem}"
        expected = scoped_channel_key(entry)
        if key != expected:
            why = "the scope's path, /topic/{topic}/, the instance_id in hex"
            return f"{where}: the key must be {expected!r} ({why}), got {key!r}"
        return None
    problem = fields_problem(map_name, entry)
    if problem:
        return f"{where}{problem}"
    if middle is not None:
        problem = _key_problem(key, entry, middle)
        if problem:
            return f"{where}: {problem}"
    return None


def dynamo_metadata_problem(data: Mapping[str, Any]) -> str | None:
    """The first entry of ``data``'s four maps that Dynamo would refuse, with why; None when all decode."""
    for map_name in ENTRY_SCHEMAS:
        entries = data.get(map_name)
        if not isinstance(entries, Mapping):
            continue  # null or missing is empty; a non-object map is reported by validate_worker_data
        for key, entry in entries.items():
            problem = entry_problem(map_name, key, entry)
            if problem:
                return problem
    return None
