"""The Discovery service as a relay serves it: each call's token checked through the ``Access`` port, the
peers limited to the namespaces granted, open streams checked again when their grant expires, and TLS
(with a key pair renewed in place). The real API server's reviews: tests/integration/test_relay.py."""

from __future__ import annotations

import pathlib
import shutil
import ssl
import threading
import time
from collections.abc import Iterator, Sequence

import grpc
import pytest

from devcluster.pki import write_pki
from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    AccessDenied,
    AccessError,
    AccessUnavailable,
    Grant,
    ListenAddress,
    PodIdentity,
    TlsFiles,
)
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import DiscoveryService, ProjectedBatch
from tests.unit.feeding import SourceFeed, new_hub
from tests.unit.test_grpc_stream import NS, Reader, endpoint_slice, worker_cr


class FakeAccess:
    """Grants ``namespaces`` to the token "good" for ``ttl`` seconds, or raises ``refusal`` once set."""

    def __init__(self, namespaces: frozenset[str] | None, ttl: float = 60.0) -> None:
        self.namespaces = namespaces
        self.ttl = ttl
        self.refusal: AccessError | None = None
        self.asked: list[tuple[str, Sequence[str] | None]] = []
        self._lock = threading.Lock()

    def admit(self, token: str, namespaces: Sequence[str] | None) -> Grant:
        with self._lock:
            self.asked.append((token, namespaces))
            refusal = self.refusal
        if refusal is not None:
            raise refusal
        if token != "good":
            raise AccessDenied("not good")
        return Grant(self.namespaces, time.monotonic() + self.ttl, "alice")

    def calls(self) -> int:
        with self._lock:
            return len(self.asked)


class Relay:
    def __init__(self, access: FakeAccess, tls: TlsFiles | None = None) -> None:
        self.hub = new_hub(1000, "")
        self.feed = SourceFeed(self.hub)
        self.service = DiscoveryService(self.hub, None, PodIdentity("", NS, ""), Metrics(), access=access)
        self.server = GrpcServer(self.service, ListenAddress(host="127.0.0.1", port=0), tls=tls)
        self.server.start()
        self.pods: dict[str, tuple[str, bool]] = {}

    def add(self, pod: str) -> None:
        self.pods[pod] = (f"uid-{pod}", True)
        self.feed.upsert(WORKER_METADATA, worker_cr(pod, f"uid-{pod}"))
        self.feed.upsert(ENDPOINT_SLICES, endpoint_slice("s1", self.pods))

    def sync(self, *pods: str) -> None:
        self.pods = {p: (f"uid-{p}", True) for p in pods}
        self.feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", self.pods)])
        self.feed.replace(WORKER_METADATA, [worker_cr(p, f"uid-{p}") for p in pods])

    def close(self) -> None:
        self.hub.close()
        self.server.stop(0.5)


@pytest.fixture
def access() -> FakeAccess:
    return FakeAccess(frozenset({NS}))


@pytest.fixture
def relay(access: FakeAccess) -> Iterator[Relay]:
    r = Relay(access)
    r.sync("a", "b")
    yield r
    r.close()


def stub_for(relay: Relay) -> tuple[grpc.Channel, pb_grpc.DiscoveryStub]:
    channel = grpc.insecure_channel(relay.server.target)
    return channel, pb_grpc.DiscoveryStub(channel)


AUTH = [("authorization", "Bearer good"), ("discovery-namespaces", NS)]


