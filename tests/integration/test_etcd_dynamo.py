"""Mixed deployment on the etcd backend: Dynamo's real runtime (``ai-dynamo-runtime`` 1.6.1) and sidecars.

Both directions, on one real etcd 3.6, with no API server: a Dynamo worker
(``DistributedRuntime(loop, "etcd", "tcp")``, ``serve_endpoint`` and ``register_model``) is a peer on a
sidecar's ``WatchPeers`` with its instance ID (the worker's lease, ``endpoint.connection_id()``), its
endpoint and its model card; a sidecar-registered instance is in a Dynamo client's ``instance_ids()``
with the sidecar's ``GetSelf`` instance ID and the published transport, and leaves it when the
sidecar is stopped (the lease revoked). Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from devcluster.dynamo import TESTED_VERSION, DynamoProcess, launch_dynamo_etcd, runtime_version
from devcluster.etcd import EtcdServer
from devcluster.sidecars import SidecarProcess, launch_etcd_sidecar
from discovery_client.client import DiscoveryClient
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration

NAMESPACE = "demo"
ENDPOINT = f"{NAMESPACE}.backend.generate"




class World:
    """One etcd, and the Dynamo processes and sidecars of one test; always torn down."""

    def __init__(self, etcd: EtcdServer, work_dir: pathlib.Path) -> None:
        self.etcd = etcd
        self.work_dir = work_dir
        self.dynamo: list[DynamoProcess] = []
        self.sidecars: list[SidecarProcess] = []
        self.streams: list[StreamRecorder] = []
        self.clients: list[DiscoveryClient] = []

    def dynamo_process(
        self, name: str, mode: str, model: str | None = None, kv_events: bool = False, lease_ttl: int | None = None
    ) -> DynamoProcess:
        env = {"ETCD_LEASE_TTL": str(lease_ttl)} if lease_ttl else {}
        process = launch_dynamo_etcd(
            name, NAMESPACE, self.etcd.url, mode, self.work_dir / "dynamo", ENDPOINT, model, env, kv_events=kv_events
        )
        self.dynamo.append(process)
        return process

    def sidecar(self, name: str, data: dict[str, Any]) -> SidecarProcess:
        process = launch_etcd_sidecar(name, NAMESPACE, self.etcd.url, self.work_dir / "sidecars", metadata=data)
        self.sidecars.append(process)
        return process.wait_ready()

    def stream(self, process: SidecarProcess) -> StreamRecorder:
        recorder = StreamRecorder(process.target)
        self.streams.append(recorder)
        return recorder

    def client(self, process: SidecarProcess) -> DiscoveryClient:
        client = DiscoveryClient(process.target)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for closable in [*self.streams, *self.clients]:
            closable.close()
        for sidecar in self.sidecars:
            try:
                sidecar.terminate(timeout=15)
            except Exception:  # noqa: BLE001 - teardown must reach every process
                sidecar.kill()
        for dynamo in self.dynamo:
            dynamo.terminate(timeout=5)


@pytest.fixture
def world(etcd: EtcdServer, tmp_path: pathlib.Path) -> Iterator[World]:
    w = World(etcd, tmp_path)
    yield w
    w.close()


def test_the_runtime_under_test_is_the_release_pinned() -> None:
    """The claims below are about this release of Dynamo's runtime."""
    assert runtime_version() == TESTED_VERSION


def test_dynamo_worker_on_etcd_is_a_sidecar_peer_with_its_endpoint_and_model_card(world: World) -> None:
    """The worker's lease is its instance ID on both sides; its keys are the peer's four maps."""
    router = world.sidecar("router", {})
    stream = world.stream(router)
    # This worker program dies on SIGTERM without revoking (it installs no handler), so its keys go when
    # its lease expires: a short TTL keeps the test short (1.6.1's default is 30 s).
    worker = world.dynamo_process("worker-0", "worker", model="llama-demo", lease_ttl=5)
    instance_id = worker.instance_id  # endpoint.connection_id(): the primary lease
    worker.wait_event("model_registered")
    name = f"{instance_id:x}"
    key = f"{NAMESPACE}/backend/generate/{instance_id:x}"

    def has_card(recorder: StreamRecorder) -> bool:
        peer = recorder.peers().get(name)
        return peer is not None and key in json.loads(peer.data_json).get("model_cards", {})

    stream.wait_until(has_card, timeout=60, what="the Dynamo worker with its model card")
    peer = stream.peers()[name]
    assert peer.instance_id == instance_id and peer.uid == f"etcd/{instance_id:x}"
    data = json.loads(peer.data_json)
    entry = data["endpoints"][key]
    assert entry["type"] == "Endpoint" and entry["instance_id"] == instance_id
    assert entry["transport"]["tcp"].endswith(f"/{instance_id:x}/{NAMESPACE}/backend/generate")
    assert data["model_cards"][key]["card_json"]["display_name"] == "llama-demo"
    assert world.etcd.get_prefix("v1/instances/")[f"v1/instances/{key}"]["lease"] == instance_id

    assert world.etcd.post("/v3/lease/timetolive", {"ID": str(instance_id)})["grantedTTL"] == "5"
    worker.terminate(timeout=10)
    stream.wait_names(set(), timeout=30)  # the worker's keys went with its lease


