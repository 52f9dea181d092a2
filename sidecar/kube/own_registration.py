"""The watch of this pod's own ``DynamoWorkerMetadata``, which runs whatever ``DISCOVERY_WATCH`` says.

The Kubernetes ``OwnWatch`` (``sidecar.peers.own_watch``): one watch of the CR collection of the pod's
namespace with ``fieldSelector=metadata.name=<its CR>``. The API server sends such a watch the events of
that one object and a bookmark about once a minute, nothing of the other pods' CRs (its cost is measured
in ``bench/COST_MODEL.md``).

It is a ``Reflector`` like the peer watches (streaming or paged initial list, resume from the
resourceVersion with bookmarks, 410 -> relist, silence detection, backoff), with two differences: its
events go to the publisher (``KubePublisher.observe``, the reflector's observer), and its store
(``OwnWatchStore``) keeps no peers: it hands the publisher what each (re)list found
(``KubePublisher.relisted``), since a relist is not a stream of events (a CR deleted while the watch was
down shows only as missing from the list).
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.core.records import MetadataRecord, Record
from sidecar.kube.api import KubeApi
from sidecar.kube.publisher import KubePublisher
from sidecar.kube.reflector import Reflector
from sidecar.kube.sources import own_registration_target
from sidecar.peers.metrics import Metrics
from sidecar.peers.own_watch import OwnWatchStore


class OwnRegistrationWatch(Reflector):
    """The reflector of this pod's own CR (an ``OwnWatch``); the Kubernetes backend builds it for its
    publisher and the daemon starts it with the publisher, whatever ``DISCOVERY_WATCH`` says."""

    def __init__(
        self,
        api: KubeApi,
        publisher: KubePublisher,
        metrics: Metrics,
        *,
        silence_timeout: float,
        backoff_max: float,
        streaming_list: bool,
    ) -> None:
        self.registration = OwnWatchStore(on_relist=lambda records: publisher.relisted(_found(records)))
        super().__init__(
            api,
            own_registration_target(publisher.identity.namespace, publisher.metadata_name),
            self.registration,
            metrics,
            silence_timeout=silence_timeout,
            backoff_max=backoff_max,
            streaming_list=streaming_list,
            observers=[publisher.observe],
        )

    @property
    def healthy(self) -> bool:
        return self.registration.healthy

    def refresh(self) -> None:
        """The CR's name never changes while the pod incarnation lives: there is nothing new to follow."""


def _found(records: Mapping[str, Record]) -> MetadataRecord | None:
    """The CR a relist found (the field selector lets at most this pod's own through), or None."""
    return next((r for r in records.values() if isinstance(r, MetadataRecord)), None)
