"""Feeding raw Kubernetes objects into a hub the way the reflector does, without an API server.

Each object is parsed with its source's row (``sidecar.kube.sources``) and written into that source's
store, so tests of the serving side exercise the same parse-and-store path as production.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar.core.directory import PeerDirectory
from sidecar.kube.sources import ENDPOINT_SLICES, SOURCES, WORKER_METADATA, KubeSource
from sidecar.peers.hub import PeerHub

SOURCE_NAMES = (ENDPOINT_SLICES.name, WORKER_METADATA.name)
"""What a sidecar with a Service (the default) watches: a hub over these is synced once both are listed."""


def new_hub(history: int, self_uid: str) -> PeerHub:
    """A hub over the Kubernetes sources, with a fresh history."""
    return PeerHub(PeerDirectory(uuid.uuid4().hex, history, SOURCE_NAMES), self_uid)


class SourceFeed:
    """Writes raw objects of any Kubernetes source into ``hub``."""

    def __init__(self, hub: PeerHub) -> None:
        self.stores = {source.name: hub.store(source.name) for source in SOURCES if source.name in SOURCE_NAMES}

    def replace(self, source: KubeSource, objects: Iterable[Mapping[str, Any]]) -> int:
        return self.stores[source.name].replace({source.key(o): source.parse(o) for o in objects}, time.monotonic())

    def upsert(self, source: KubeSource, obj: Mapping[str, Any]) -> None:
        self.stores[source.name].upsert(source.key(obj), source.parse(obj), time.monotonic())

    def delete(self, source: KubeSource, obj: Mapping[str, Any]) -> None:
        self.stores[source.name].delete(source.key(obj), time.monotonic())

    def set_health(self, source: KubeSource, healthy: bool, reason: str = "") -> None:
        self.stores[source.name].set_health(healthy, reason)
