"""Dynamo's own questions about a peer: which endpoints does it serve, which models?

A Dynamo client does not select workers by label (Dynamo-native workers put no labels on their
``DynamoWorkerMetadata``); it asks for "the instances serving ``namespace.component.endpoint``" and
reads which models they serve. Both answers are in the peer's data, the same on either backend (a CR's
``spec.data`` or the entries under an etcd lease): the ``endpoints`` map holds ``Endpoint`` entries,
the ``model_cards`` map ``Model`` entries whose card names the model.

Reading is tolerant, like the rest of the read side: an entry that is not in Dynamo's shape is
skipped here (the raw data still carries it), so one odd entry never hides the peer's valid ones.
Facts from Dynamo 1.6.1: an endpoint path is written ``ns.component.endpoint`` or
``dyn://ns.component.endpoint`` (``/`` also separates; segments past the third are joined to the
endpoint name with ``_``); an endpoint's ``transport`` is a one-key object such as
``{"tcp": "host:port/..."}`` or ``{"nats_tcp": "subject"}``; a model card's name is its
``display_name``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.dynamo_schema import U64_MAX

URL_SCHEME = "dyn://"
_SEPARATORS = re.compile(r"[./]")


class EndpointPathError(ValueError):
    """An endpoint path that names no endpoint; the message says what was expected."""


@dataclass(frozen=True, order=True)
class EndpointPath:
    """``namespace.component.endpoint``: what Dynamo calls an endpoint, without an instance."""

    namespace: str
    component: str
    endpoint: str

    def __str__(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}"


def parse_endpoint_path(text: str) -> EndpointPath:
    """Read ``ns.component.endpoint`` (or ``dyn://`` before it, or ``/`` between) as Dynamo does.

    Unlike Dynamo, which fills in defaults for a missing namespace or endpoint, a filter must name all
    three: a filter that silently meant ``dynamo.<x>.generate`` would select the wrong peers.
    """
    body = text.strip().removeprefix(URL_SCHEME)
    segments = _SEPARATORS.split(body) if body else []
    if len(segments) < 3 or not all(segments):
        raise EndpointPathError(
            f"{text!r} is not an endpoint path: expected namespace.component.endpoint "
            f"(optionally with {URL_SCHEME} before it), each part non-empty"
        )
    return EndpointPath(segments[0], segments[1], "_".join(segments[2:]))


@dataclass(frozen=True, order=True)
class DynamoEndpoint:
    """One ``Endpoint`` entry: the endpoint an instance serves and how to reach it."""

    path: EndpointPath
    instance_id: int
    transport_kind: str  # the transport's tag, e.g. "tcp", "nats_tcp"; "" when unrecognised
    transport_address: str  # its value when that is a string; "" otherwise


@dataclass(frozen=True, order=True)
class DynamoModel:
    """One ``Model`` entry: a model served at an endpoint by an instance (a LoRA adapter has a suffix)."""

    name: str
    path: EndpointPath
    instance_id: int
    model_suffix: str = ""


@dataclass(frozen=True)
class DynamoEntries:
    """What a peer's data says in Dynamo's terms, sorted, for filters and the typed fields of the API."""

    endpoints: tuple[DynamoEndpoint, ...] = ()
    models: tuple[DynamoModel, ...] = ()

    def serves(self, path: EndpointPath) -> bool:
        return any(e.path == path for e in self.endpoints)

    def has_model(self, name: str) -> bool:
        return any(m.name == name for m in self.models)


NO_ENTRIES = DynamoEntries()


def _path_of(entry: Mapping[str, Any]) -> EndpointPath | None:
    parts = (entry.get("namespace"), entry.get("component"), entry.get("endpoint"))
    if not all(isinstance(p, str) and p for p in parts):
        return None
    return EndpointPath(*parts)  # type: ignore[arg-type]  # checked just above


def _instance_id(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("instance_id")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        return None
    return value


def _transport(entry: Mapping[str, Any]) -> tuple[str, str]:
    transport = entry.get("transport")
    if not isinstance(transport, Mapping) or len(transport) != 1:
        return "", ""
    ((kind, value),) = transport.items()
    return str(kind), value if isinstance(value, str) else ""


def _model_name(entry: Mapping[str, Any]) -> str | None:
    card = entry.get("card_json")
    name = card.get("display_name") if isinstance(card, Mapping) else None
    return name if isinstance(name, str) and name else None


def _entries(data: Mapping[str, Any], map_name: str, tag: str) -> list[Mapping[str, Any]]:
    entries = data.get(map_name)
    if not isinstance(entries, Mapping):
        return []
    return [e for e in entries.values() if isinstance(e, Mapping) and e.get("type") == tag]


def dynamo_entries(data: Mapping[str, Any]) -> DynamoEntries:
    """The endpoints and models in a peer's data; entries not in Dynamo's shape are left out."""
    endpoints = set()
    for entry in _entries(data, "endpoints", "Endpoint"):
        path, instance = _path_of(entry), _instance_id(entry)
        if path is not None and instance is not None:
            endpoints.add(DynamoEndpoint(path, instance, *_transport(entry)))
    models = set()
    for entry in _entries(data, "model_cards", "Model"):
        path, instance, name = _path_of(entry), _instance_id(entry), _model_name(entry)
        suffix = entry.get("model_suffix")
        if path is not None and instance is not None and name is not None:
            models.add(DynamoModel(name, path, instance, suffix if isinstance(suffix, str) else ""))
    if not endpoints and not models:
        return NO_ENTRIES
    return DynamoEntries(tuple(sorted(endpoints)), tuple(sorted(models)))
