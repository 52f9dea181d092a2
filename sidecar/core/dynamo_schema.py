"""What Dynamo's runtime (1.6.1) requires of the entries in a ``DynamoWorkerMetadata``'s four maps.

Dynamo decodes each map's entries as a type-tagged enum and drops the *whole* CR when one entry does
not decode: one bad publish would make the pod invisible to every Dynamo reader, including for its
valid entries. So what this pod publishes is checked here first, and refused with the entry and the
field named. Reading stays tolerant (``sidecar.core.resources``): peers' data is carried as it is.

Checked: the map's type tag, the fields Dynamo requires and their JSON types, and the key shape
``{namespace}/{component}/{endpoint}/{instance_id:x}`` (``/{model_suffix}`` after it for a LoRA model,
``{topic}`` in place of the endpoint for event channels) agreeing with the entry. Extra fields are
carried through untouched (newer runtimes add some). ``event_sources`` entries must carry the
``EventSource`` tag; their fields are not checked, since 1.6.1 does not define them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

U64_MAX = 2**64 - 1

# map -> (type tag, {field: JSON type}, the field standing in the key's third segment)
_STR, _INT, _OBJECT, _ANY = "a string", "an unsigned 64-bit integer", "a JSON object", "present"
ENTRY_SCHEMAS: dict[str, tuple[str, dict[str, str], str | None]] = {
    "endpoints": (
        "Endpoint",
        {"namespace": _STR, "component": _STR, "endpoint": _STR, "instance_id": _INT, "transport": _OBJECT},
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


def _type_problem(value: Any, expected: str) -> str | None:
    if expected == _STR and not isinstance(value, str):
        return f"must be {expected}"
    if expected == _INT and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX):
        return f"must be {expected}"
    if expected == _OBJECT and not isinstance(value, Mapping):
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
            return f".{name} {problem}, got {type(entry[name]).__name__}"
    suffix = entry.get("model_suffix")
    if map_name == "model_cards" and suffix is not None and not isinstance(suffix, str):
        return f".model_suffix must be a string or null, got {type(suffix).__name__}"
    return None


def entry_problem(map_name: str, key: str, entry: Any) -> str | None:
    """Why Dynamo would refuse this entry of ``map_name`` in a CR, under ``key``, or None."""
    _, _, middle = ENTRY_SCHEMAS[map_name]
    where = f"spec.data.{map_name}[{key!r}]"
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
