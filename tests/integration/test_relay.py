"""The relay tier on the real control plane: who may read what through it, and failover between replicas.

The stream semantics through a relay are ``tests/integration/test_peer_stream.py``'s scenarios, run a
second time with the observer following a relay (its ``world`` fixture). Here: a client is served only the
namespaces its own token may list (PERMISSION_DENIED naming the others, none of their peers); a deleted
pod's bound token is refused, and its open stream ended; GetSelf and PublishMetadata are not a relay's;
and a sidecar whose relay replica dies moves to another one without its main container losing or being
invented a single event (checked against the API server's truth).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import pytest

from devcluster.objects import Cluster
from devcluster.relays import RelayProcess, RelayTls
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from tests.conftest import MANIFESTS, Relays, Sidecars, kubectl
from tests.integration.streams import StreamRecorder

pytestmark = pytest.mark.integration
SERVICE = "workers"
READY = "PEER_STATE_READY"


def relay_stub(relay: RelayProcess, tls: RelayTls) -> tuple[grpc.Channel, pb_grpc.DiscoveryStub]:
    """A client of the relay as a sidecar dials it: TLS, verified against the relay's CA."""
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
    channel = grpc.secure_channel(relay.address, credentials)
    return channel, pb_grpc.DiscoveryStub(channel)


def call_metadata(token: str, namespaces: str = "") -> list[tuple[str, str]]:
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return metadata + ([("discovery-namespaces", namespaces)] if namespaces else [])


def worker(cluster: Cluster, namespace: str, name: str) -> dict:
    pod = cluster.start_pod(namespace, name, {"app": "w"})
    cluster.register_like_dynamo(pod)
    return pod


@pytest.fixture
def other_namespace(control_plane, cluster: Cluster, namespace: str) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A second namespace with its own sidecar RBAC: the first namespace's service account has none there."""
    name = f"{namespace[:40]}-b"
    cluster.create_namespace(name)
    kubectl(control_plane, "apply", "-f", str(MANIFESTS / "rbac.yaml"), namespace=name)
    cluster.wait_for_service_account(name, "discovery-sidecar")
    yield name
    cluster.delete_namespace(name)


