"""Peers on the real control plane: ready pods behind a Service, each with a Dynamo-style CR."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from devcluster.objects import ENDPOINT_SLICES, Cluster
from devcluster.waiting import wait_for
from sidecar.core.instance_id import instance_id_hex

NAMESPACE = "bench"
SERVICE = "workers"
LABELS = {"app": "worker"}


def peer_name(index: int) -> str:
    return f"peer-{index:05d}"


def metadata(name: str, seq: int) -> dict[str, Any]:
    """A realistic spec.data: one endpoint and one model card, as Dynamo publishes them."""
    key = f"dynamo/backend/generate/{instance_id_hex(name)}"
    return {
        "seq": seq,
        "endpoints": {key: {"transport": {"nats_tcp": "dynamo_backend.generate"}, "namespace": "dynamo"}},
        "model_cards": {"llama-3-8b": {"context_length": 8192, "kv_cache_block_size": 16}},
        "event_channels": {},
    }


class Workload:
    def __init__(self, cluster: Cluster, threads: int = 8) -> None:
        self.cluster = cluster
        self.threads = threads
        self.size = 0
        self.pods: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._seq_lock = threading.Lock()

    def next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def _create_peer(self, index: int) -> None:
        name = peer_name(index)
        role = "prefill" if index % 2 == 0 else "decode"
        pod = self.cluster.start_pod(NAMESPACE, name, {**LABELS, "role": role})
        self.write_cr(pod, 0)
        self.pods[name] = pod

    def write_cr(self, pod: dict[str, Any], seq: int) -> dict[str, Any]:
        return self.cluster.register_like_dynamo(pod, metadata(pod["metadata"]["name"], seq))

    def grow_to(self, size: int, log=print) -> None:
        if size <= self.size:
            return
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self._create_peer, range(self.size, size)))
        self.size = size
        wait_for(lambda: self.ready_endpoints() >= size, 300, interval=0.5, what=f"{size} ready endpoints")
        log(f"workload: {size} ready peers with metadata")

    def ready_endpoints(self) -> int:
        total = 0
        token = ""
        while True:
            query = [("labelSelector", f"kubernetes.io/service-name={SERVICE}"), ("limit", "500")]
            if token:
                query.append(("continue", token))
            page = self.cluster.api.get(ENDPOINT_SLICES.collection(NAMESPACE), query)
            for item in page.get("items", []):
                total += sum(1 for e in item.get("endpoints") or () if (e.get("conditions") or {}).get("ready"))
            token = page["metadata"].get("continue") or ""
            if not token:
                return total

    def slice_of(self) -> dict[str, str]:
        """pod name -> the EndpointSlice listing it (to match slice events to readiness writes)."""
        result = {}
        items = self.cluster.api.get(
            ENDPOINT_SLICES.collection(NAMESPACE), [("labelSelector", f"kubernetes.io/service-name={SERVICE}")]
        ).get("items", [])
        for item in items:
            for endpoint in item.get("endpoints") or ():
                ref = endpoint.get("targetRef") or {}
                if ref.get("name"):
                    result[ref["name"]] = item["metadata"]["name"]
        return result
