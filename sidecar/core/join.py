"""The peer join: readiness records x metadata records, keyed by pod incarnation (UID).

This is where "who is a peer" is decided. A pod is a peer when

* some readiness record (an EndpointSlice today) lists it, by pod UID, as live (``EndpointEntry.live``:
  ready, or serving and terminating, which makes it *draining*), and
* the metadata record (a ``DynamoWorkerMetadata``) *named after that pod*, in its namespace, names that
  same pod UID as its owner and has had valid data (Dynamo's rule: the CR named after the pod, whose
  Pod owner has the pod's UID).

Matching on the UID, not only the name, is what keeps a stale CR of an earlier pod with the same name
from joining the new pod. Requiring the name is what keeps a CR that claims other pods as owners (an
extra ownerReference added to it) from lending its data to them: only the CR named after a pod ever
speaks for it, and only the pod's own service account may write that CR (manifests/admission-policy.yaml).
A readiness entry that does not name its pod therefore never joins.

With ``require_metadata=False`` (``DISCOVERY_REQUIRE_METADATA=false``, for pods that run no sidecar,
as SGLang workers do) the second condition is dropped: a live pod without a usable CR is a peer whose
labels are what its readiness source says of the pod (a Pods source: the pod's own labels, so a
relabelling is followed live), with empty data. A pod that has its CR still joins with it, as above.

Every peer carries its workers (``sidecar.core.workers``), computed from its primary address, its
pod's annotations when the source reads Pods, and the sidecar's ``WorkerPolicy``.

A pod listed by several readiness records (several Services, address families, or a pod in transit
between slices during resharding) is one peer: its entries are reference-counted per record and it
stays until the last record drops it.

In Dynamo's container mode (``sidecar.core.containers``) a readiness entry is about one container and
names the metadata that speaks for it (``{pod}-{container}``, or the pod's own name for its main
container): each such container is a peer of its own, keyed ``{pod UID}/{container}`` (the main
container keeps the pod's key), joined by the same rule with the CR of that name owned by the pod UID.

The join knows records, not sources: keys are opaque strings chosen by the caller (the directory
prefixes them with the source's name), and a record's type says which side of the join it feeds.
It only records state and answers "what is peer X now"; turning changes into events is
``sidecar.core.directory``'s job. Every mutator returns the UIDs whose peer may have changed.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.core.instance_id import instance_id
from sidecar.core.peer import Document, Peer, PeerState, PortInfo
from sidecar.core.records import EndpointEntry, MetadataRecord, ReadinessRecord, Record
from sidecar.core.workers import PodView, WorkerPolicy, pod_workers

NO_DATA = Document({}, 2)
"""The data of a peer that published none (``require_metadata=False``)."""


class Join(Protocol):
    """What the directory needs of a join rule: keyed records in, peers (by peer key) out."""

    def upsert(self, key: str, record: Record) -> set[str]: ...

    def delete(self, key: str) -> set[str]: ...

    def peer(self, peer_key: str) -> Peer | None: ...


class PeerJoin:
    """The Kubernetes join rule. Owns every record it was given; the directory is its only caller."""

    def __init__(self, require_metadata: bool = True, workers: WorkerPolicy | None = None) -> None:
        self.require_metadata = require_metadata
        self.worker_policy = workers if workers is not None else WorkerPolicy()
        self._readiness: dict[str, ReadinessRecord] = {}
        # peer key (the pod UID, or {uid}/{container}) -> readiness key -> its entry in that record (the
        # reference count is len()).
        self._entries: dict[str, dict[str, EndpointEntry]] = {}
        self._peer_keys_by_pod: dict[str, set[str]] = {}  # pod UID -> peer keys with entries (container mode: several)
        self._metadata: dict[str, MetadataRecord] = {}
        self._metadata_by_pod: dict[str, set[str]] = {}  # pod UID -> metadata keys owned by it
        # metadata key -> the last record under that key with valid data, kept while the record keeps
        # the same owners (the same pod incarnation): an update with invalid data falls back to it.
        self._last_valid: dict[str, MetadataRecord] = {}

    # -- records in ----------------------------------------------------------------------------------
    def upsert(self, key: str, record: Record) -> set[str]:
        if isinstance(record, ReadinessRecord):
            return self._upsert_readiness(key, record)
        if isinstance(record, MetadataRecord):
            return self._upsert_metadata(key, record)
        return set()  # an etcd instance's key: the instance join's business (core.instance_join)

    def delete(self, key: str) -> set[str]:
        if key in self._readiness:
            return self._drop_entries(key, self._readiness.pop(key))
        self._last_valid.pop(key, None)
        return self._unlink_metadata(key, self._metadata.pop(key, None))

    def _upsert_readiness(self, key: str, record: ReadinessRecord) -> set[str]:
        old = self._readiness.get(key)
        if old == record:
            return set()
        affected = self._drop_entries(key, old)
        self._readiness[key] = record
        for entry in record.endpoints:
            peer = entry.peer_key
            self._entries.setdefault(peer, {})[key] = entry
            self._peer_keys_by_pod.setdefault(entry.pod_uid, set()).add(peer)
            affected.add(peer)
        return affected

    def _drop_entries(self, key: str, record: ReadinessRecord | None) -> set[str]:
        if record is None:
            return set()
        affected = set()
        for entry in record.endpoints:
            peer = entry.peer_key
            per_record = self._entries.get(peer)
            if per_record is not None and per_record.pop(key, None) is not None:
                affected.add(peer)
                if not per_record:
                    del self._entries[peer]
                    keys = self._peer_keys_by_pod.get(entry.pod_uid)
                    if keys is not None:
                        keys.discard(peer)
                        if not keys:
                            del self._peer_keys_by_pod[entry.pod_uid]
        return affected

    def _upsert_metadata(self, key: str, record: MetadataRecord) -> set[str]:
        old = self._metadata.get(key)
        if old == record:
            return set()
        affected = self._unlink_metadata(key, old)
        self._metadata[key] = record
        for pod_uid in record.owner_pod_uids:
            self._metadata_by_pod.setdefault(pod_uid, set()).add(key)
            affected |= self._peer_keys_of(pod_uid)
        if record.problem is None:
            self._last_valid[key] = record
        else:
            last = self._last_valid.get(key)
            if last is not None and last.owner_pod_uids != record.owner_pod_uids:
                del self._last_valid[key]  # another incarnation's data never carries over
        return affected

    def _peer_keys_of(self, pod_uid: str) -> set[str]:
        """The peers a pod's metadata may feed: its own key, and its containers' in container mode."""
        return {pod_uid} | self._peer_keys_by_pod.get(pod_uid, set())

    def _unlink_metadata(self, key: str, record: MetadataRecord | None) -> set[str]:
        if record is None:
            return set()
        affected: set[str] = set()
        for pod_uid in record.owner_pod_uids:
            keys = self._metadata_by_pod.get(pod_uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._metadata_by_pod[pod_uid]
            affected |= self._peer_keys_of(pod_uid)
        return affected

    # -- the join ------------------------------------------------------------------------------------
    def known_pod_uids(self) -> set[str]:
        return set(self._peer_keys_by_pod) | set(self._metadata_by_pod)

    def _metadata_for(self, pod_uid: str, name: str, namespaces: set[str]) -> MetadataRecord | None:
        """The metadata of this incarnation: its CR's current record when valid, else the last valid one.

        Its CR is the one named ``name`` (after the pod, or ``{pod}-{container}`` in container mode), in
        the pod's namespace (that of the readiness records listing it), that lists the pod's UID among its
        owners; no other CR ever lends a pod data, whatever owners it claims. (Two such records can only
        come from two sources; the smallest key wins, so the choice is stable.)
        """
        keys = self._metadata_by_pod.get(pod_uid)
        if not keys or not name:
            return None
        named = [k for k in keys if self._metadata[k].name == name and self._metadata[k].namespace in namespaces]
        if not named:
            return None
        key = min(named)
        current = self._metadata[key]
        if current.problem is None:
            return current
        fallback = self._last_valid.get(key)
        return fallback if fallback is not None and pod_uid in fallback.owner_pod_uids else None

    def peer(self, peer_key: str) -> Peer | None:
        """The peer ``peer_key`` (a pod UID, or ``{uid}/{container}``), or None when it is not one."""
        per_record = self._entries.get(peer_key)
        if not per_record:
            return None
        entries = [per_record[k] for k in sorted(per_record)]
        live = [e for e in entries if e.live]
        if not live:
            return None
        pod_uid = entries[0].pod_uid
        name = next((e.speaks_for_it for e in entries if e.speaks_for_it), "")
        metadata = self._metadata_for(pod_uid, name, {self._readiness[k].namespace for k in per_record})
        pod = next((e.pod for e in live if e.pod is not None), None)
        if metadata is not None and metadata.document is not None:
            namespace, labels, document = metadata.namespace, metadata.labels, metadata.document
        elif self.require_metadata or not name:
            return None
        else:  # a pod that speaks for itself: its own labels, no data
            namespace, labels, document = self._readiness[min(per_record)].namespace, {}, NO_DATA
            if pod is not None:
                labels = pod.labels
        state = PeerState.READY if any(e.ready for e in live) else PeerState.DRAINING
        ports: set[PortInfo] = set()
        for key in per_record:
            ports.update(self._readiness[key].ports)
        first = live[0]
        workers, problems = pod_workers(
            PodView(
                address=next((a for e in live for a in e.addresses), ""),
                namespace=namespace,
                labels=pod.labels if pod is not None else labels,
                annotations=pod.annotations if pod is not None else {},
                declared_ports=[p.port for p in ports],
            ),
            self.worker_policy,
        )
        return Peer(
            uid=peer_key,
            name=name,  # the name of the CR that speaks (or would speak) for it
            namespace=namespace,
            instance_id=instance_id(name),
            addresses=tuple(sorted({a for e in live for a in e.addresses})),
            ports=tuple(sorted(ports)),
            labels=labels,
            state=state,
            document=document,
            node_name=first.node_name,
            zone=first.zone,
            hostname=first.hostname,
            container=first.container,
            workers=workers,
            worker_problems=problems,
        )
