"""The watch of this pod's own ``DynamoWorkerMetadata``, which runs whatever ``DISCOVERY_WATCH`` says.

A pod that never asks for its peers holds no peer watch (``DISCOVERY_WATCH=auto``), yet its registration
can still be deleted, altered or taken over from under it; without a watch it would learn so only at its
next resync, and meanwhile every reader drops it while ``/readyz`` says 200. So the sidecar always follows
its own CR, and only it: one watch of the CR collection of its namespace with
``fieldSelector=metadata.name=<its CR>``. The API server sends such a watch the events of that one object
and a bookmark about once a minute, nothing of the other pods' CRs (its cost is measured in
``bench/COST_MODEL.md``).

It is a ``Reflector`` like the peer watches (streaming or paged initial list, resume from the
resourceVersion with bookmarks, 410 -> relist, silence detection, backoff), with two differences: its
events go to the registrar (``Registrar.observe``, the reflector's observer), and its store keeps no
peers: it hands the registrar what each (re)list found, since a relist is not a stream of events (a CR
deleted while the watch was down shows only as missing from the list).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sidecar.core.records import MetadataRecord, Record
from sidecar.kube.api import KubeApi
from sidecar.kube.reflector import Reflector, WatchObserver
from sidecar.kube.sources import own_registration_target
from sidecar.metrics import Metrics

RelistObserver = Callable[[MetadataRecord | None], None]
"""Told what a (re)list of the own CR found: its record, or None when there is no such CR."""


class OwnRegistrationStore:
    """The ``SourceStore`` of the own-CR watch: no peers, only what each relist found (for the registrar)
    and whether the watch reaches the API server (read by the registrar from other threads)."""

    def __init__(self, on_relist: RelistObserver) -> None:
        self.on_relist = on_relist
        self.healthy = False  # until the first list; a plain bool written by the watch's thread only

    def upsert(self, key: str, record: Record, received: float | None = None) -> None:
        return None  # the registrar follows each event as the reflector's observer

    def delete(self, key: str, received: float | None = None) -> None:
        return None

    def replace(self, records: Mapping[str, Record], received: float | None = None) -> int:
        found = next((r for r in records.values() if isinstance(r, MetadataRecord)), None)
        self.healthy = True
        self.on_relist(found)
        return 0

    def set_health(self, healthy: bool, reason: str = "") -> None:
        self.healthy = healthy


def own_registration_watch(
    api: KubeApi,
    namespace: str,
    metadata_name: str,
    observer: WatchObserver,
    on_relist: RelistObserver,
    metrics: Metrics,
    *,
    silence_timeout: float,
    backoff_max: float,
    streaming_list: bool,
) -> tuple[Reflector, OwnRegistrationStore]:
    """The reflector of this pod's own CR and its store; the daemon starts it with the registrar."""
    store = OwnRegistrationStore(on_relist)
    reflector = Reflector(
        api,
        own_registration_target(namespace, metadata_name),
        store,
        metrics,
        silence_timeout=silence_timeout,
        backoff_max=backoff_max,
        streaming_list=streaming_list,
        observers=[observer],
    )
    return reflector, store
