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
from typing import Any


class PeerState(enum.Enum):
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


@dataclass(frozen=True)
class Peer:
    uid: str
    name: str
    namespace: str
    instance_id: int
    addresses: tuple[str, ...]
    ports: tuple[PortInfo, ...]
    labels: Mapping[str, str] = field(compare=False)
    state: PeerState
    data: Mapping[str, Any] = field(compare=False)
    data_json: str
    node_name: str = ""
    zone: str = ""
    hostname: str = ""
    # Comparable stand-in for ``labels`` (a dict is neither hashable nor ordered).
    labels_key: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels_key", tuple(sorted(self.labels.items())))

    @property
    def instance_id_hex(self) -> str:
        return format(self.instance_id, "x")

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
            "data": self.data,
        }
