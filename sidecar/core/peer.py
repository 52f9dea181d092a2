"""The peer as the core knows it: one ready (or draining) pod incarnation joined with its metadata.

A ``Peer`` is an immutable value. Equality is what decides whether a change in the cluster is a change
a client must hear about, so it covers exactly the fields the API exposes (``data`` compares through
its canonical JSON text, which is cheaper and exact).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sidecar.core.dynamo_entries import DynamoEntries, dynamo_entries
from sidecar.core.workers import Worker


class PeerState(enum.Enum):
    """READY takes new work; DRAINING is terminating but still serving what is under way."""

    READY = "ready"
    DRAINING = "draining"


@dataclass(frozen=True, order=True)
class PortInfo:
    """A port from an EndpointSlice (slices carry ports per slice, not per endpoint)."""

    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


def canonical_json(value: Any) -> str:
    """Stable JSON text: sorted keys, no spaces. Two documents are equal iff their texts are."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def worker_json(worker: Worker) -> dict[str, Any]:
    """A worker as plain JSON; the bootstrap port only when it has one."""
    out: dict[str, Any] = {"url": worker.url, "port": worker.port, "protocol": worker.protocol}
    if worker.bootstrap_port is not None:
        out["bootstrap_port"] = worker.bootstrap_port
    if worker.model_id:
        out["model_id"] = worker.model_id
    if worker.kv_connector:
        out["kv_connector"] = worker.kv_connector
    if worker.kv_engine_id:
        out["kv_engine_id"] = worker.kv_engine_id
    return out


class Document:
    """A JSON document (``spec.data``) with exact equality and its canonical text computed at most once.

    Python's ``==`` on dicts treats ``1``, ``1.0`` and ``true`` alike, which would hide a real change.
    Comparing canonical texts is exact but costs a serialisation per update, on the hot path. So dicts
    are compared first (fast, in C, and decisive whenever they differ) and the texts only confirm an
    apparent equality. The value is treated as immutable once wrapped.
    """

    __slots__ = ("value", "size", "_json")

    def __init__(self, value: Mapping[str, Any], size: int = 0) -> None:
        self.value = value
        self.size = size  # estimated JSON bytes (sidecar.core.bounds), for byte-bounded history; 0: unknown
        self._json: str | None = None

    @property
    def json(self) -> str:
        if self._json is None:
            self._json = canonical_json(self.value)
        return self._json

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Document):
            return NotImplemented
        return self is other or (self.value == other.value and self.json == other.json)

    def __hash__(self) -> int:
        return hash(self.json)

    def __repr__(self) -> str:
        return f"Document({self.json})"


@dataclass(frozen=True)
class Peer:
    """One peer, immutable: the join builds it, the log and every client's projection share it."""

    uid: str
    name: str
    namespace: str
    instance_id: int
    addresses: tuple[str, ...]
    ports: tuple[PortInfo, ...]
    labels: Mapping[str, str] = field(compare=False)
    state: PeerState
    document: Document
    node_name: str = ""
    zone: str = ""
    hostname: str = ""
    container: str = ""  # Dynamo's container mode: the container this peer is ("" in pod mode)
    workers: tuple[Worker, ...] = ()  # its serving processes, as a gateway registers them
    # Why workers the pod announced were skipped (bad annotations); logged by the shell, not served.
    worker_problems: tuple[str, ...] = field(default=(), compare=False)
    # Comparable stand-in for ``labels`` (a dict is neither hashable nor ordered).
    labels_key: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels_key", tuple(sorted(self.labels.items())))

    @property
    def data(self) -> Mapping[str, Any]:
        return self.document.value

    @property
    def data_json(self) -> str:
        return self.document.json

    @property
    def instance_id_hex(self) -> str:
        return format(self.instance_id, "x")

    @cached_property
    def dynamo(self) -> DynamoEntries:
        """The endpoints and models the data declares, read once per peer value (filters ask per client)."""
        return dynamo_entries(self.data)

    def to_json_dict(self) -> dict[str, Any]:
        """The peer as plain JSON (the HTTP debug endpoint and ``peers -o json`` print this)."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "instance_id": self.instance_id,
            "instance_id_hex": self.instance_id_hex,
            "state": self.state.value,
            "addresses": list(self.addresses),
            "ports": [
                {"name": p.name, "port": p.port, "protocol": p.protocol, "app_protocol": p.app_protocol}
                for p in self.ports
            ],
            "labels": dict(self.labels),
            "node_name": self.node_name,
            "zone": self.zone,
            "hostname": self.hostname,
            "container": self.container,
            "endpoints": [
                {
                    "path": str(e.path),
                    "instance_id": e.instance_id,
                    "transport_kind": e.transport_kind,
                    "transport_address": e.transport_address,
                }
                for e in self.dynamo.endpoints
            ],
            "models": [
                {"name": m.name, "path": str(m.path), "instance_id": m.instance_id, "model_suffix": m.model_suffix}
                for m in self.dynamo.models
            ],
            "workers": [worker_json(w) for w in self.workers],
            "data": self.data,
        }
