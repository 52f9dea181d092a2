"""The peer join: EndpointSlice readiness x DynamoWorkerMetadata, keyed by pod incarnation (UID).

A pod is a peer when

* some EndpointSlice lists it (by ``targetRef.uid``) as ready, or as serving and terminating
  (then it is *draining*), and
* a ``DynamoWorkerMetadata`` names that same pod UID as its owner and has had valid ``spec.data``.

Matching on the UID, not the name, is what keeps a stale CR of an earlier pod with the same name from
joining the new pod. A pod listed by several slices (several Services, address families, or a pod in
transit between slices during resharding) is one peer: its entries are reference-counted per slice and
it stays until the last slice drops it.

The join only records state and answers "what is peer X now"; turning changes into events is
``sidecar.core.directory``'s job. Every mutator returns the UIDs whose peer may have changed.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.core.instance_id import instance_id
from sidecar.core.peer import Peer, PeerState, PortInfo
from sidecar.core.resources import EndpointEntry, SliceView, WorkerMetadata


class PeerJoin:
    def __init__(self) -> None:
        self._slices: dict[str, SliceView] = {}
        # pod UID -> slice key -> the pod's entry in that slice (the reference count is len()).
        self._entries: dict[str, dict[str, EndpointEntry]] = {}
        self._metadata: dict[str, WorkerMetadata] = {}  # CR key (namespace/name) -> record
        self._metadata_by_pod: dict[str, set[str]] = {}  # pod UID -> CR keys owned by it
        # CR key -> the last record of that CR with valid data, kept while the CR keeps the same owners
        # (the same pod incarnation): an update with invalid data falls back to it.
        self._last_valid: dict[str, WorkerMetadata] = {}

    # -- EndpointSlices -------------------------------------------------------------------------
    def upsert_slice(self, key: str, view: SliceView) -> set[str]:
        old = self._slices.get(key)
        if old == view:
            return set()
        affected = self._drop_slice_entries(key, old)
        self._slices[key] = view
        for entry in view.endpoints:
            self._entries.setdefault(entry.pod_uid, {})[key] = entry
            affected.add(entry.pod_uid)
        return affected

    def delete_slice(self, key: str) -> set[str]:
        return self._drop_slice_entries(key, self._slices.pop(key, None))

    def _drop_slice_entries(self, key: str, view: SliceView | None) -> set[str]:
        if view is None:
            return set()
        affected = set()
        for entry in view.endpoints:
            per_slice = self._entries.get(entry.pod_uid)
            if per_slice is not None and per_slice.pop(key, None) is not None:
                affected.add(entry.pod_uid)
                if not per_slice:
                    del self._entries[entry.pod_uid]
        return affected

    def slice_keys(self) -> set[str]:
        return set(self._slices)

    def slice(self, key: str) -> SliceView | None:
        return self._slices.get(key)

    # -- DynamoWorkerMetadata ------------------------------------------------------------------------
    def upsert_metadata(self, key: str, record: WorkerMetadata) -> set[str]:
        old = self._metadata.get(key)
        if old == record:
            return set()
        affected = self._unlink_metadata(key, old)
        self._metadata[key] = record
        for pod_uid in record.owner_pod_uids:
            self._metadata_by_pod.setdefault(pod_uid, set()).add(key)
            affected.add(pod_uid)
        if record.data_error is None:
            self._last_valid[key] = record
        else:
            last = self._last_valid.get(key)
            if last is not None and last.owner_pod_uids != record.owner_pod_uids:
                del self._last_valid[key]  # another incarnation's data never carries over
        return affected

    def delete_metadata(self, key: str) -> set[str]:
        self._last_valid.pop(key, None)
        return self._unlink_metadata(key, self._metadata.pop(key, None))

    def _unlink_metadata(self, key: str, record: WorkerMetadata | None) -> set[str]:
        if record is None:
            return set()
        for pod_uid in record.owner_pod_uids:
            keys = self._metadata_by_pod.get(pod_uid)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._metadata_by_pod[pod_uid]
        return set(record.owner_pod_uids)

    def metadata_keys(self) -> set[str]:
        return set(self._metadata)

    def metadata(self, key: str) -> WorkerMetadata | None:
        return self._metadata.get(key)

    # -- the join ------------------------------------------------------------------------------------
    def known_pod_uids(self) -> set[str]:
        return set(self._entries) | set(self._metadata_by_pod)

    def _metadata_for(self, pod_uid: str, pod_name: str) -> WorkerMetadata | None:
        """The metadata of this incarnation: its CR's current record when valid, else the last valid one.

        Should two CRs claim one pod, the one named after the pod (Dynamo's convention) wins.
        """
        keys = self._metadata_by_pod.get(pod_uid)
        if not keys:
            return None
        key = min(keys, key=lambda k: (self._metadata[k].name != pod_name, self._metadata[k].name, k))
        current = self._metadata[key]
        if current.data_error is None:
            return current
        fallback = self._last_valid.get(key)
        return fallback if fallback is not None and pod_uid in fallback.owner_pod_uids else None

    def peer(self, pod_uid: str) -> Peer | None:
        per_slice = self._entries.get(pod_uid)
        if not per_slice:
            return None
        entries = [per_slice[k] for k in sorted(per_slice)]
        live = [e for e in entries if e.ready or (e.serving and e.terminating)]
        if not live:
            return None
        pod_name = entries[0].pod_name
        metadata = self._metadata_for(pod_uid, pod_name)
        if metadata is None:
            return None
        state = PeerState.READY if any(e.ready for e in live) else PeerState.DRAINING
        ports: set[PortInfo] = set()
        for key in per_slice:
            ports.update(self._slices[key].ports)
        first = live[0]
        assert metadata.document is not None  # _metadata_for only returns valid records
        return Peer(
            uid=pod_uid,
            name=pod_name or metadata.name,
            namespace=metadata.namespace,
            instance_id=instance_id(metadata.name),
            addresses=tuple(sorted({a for e in live for a in e.addresses})),
            ports=tuple(sorted(ports)),
            labels=metadata.labels,
            state=state,
            document=metadata.document,
            node_name=first.node_name,
            zone=first.zone,
            hostname=first.hostname,
        )

    def peers(self, pod_uids: Iterable[str]) -> dict[str, Peer | None]:
        return {uid: self.peer(uid) for uid in pod_uids}