def test_a_dynamo_workers_event_channel_and_source_belong_to_its_peer(world: World) -> None:
    """Keys are grouped by lease, not by the hex in the key: a KV event publisher registers under its own
    publisher ID (not the instance ID), on the worker's lease, and the sidecar keeps all of it in one peer.
    This is also the shape 1.6.1 writes event entries in: a ``scope`` object, not namespace/component."""
    router = world.sidecar("router", {})
    stream = world.stream(router)
    worker = world.dynamo_process("worker-0", "worker", kv_events=True)
    instance_id = worker.instance_id
    worker.wait_event("kv_events")
    name = f"{instance_id:x}"

    def has_events(recorder: StreamRecorder) -> bool:
        peer = recorder.peers().get(name)
        data = json.loads(peer.data_json) if peer is not None else {}
        return bool(data.get("event_channels")) and bool(data.get("event_sources"))

    stream.wait_until(has_events, timeout=60, what="the worker's event channel and source on its peer")
    assert set(stream.names()) == {name}  # one peer: the publisher ID made no second one
    data = json.loads(stream.peers()[name].data_json)
    (channel_key, channel), = data["event_channels"].items()
    (source_key, source), = data["event_sources"].items()
    assert channel["type"] == "EventChannel" and channel["topic"] == "kv-events"
    assert channel["scope"] == {"kind": "endpoint", "endpoint": {"namespace": NAMESPACE, "component": "backend",
                                                                 "name": "generate"}}
    publisher_id = channel["instance_id"]
    assert publisher_id != instance_id and source["publisher_id"] == publisher_id
    prefix = f"namespace/{NAMESPACE}/component/backend/endpoint/generate/topic/kv-events/"
    assert channel_key == source_key == f"{prefix}{publisher_id:x}"
    assert world.etcd.get_prefix("v1/event_channels/")[f"v1/event_channels/{channel_key}"]["lease"] == instance_id
    # Without ETCD_LEASE_TTL the 1.6.1 runtime grants 30 s (the sidecar's default follows it, not the brief's 10).
    assert world.etcd.post("/v3/lease/timetolive", {"ID": str(instance_id)})["grantedTTL"] == "30"


def test_sidecar_instance_is_in_a_dynamo_clients_instance_ids(world: World) -> None:
    """What the sidecar registers decodes in Dynamo: the same instance ID and transport; gone on SIGTERM."""
    address = "127.0.0.1:9"  # nothing dials it: discovery only
    data = {
        "endpoints": {
            f"{NAMESPACE}/backend/generate/0": {
                "type": "Endpoint",
                "namespace": NAMESPACE,
                "component": "backend",
                "endpoint": "generate",
                "instance_id": 0,
                "transport": {"tcp": f"{address}/0/{NAMESPACE}/backend/generate"},
                "device_type": "cuda",
                "request_plane_codec": "msgpack",
            }
        }
    }
    client = world.dynamo_process("frontend-0", "client")
    client.wait_event("client_ready", timeout=60)
    sidecar = world.sidecar("worker-0", data)
    me = world.client(sidecar).get_self()
    assert me.registered and me.instance_id > 0
    client.wait_instance_ids(lambda ids: me.instance_id in ids, timeout=60, what="the sidecar's instance")
    instance = next(i for i in client.instances() if i["instance_id"] == me.instance_id)
    assert instance["transport"] == {"kind": "tcp", "address": f"{address}/0/{NAMESPACE}/backend/generate"}

    assert sidecar.terminate(timeout=15) == 0
    client.wait_instance_ids(lambda ids: me.instance_id not in ids, timeout=30, what="the sidecar gone")


def test_over_tls_the_same_pem_text_configures_dynamo_and_the_sidecar(
    etcd_bin: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """ETCD_AUTH_CA/_CLIENT_CERT/_CLIENT_KEY as PEM text (what the 1.6.1 runtime passes to from_pem) and an
    https:// endpoint: one pod spec's variables work for Dynamo's runtime and for the sidecar alike."""
    server = EtcdServer(tmp_path / "etcd-tls", bin_dir=etcd_bin, tls=True)
    server.start()
    world = World(server, tmp_path)
    try:
        assert server.pki is not None
        tls_env = {
            "ETCD_AUTH_CA": server.pki.ca.read_text(),
            "ETCD_AUTH_CLIENT_CERT": server.pki.client_cert.read_text(),
            "ETCD_AUTH_CLIENT_KEY": server.pki.client_key.read_text(),
        }
        router = launch_etcd_sidecar(
            "router", NAMESPACE, server.url, tmp_path / "sidecars", extra_env=tls_env
        )
        world.sidecars.append(router)
        router.wait_ready()
        stream = world.stream(router)
        worker = launch_dynamo_etcd(
            "worker-0", NAMESPACE, server.url, "worker", tmp_path / "dynamo", ENDPOINT, extra_env=tls_env
        )
        world.dynamo.append(worker)
        instance_id = worker.instance_id
        worker.wait_event("serving")
        stream.wait_names({f"{instance_id:x}"}, timeout=60)
        assert server.get_prefix("v1/instances/")[f"v1/instances/{NAMESPACE}/backend/generate/{instance_id:x}"]
    finally:
        world.close()
        server.stop()
