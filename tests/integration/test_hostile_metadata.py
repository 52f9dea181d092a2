"""One pod's metadata must never break discovery for the others: regressions on the real control plane.

Each test writes what a careless or hostile pod could write into its own ``DynamoWorkerMetadata`` (the
API server accepts all of it) and checks, through a running sidecar, that the other peers' updates keep
flowing, that no thread dies, that probes tell the truth, and that every message fits a client with
gRPC's default limits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from devcluster.objects import WORKER_METADATA, Cluster
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import DiscoveryClient
from sidecar.core.instance_id import instance_id
from tests.conftest import Sidecars
from tests.integration.streams import StreamRecorder
from tests.integration.test_peer_stream import READY, SERVICE, World

pytestmark = pytest.mark.integration


@pytest.fixture
def world(namespace: str, cluster: Cluster, sidecars: Sidecars) -> World:
    return World(cluster, namespace, sidecars)


@pytest.fixture
def stream(world: World) -> Iterator[StreamRecorder]:
    recorder = StreamRecorder(world.observer.target)
    yield recorder
    recorder.close()


def nested_json(depth: int) -> str:
    """``{"a":{"a":...1...}}`` ``depth`` levels deep, as text (Python's own encoder stops near 1,000)."""
    return '{"a":' * (depth - 1) + '{"leaf":1}' + "}" * (depth - 1)


def write_data_raw(cluster: Cluster, namespace: str, name: str, data_json: str) -> None:
    """Merge-patch spec.data with pre-serialised JSON bytes, as any client of the API server can (the
    official client would re-encode a string body, and Python's encoder cannot write such depths)."""
    client = cluster.api.api_client
    _, url, headers, _, _ = client.param_serialize(
        "PATCH",
        WORKER_METADATA.item(namespace, name),
        header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    body = b'{"spec":{"data":' + data_json.encode() + b"}}"
    response = client.rest_client.pool_manager.request("PATCH", url, body=body, headers=headers, timeout=30)
    assert response.status == 200, response.data[:300]


def default_client_list(target: str) -> pb.ListPeersResponse:
    """ListPeers through a channel with gRPC's default limits (4 MiB receive), as most clients have."""
    with grpc.insecure_channel(target) as channel:
        response: pb.ListPeersResponse = pb_grpc.DiscoveryStub(channel).ListPeers(
            pb.ListPeersRequest(), timeout=30, wait_for_ready=True
        )
        return response


def default_client_snapshot(target: str) -> list[pb.WatchPeersResponse]:
    """The first complete snapshot of WatchPeers through a default channel."""
    parts = []
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.DiscoveryStub(channel).WatchPeers(pb.WatchPeersRequest(), timeout=30, wait_for_ready=True)
        for message in call:
            parts.append(message)
            if not message.partial:
                break
        call.cancel()
    return parts


def test_deep_metadata_spares_the_other_peers(world: World, stream: StreamRecorder, sidecars: Sidecars) -> None:
    """33..2,000 levels of nesting (the API server takes them) cost only that pod: streams, lists, other
    peers' updates, the watch thread and a sidecar started afterwards all keep working."""
    world.worker("w-a")
    world.worker("w-deep")
    evil = world.cluster.start_pod(world.namespace, "w-evil", {"app": "w", "role": "prefill"})
    world.cluster.register_like_dynamo(evil)
    world.settle(stream, {"w-a": READY, "w-deep": READY, "w-evil": READY})
    deep_before = stream.peers()["w-deep"].data_json

    write_data_raw(world.cluster, world.namespace, "w-deep", nested_json(40))  # past the 32-level bound
    write_data_raw(world.cluster, world.namespace, "w-evil", nested_json(2000))  # past Python's stack
    world.cluster.api.merge_patch(WORKER_METADATA.item(world.namespace, "w-a"), {"spec": {"data": {"seq": 2}}})

    stream.wait_until(lambda r: json.loads(r.peers()["w-a"].data_json).get("seq") == 2, 45, "w-a's update")
    assert stream.peers()["w-deep"].data_json == deep_before, "the deep update is refused; the last valid stays"
    events = world.observer.log_events()
    wait_for(
        lambda: any("nested deeper than 32 levels" in str(e.get("reason")) for e in world.observer.log_events()),
        30,
        what="the refusal logged with its reason",
    )
    assert world.observer.http_get("/healthz")[0] == 200
    assert world.observer.http_get("/readyz")[0] == 200
    listed = default_client_list(world.observer.target)
    assert {p.name for p in listed.peers} == {"w-a", "w-deep", "w-evil"}
    assert not any(e.get("event", "").startswith("unexpected error") for e in events)

    late_pod = world.cluster.start_pod(world.namespace, "late", {"app": "w", "role": "router"})
    late = sidecars.start(late_pod, SERVICE).wait_ready()  # lists the namespace with the 2,000-level CR in it
    with DiscoveryClient(late.target) as client:
        names = {p.name for p in client.list_peers().peers}
    # This sidecar never saw valid data for w-deep or w-evil: neither is its peer; everyone else is.
    assert names == {"observer", "w-a"}


def endpoints_of(recorder: StreamRecorder, name: str) -> object:
    peer = recorder.peers().get(name)
    return None if peer is None else json.loads(peer.data_json).get("endpoints")


def test_removing_the_last_endpoint_removes_it_everywhere(world: World, stream: StreamRecorder) -> None:
    """Merge-patching away a map's last key makes server-side apply store the map as null: observers must
    read that as an empty map (Dynamo does), not reject the CR and keep advertising the old endpoint."""
    pod = world.cluster.start_pod(world.namespace, "w-pub", {"app": "w", "role": "decode"})
    worker = world.sidecars.start(pod, SERVICE, labels={"app": "w"}).wait_ready()
    own_id = instance_id("w-pub")
    e1 = f"demo/backend/generate/{own_id:x}"
    endpoint = {
        "type": "Endpoint",
        "namespace": "demo",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": own_id,
        "transport": {"tcp": f"{pod['status']['podIP']}:8000/{own_id:x}/demo/backend/generate"},
    }
    with DiscoveryClient(worker.target) as client:
        client.publish_metadata({"endpoints": {e1: endpoint}, "model_cards": {}})
        stream.wait_until(lambda r: e1 in (endpoints_of(r, "w-pub") or {}), 45, "e1 published")
        client.publish_metadata({"endpoints": {e1: None}}, merge=True)
        stream.wait_until(lambda r: endpoints_of(r, "w-pub") == {}, 45, "e1 withdrawn everywhere")
        assert json.loads(client.get_self().data_json)["endpoints"] == {}
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.PublishMetadata(pb.PublishMetadataRequest(data_json='{"x": NaN}'), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN" in (refused.value.details() or "")


def test_oversized_metadata_is_refused_and_every_message_fits_a_default_client(
    world: World, stream: StreamRecorder
) -> None:
    """A 1.2 MB CR of small numbers would be a ~8 MB peer message: it is refused (logged with its reason),
    and ListPeers and WatchPeers stay receivable by clients with gRPC's default 4 MiB limit."""
    world.worker("w-a")
    big = world.cluster.start_pod(world.namespace, "w-big", {"app": "w", "role": "prefill"})
    world.cluster.register_like_dynamo(big)
    world.settle(stream, {"w-a": READY, "w-big": READY})
    big_before = stream.peers()["w-big"].data_json

    write_data_raw(world.cluster, world.namespace, "w-big", json.dumps({"numbers": [7] * 400_000}))
    world.cluster.api.merge_patch(WORKER_METADATA.item(world.namespace, "w-a"), {"spec": {"data": {"seq": 3}}})
    stream.wait_until(lambda r: json.loads(r.peers()["w-a"].data_json).get("seq") == 3, 45, "w-a's update")
    assert stream.peers()["w-big"].data_json == big_before
    wait_for(
        lambda: any("larger than 256 KiB" in str(e.get("reason")) for e in world.observer.log_events()),
        30,
        what="the refusal logged with its reason",
    )
    assert {p.name for p in default_client_list(world.observer.target).peers} == {"w-a", "w-big"}
    snapshot = default_client_snapshot(world.observer.target)
    assert {p.name for m in snapshot for p in m.snapshot.peers} == {"w-a", "w-big"}
