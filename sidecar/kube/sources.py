"""The table of Kubernetes sources of peers: what is watched, and how its objects become records.

Each row names a source once (the name is its key space in the directory and its label in metrics
and logs), says where its objects live in the REST API and how one object is parsed into a core
record and keyed. The reflector is generic over rows; ``watch_targets`` decides, from the settings,
which rows this sidecar watches and with which namespace and selector.

Adding a source is a parser in ``sidecar.core.resources`` (or a new record type and its join rule)
and a row here; nothing in the hub, the directory or the gRPC layer changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.records import Record
from sidecar.core.resources import (
    object_key,
    parse_endpoint_slice,
    parse_pod,
    parse_pod_containers,
    parse_worker_metadata,
)
from sidecar.kube.api import ResourcePath
from sidecar.kube.settings import KubeSettings

RawObject = Mapping[str, Any]


@dataclass(frozen=True)
class KubeSource:
    """One row of the table: a watched resource and how its objects become keyed records."""

    name: str  # the source's key space in the directory, and its label in metrics and logs
    noun: str  # what one object is, for people ("worker metadata")
    resource: ResourcePath
    parse: Callable[[RawObject], Record]
    key: Callable[[RawObject], str] = object_key


ENDPOINT_SLICES = KubeSource(
    "endpointslices", "EndpointSlice", ResourcePath("discovery.k8s.io", "v1", "endpointslices"), parse_endpoint_slice
)
"""Readiness: which pod incarnations are ready at which addresses and ports."""

PODS = KubeSource("pods", "Pod", ResourcePath("", "v1", "pods"), parse_pod)
"""Readiness from the Pods themselves (selected by label; no Service needed), as SGLang Model Gateway does."""

POD_CONTAINERS = KubeSource("pods", "Pod", ResourcePath("", "v1", "pods"), parse_pod_containers)
"""Readiness per container, in Dynamo's container mode (each registering container is its own peer)."""

WORKER_METADATA = KubeSource(
    "dynamoworkermetadatas",
    "worker metadata",
    ResourcePath("nvidia.com", "v1alpha1", "dynamoworkermetadatas"),
    parse_worker_metadata,
)
"""Metadata: each pod's ``DynamoWorkerMetadata`` CR (also where this pod registers itself)."""

SOURCES = (ENDPOINT_SLICES, PODS, POD_CONTAINERS, WORKER_METADATA)
OWN_REGISTRATION = "registration"
"""The label of the watch of this pod's own CR (metrics, logs): it feeds the publisher, not the directory."""


@dataclass(frozen=True)
class WatchTarget:
    """One source as this sidecar watches it: in which namespace, with which label selector."""

    source: KubeSource
    namespace: str  # "" for every namespace
    label_selector: str = ""
    scoped_name: bool = False  # the name carries the namespace (several namespaces are watched)
    field_selector: str = ""  # e.g. metadata.name=<name>: one object (this pod's own CR)
    label: str = ""  # the name it goes by instead of the row's (a watch that feeds no directory source)

    @property
    def name(self) -> str:
        """The directory's source name: the row's name, with the namespace when several are watched."""
        if self.label:
            return self.label
        return f"{self.source.name}@{self.namespace}" if self.scoped_name else self.source.name

    @property
    def selectors(self) -> str:
        """Both selectors, for people ("all" when there is neither)."""
        return ", ".join(s for s in (self.label_selector, self.field_selector) if s) or "all"

    @property
    def collection(self) -> str:
        return self.source.resource.collection(self.namespace)


def own_registration_target(namespace: str, metadata_name: str) -> WatchTarget:
    """This pod's own CR, alone: the CR collection of its namespace, by field selector on the name.

    The API server sends this watch the events of one object and nothing else (a bookmark about once a
    minute when idle), so every pod can afford it whatever ``DISCOVERY_WATCH`` says.
    """
    return WatchTarget(
        WORKER_METADATA, namespace, field_selector=f"metadata.name={metadata_name}", label=OWN_REGISTRATION
    )


def watch_targets(settings: KubeSettings) -> list[WatchTarget]:
    """The sources this sidecar watches, as its settings say: readiness from EndpointSlices or from Pods
    (``DISCOVERY_POD_SELECTOR``, or Dynamo's container mode), and metadata from the CRs, in each namespace
    of ``DISCOVERY_NAMESPACES`` (one watch per namespace, or one cluster-wide watch for ``*``).
    ``DISCOVERY_PEER_SELECTOR`` goes to the API server on the CR watch and the Pod watch: peers this pod
    can never want are never transmitted (EndpointSlices carry no peer labels to select on)."""
    peers = settings.peer_selector  # sent to the API server: other peers' objects are never transmitted
    pods = (
        settings.pod_selector if peers is None or settings.pod_selector is None else settings.pod_selector.and_(peers)
    )
    if settings.container_mode:
        readiness = (POD_CONTAINERS, str(pods))
    elif settings.pod_selector is not None:
        readiness = (PODS, str(pods))
    else:
        readiness = (ENDPOINT_SLICES, str(settings.endpointslice_selector))
    scoped = len(settings.namespaces) > 1
    targets = []
    for namespace in settings.namespaces:
        targets.append(WatchTarget(readiness[0], namespace, readiness[1], scoped))
        targets.append(WatchTarget(WORKER_METADATA, namespace, str(peers) if peers is not None else "", scoped))
    return targets
