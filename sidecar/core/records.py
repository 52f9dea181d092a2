"""The compact records the join keeps, whatever source they were read from.

A source (EndpointSlices today, Pods or an etcd prefix later) reduces each of its objects to one of
these records as soon as it arrives, and the raw object is dropped. The join reads records only, so
a new source that says the same things (this pod is ready at these addresses; this pod incarnation
has this metadata) is a new parser and nothing else.

* ``ReadinessRecord``: which pod incarnations are ready (or draining) at which addresses and ports, and,
  when the source reads Pods, what each pod says of itself (``PodMeta``: labels, annotations).
* ``MetadataRecord``: the metadata one pod incarnation published (a ``DynamoWorkerMetadata`` CR).
* ``InstanceRecord``: one key of one Dynamo instance in etcd (``sidecar.core.dynamo_keys.read_kv``);
  the instance join (``sidecar.core.instance_join``) makes a peer of each instance's keys.
* ``RelayedPeer``: a peer already joined by a relay (``discovery-sidecar relay``), received over its
  ``WatchPeers`` stream; the relayed join (``sidecar.core.relayed_join``) passes it through.

A record whose data is unusable says so (``problem``) rather than being dropped by the source: the join
decides what to keep (the last valid data of the same pod incarnation, or of the same lease), for every
backend in the same place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.containers import pod_peer_key
from sidecar.core.peer import Document, Peer, PortInfo


@dataclass(frozen=True)
class PodMeta:
    """What a pod says of itself, kept only by sources that read Pods.

    A pod that runs no sidecar publishes no metadata record, so with ``DISCOVERY_REQUIRE_METADATA=false``
    this is all there is to know about it: its labels (which the peer then carries, and which follow a
    relabelling live) and its annotations (worker ports, bootstrap ports, model id).
    """

    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class EndpointEntry:
    """One pod incarnation's entry in one readiness record (e.g. its endpoint in an EndpointSlice)."""

    pod_uid: str
    pod_name: str
    addresses: tuple[str, ...]
    ready: bool
    serving: bool
    terminating: bool
    node_name: str = ""
    zone: str = ""
    hostname: str = ""
    # Dynamo's container mode: the container this entry is about, and the name of the metadata (CR) that
    # speaks for it (``sidecar.core.containers``). Empty in pod mode: the pod's own, named after the pod.
    container: str = ""
    metadata_name: str = ""
    pod: PodMeta | None = None  # None when the source does not read the Pod (EndpointSlices)

    @property
    def speaks_for_it(self) -> str:
        """The name of the metadata record this entry joins with."""
        return self.metadata_name or self.pod_name

    @property
    def peer_key(self) -> str:
        return pod_peer_key(self.pod_uid, self.pod_name, self.speaks_for_it)

    @property
    def live(self) -> bool:
        """Counts towards a peer: ready, or still serving while terminating (then it is draining).

        This is the one place the readiness rule lives; Kubernetes says a terminating endpoint that is
        still serving may take requests that are already on their way, so it stays as DRAINING.
        """
        return self.ready or (self.serving and self.terminating)


@dataclass(frozen=True)
class ReadinessRecord:
    """What the join keeps of one readiness object: its ports and its pod-backed endpoints."""

    name: str
    namespace: str
    resource_version: str
    ports: tuple[PortInfo, ...]
    endpoints: tuple[EndpointEntry, ...]

    @property
    def problem(self) -> str | None:
        """Readiness objects are never rejected as a whole: unusable endpoints are skipped at parse time."""
        return None


@dataclass(frozen=True)
class MetadataRecord:
    """What the join keeps of one pod incarnation's published metadata (a ``DynamoWorkerMetadata`` CR)."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    owner_pod_uids: tuple[str, ...]
    labels: Mapping[str, str]
    document: Document | None  # None when spec.data is unusable (see problem)
    problem: str | None = None  # why the data is unusable; the join then keeps this incarnation's last valid data

    @property
    def data(self) -> Mapping[str, Any] | None:
        return None if self.document is None else self.document.value

    @property
    def data_json(self) -> str:
        return "" if self.document is None else self.document.json


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
    # Why the value is unusable (``sidecar.core.dynamo_keys.read_kv``); the instance join then keeps the
    # key's last valid record while the key stays on the same lease, as Dynamo's reader keeps its last
    # parsed instance.
    problem: str | None = None


@dataclass(frozen=True)
class RelayedPeer:
    """A peer as a relay serves it: joined there (from its own watches, by the same rule), so nothing
    is left to join here. Keyed by the peer's key (``Peer.uid``)."""

    peer: Peer

    @property
    def problem(self) -> str | None:
        """A relay sends only peers that joined: never rejected here."""
        return None


Record = ReadinessRecord | MetadataRecord | InstanceRecord | RelayedPeer
"""Anything a source writes into the store."""