def test_a_client_sees_only_the_namespaces_its_token_may_list(
    cluster: Cluster, namespace: str, other_namespace: str, relays: Relays, relay_tls: RelayTls
) -> None:
    """A's service account may list A's peers, not B's: asked for B (or for everything the relay watches)
    it gets PERMISSION_DENIED naming B and none of B's peers; asked for A, exactly A's. No token, or a
    token the API server does not know: UNAUTHENTICATED. A namespace the relay does not watch: said so."""
    for ns in (namespace, other_namespace):
        cluster.create_service(ns, SERVICE, {"app": "w"})
        worker(cluster, ns, f"w-{ns[-1]}")
    relay = relays.start(
        {"DISCOVERY_NAMESPACES": f"{namespace},{other_namespace}", "DISCOVERY_SERVICE_NAME": SERVICE}
    ).wait_ready()
    client_pod = cluster.start_pod(namespace, "client", {"app": "client"})
    token = cluster.pod_bound_token(namespace, "discovery-sidecar", client_pod)
    channel, stub = relay_stub(relay, relay_tls)
    try:
        for asked in (f"{namespace},{other_namespace}", other_namespace, ""):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListPeers(pb.ListPeersRequest(), metadata=call_metadata(token, asked), timeout=20)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
            assert f"namespace {other_namespace}" in refused.value.details()
            stream = stub.WatchPeers(pb.WatchPeersRequest(), metadata=call_metadata(token, asked), timeout=20)
            with pytest.raises(grpc.RpcError) as refused:
                next(iter(stream))  # refused before the first message: nothing of B is ever sent
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        def own_peers() -> set[str]:
            reply = stub.ListPeers(pb.ListPeersRequest(), metadata=call_metadata(token, namespace), timeout=20)
            return {f"{p.namespace}/{p.name}" for p in reply.peers}

        wait_for(lambda: own_peers() == {f"{namespace}/w-{namespace[-1]}"}, 30, what="A's peer, and only A's")
        first = next(iter(stub.WatchPeers(pb.WatchPeersRequest(), metadata=call_metadata(token, namespace))))
        assert {p.namespace for p in first.snapshot.peers} == {namespace}

        for bad in ("", "not-a-token"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListPeers(pb.ListPeersRequest(), metadata=call_metadata(bad, namespace), timeout=20)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListPeers(pb.ListPeersRequest(), metadata=call_metadata(token, "elsewhere"), timeout=20)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not watch namespace elsewhere" in refused.value.details()
        for unary in (stub.GetSelf, stub.PublishMetadata):
            with pytest.raises(grpc.RpcError) as refused:
                unary(
                    pb.GetSelfRequest() if unary is stub.GetSelf else pb.PublishMetadataRequest(data_json="{}"),
                    metadata=call_metadata(token, namespace),
                    timeout=20,
                )
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def test_a_deleted_pods_token_is_refused_and_its_stream_ended(
    cluster: Cluster, namespace: str, relays: Relays, relay_tls: RelayTls
) -> None:
    """A pod-bound token stops working when its pod is deleted: the open stream is ended at the next check
    (DISCOVERY_RELAY_ACCESS_TTL) with UNAUTHENTICATED, and a new call is refused."""
    cluster.create_service(namespace, SERVICE, {"app": "w"})
    worker(cluster, namespace, "w-a")
    relay = relays.start(
        {"DISCOVERY_NAMESPACES": namespace, "DISCOVERY_SERVICE_NAME": SERVICE, "DISCOVERY_RELAY_ACCESS_TTL": "1s"}
    ).wait_ready()
    client_pod = cluster.start_pod(namespace, "client", {"app": "client"})
    token = cluster.pod_bound_token(namespace, "discovery-sidecar", client_pod)
    channel, stub = relay_stub(relay, relay_tls)
    try:
        stream = stub.WatchPeers(pb.WatchPeersRequest(), metadata=call_metadata(token, namespace), timeout=60)
        messages = iter(stream)
        assert next(messages).WhichOneof("kind") == "snapshot"
        cluster.delete_pod(namespace, "client")
        with pytest.raises(grpc.RpcError) as ended:
            for _ in messages:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListPeers(pb.ListPeersRequest(), metadata=call_metadata(token, namespace), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        channel.close()


def followed_relay(observer_log: pathlib.Path, relays: list[RelayProcess]) -> RelayProcess:
    """The replica a sidecar follows now, from its last "following a relay" log line."""
    import json

    replica = ""
    for line in observer_log.read_text().splitlines():
        if '"following a relay"' in line:
            replica = json.loads(line)["replica"]
    port = int(replica.rsplit(":", 1)[1])
    return next(r for r in relays if r.grpc_port == port)


@pytest.mark.parametrize("end", ["killed", "drained"])
def test_failover_between_replicas_loses_and_invents_nothing(
    cluster: Cluster, namespace: str, sidecars: Sidecars, relays: Relays, end: str
) -> None:
    """Two replicas; the observer's replica is killed (SIGKILL: no goodbye) or drained (SIGTERM: its streams
    end with UNAVAILABLE) and peers change meanwhile. The
    main container's stream says DEGRADED, keeps its set, gets no new snapshot, and then exactly the real
    changes: each added and removed once, none invented; its set equals the API server's truth."""
    cluster.create_service(namespace, SERVICE, {"app": "w"})
    for i in range(3):
        worker(cluster, namespace, f"w-{i}")
    settings = {"DISCOVERY_NAMESPACES": namespace, "DISCOVERY_SERVICE_NAME": SERVICE}
    replicas = [relays.start(settings), relays.start(settings)]
    for replica in replicas:
        replica.wait_ready()
    observer_pod = cluster.start_pod(namespace, "observer", {"app": "router"})
    observer = sidecars.start(observer_pod, SERVICE, extra_env=relays.follow_env(*replicas)).wait_ready()
    stream = StreamRecorder(observer.target)
    try:
        stream.wait_names({"w-0", "w-1", "w-2"})
        before = len(stream.updates)
        followed = followed_relay(observer.log_path, replicas)
        if end == "killed":
            followed.kill()
        else:
            followed.terminate()
        cluster.delete_pod(namespace, "w-0")
        worker(cluster, namespace, "w-3")
        stream.wait_names({"w-1", "w-2", "w-3"}, timeout=60)
        after = stream.updates[before:]
        assert "snapshot" not in [u.kind for u in after], "the main container's stream continued: no new snapshot"
        added = [p.name for u in after for p in u.added]
        removed = [p.name for u in after for p in u.removed]
        assert sorted(added) == ["w-3"], f"nothing invented: {added}"
        assert sorted(removed) == ["w-0"], f"nothing lost or removed twice: {removed}"
        stream.wait_until(lambda r: r.view.connected, 30, "CONNECTED through the other replica")
        assert any(u.kind == "status" and not u.connected for u in after), "DEGRADED was said while it moved"
    finally:
        stream.close()