def test_the_token_and_namespaces_of_the_call_are_what_is_checked(relay: Relay, access: FakeAccess) -> None:
    channel, stub = stub_for(relay)
    with channel:
        reply = stub.ListPeers(pb.ListPeersRequest(), metadata=AUTH, timeout=10)
        assert {p.name for p in reply.peers} == {"a", "b"}
        assert access.asked[-1] == ("good", [NS])
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListPeers(pb.ListPeersRequest(), metadata=[("authorization", "Bearer bad")], timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and refused.value.details() == "not good"
        assert access.asked[-1] == ("bad", None), "no namespaces named: every one the relay watches"


def test_peers_of_namespaces_not_granted_are_never_sent() -> None:
    relay = Relay(FakeAccess(frozenset({"elsewhere"})))
    relay.sync("a", "b")
    channel, stub = stub_for(relay)
    try:
        first = Reader(stub.WatchPeers(pb.WatchPeersRequest(), metadata=AUTH)).next()
        assert first.WhichOneof("kind") == "snapshot" and list(first.snapshot.peers) == []
        assert list(stub.ListPeers(pb.ListPeersRequest(), metadata=AUTH, timeout=10).peers) == []
    finally:
        channel.close()
        relay.close()


def test_an_open_stream_ends_when_its_grant_is_refused_on_the_next_check() -> None:
    access = FakeAccess(frozenset({NS}), ttl=0.2)
    relay = Relay(access)
    relay.sync("a")
    channel, stub = stub_for(relay)
    try:
        reader = Reader(stub.WatchPeers(pb.WatchPeersRequest(), metadata=AUTH))
        assert reader.next().WhichOneof("kind") == "snapshot"
        access.refusal = AccessDenied("alice may not list endpointslices in namespace ns")
        with pytest.raises(grpc.RpcError) as ended:
            reader.next(timeout=10)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "namespace ns" in ended.value.details()
    finally:
        channel.close()
        relay.close()


def test_an_api_server_that_cannot_be_asked_does_not_end_open_streams() -> None:
    access = FakeAccess(frozenset({NS}), ttl=0.2)
    relay = Relay(access)
    relay.sync("a")
    channel, stub = stub_for(relay)
    try:
        reader = Reader(stub.WatchPeers(pb.WatchPeersRequest(), metadata=AUTH))
        assert reader.next().WhichOneof("kind") == "snapshot"
        access.refusal = AccessUnavailable("the API server cannot be reached")
        asked = access.calls()
        wait_for(lambda: access.calls() > asked, 10, what="the grant checked again")
        relay.add("c")
        message = reader.next(timeout=10)
        assert message.WhichOneof("kind") == "delta" and [e.peer.name for e in message.delta.events] == ["c"]
        with pytest.raises(grpc.RpcError) as refused:  # a new call, though, cannot be admitted
            stub.ListPeers(pb.ListPeersRequest(), metadata=AUTH, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        relay.close()


def test_get_self_and_publish_are_not_a_relays(relay: Relay) -> None:
    channel, stub = stub_for(relay)
    with channel:
        for call, request in ((stub.GetSelf, pb.GetSelfRequest()), (stub.PublishMetadata, pb.PublishMetadataRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, metadata=AUTH, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "sidecar in each pod" in refused.value.details()


def served_certificate(port: int, ca: pathlib.Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(
        __import__("socket").create_connection(("127.0.0.1", port)), server_hostname="localhost"
    ) as s:
        certificate = s.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


def test_tls_only_verified_and_a_renewed_pair_is_served_without_a_restart(tmp_path: pathlib.Path) -> None:
    first = write_pki(tmp_path / "first")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first["serving.crt"], live / "tls.crt")
    shutil.copy(first["serving.key"], live / "tls.key")
    relay = Relay(FakeAccess(frozenset({NS})), tls=TlsFiles(str(live / "tls.crt"), str(live / "tls.key")))
    relay.sync("a")
    try:
        plain = grpc.insecure_channel(relay.server.target)
        with pytest.raises(grpc.RpcError):
            pb_grpc.DiscoveryStub(plain).ListPeers(pb.ListPeersRequest(), metadata=AUTH, timeout=5)
        plain.close()
        credentials = grpc.ssl_channel_credentials(root_certificates=first["ca.crt"].read_bytes())
        with grpc.secure_channel(f"localhost:{relay.server.port}", credentials) as channel:
            reply = pb_grpc.DiscoveryStub(channel).ListPeers(pb.ListPeersRequest(), metadata=AUTH, timeout=10)
            assert [p.name for p in reply.peers] == ["a"]
        before = served_certificate(relay.server.port, first["ca.crt"])
        second = write_pki(tmp_path / "second")  # renewed (here: by another CA, to tell them apart)
        shutil.copy(second["serving.key"], live / "tls.key")
        shutil.copy(second["serving.crt"], live / "tls.crt")
        wait_for(
            lambda: served_certificate(relay.server.port, second["ca.crt"]) != before,
            10,
            what="the renewed certificate served",
            ignore=(ssl.SSLError, OSError),
        )
    finally:
        relay.close()


def test_a_batch_is_projected_once_per_filter_and_position(relay: Relay) -> None:
    """Followers at the same position with the same filter share the batch's messages (a relay's hundreds of
    streams encode each change once); another filter, or another position, gets its own, correct, batch."""
    from sidecar.core.projection import PeerFilter
    from sidecar.core.selectors import parse_selector

    cursor = relay.hub.head_revision()
    relay.add("c")
    entries = relay.hub.wait_entries(cursor, 0, 100)
    assert entries
    service, history = relay.service, relay.hub.history_id
    everyone = PeerFilter()
    first = service._projected(entries, cursor, everyone, history)
    assert service._projected(entries, cursor, PeerFilter(), history) is first, "an equal filter shares it"
    nobody = service._projected(entries, cursor, PeerFilter(selector=parse_selector("role=none")), history)

    def events(batches: list[ProjectedBatch]) -> list[pb.PeerEvent]:  # the messages are shared serialized
        return [e for b in batches for m in b.messages for e in pb.WatchPeersResponse.FromString(m).delta.events]

    assert nobody is not first and not events(nobody)
    assert [e.peer.name for e in events(first)] == ["c"]
    later = service._projected(entries[1:], entries[0].revision, everyone, history) if len(entries) > 1 else []
    assert later is not first
