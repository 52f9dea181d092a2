"""WatchPeers semantics through a real gRPC server, with the hub fed directly (no API server).

These pin the stream contract deterministically: sync gating, ordered revisions, resume, eviction,
slow clients, filters, status changes, health and reflection. The same behaviour against the real
control plane is covered in tests/integration/test_peer_stream.py.
"""

from __future__ import annotations

import json
import pathlib
import queue
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import PeerSetView, make_filter
from sidecar.app.config import UNIX_PATH_MAX
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import ListenAddress, PodIdentity, Publisher
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import MAX_STREAMS, DiscoveryService, add_to_server
from tests.unit.feeding import SourceFeed, new_hub

NS = "ns"
SELF = PodIdentity("self-0", NS, "uid-self")


def endpoint_slice(name: str, pods: dict[str, tuple[str, bool]], port: int = 8000) -> dict:
    """pods: pod name -> (uid, ready)."""
    return {
        "metadata": {"name": name, "namespace": NS, "resourceVersion": uuid.uuid4().hex},
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [f"10.0.0.{abs(hash(uid)) % 250 + 1}"],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": NS, "uid": uid},
            }
            for pod, (uid, ready) in pods.items()
        ],
    }


def worker_cr(pod: str, uid: str, labels: dict | None = None, data: dict | None = None) -> dict:
    return {
        "metadata": {
            "name": pod,
            "namespace": NS,
            "uid": f"cr-{uid}",
            "resourceVersion": uuid.uuid4().hex,
            "labels": labels or {},
            "ownerReferences": [{"kind": "Pod", "name": pod, "uid": uid}],
        },
        "spec": {"data": data if data is not None else {}},
    }


class Harness:
    def __init__(self, history: int = 1000, publisher: Publisher | None = None, max_streams: int = MAX_STREAMS) -> None:
        self.hub = new_hub(history, SELF.uid)
        self.feed = SourceFeed(self.hub)
        self.metrics = Metrics()
        self.service = DiscoveryService(self.hub, publisher, SELF, self.metrics, max_streams=max_streams)
        self.server = GrpcServer(self.service, ListenAddress(host="127.0.0.1", port=0))
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.target)
        self.stub = pb_grpc.DiscoveryStub(self.channel)
        self.pods: dict[str, tuple[str, bool]] = {}
        self.crs: dict[str, dict] = {}

    def sync(self) -> None:
        self.feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", self.pods)])
        self.feed.replace(WORKER_METADATA, list(self.crs.values()))

    def add(self, pod: str, labels: dict | None = None, data: dict | None = None, ready: bool = True) -> None:
        uid = f"uid-{pod}"
        self.pods[pod] = (uid, ready)
        self.crs[pod] = worker_cr(pod, uid, labels, data)
        self.feed.upsert(WORKER_METADATA, self.crs[pod])
        self.feed.upsert(ENDPOINT_SLICES, endpoint_slice("s1", self.pods))

    def remove(self, pod: str) -> None:
        self.pods.pop(pod)
        self.feed.upsert(ENDPOINT_SLICES, endpoint_slice("s1", self.pods))
        self.feed.delete(WORKER_METADATA, self.crs.pop(pod))

    def close(self) -> None:
        self.channel.close()
        self.hub.close()
        self.server.stop(0.5)


class Reader:
    """Reads a stream on a thread into a queue, so tests can wait for messages with a deadline."""

    def __init__(self, call: Iterator[pb.WatchPeersResponse]) -> None:
        self.call = call
        self.messages: queue.Queue[pb.WatchPeersResponse | BaseException] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except BaseException as exc:  # noqa: BLE001
            self.messages.put(exc)

    def next(self, timeout: float = 10.0) -> pb.WatchPeersResponse:
        item = self.messages.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def until(self, view: PeerSetView, predicate, timeout: float = 10.0) -> None:
        while not predicate(view):
            view.apply(self.next(timeout))


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def names(view: PeerSetView) -> set[str]:
    return {p.name for p in view.peers.values()}


def test_first_message_waits_for_sync_and_is_a_full_snapshot(harness: Harness) -> None:
    reader = Reader(harness.stub.WatchPeers(pb.WatchPeersRequest()))
    harness.pods = {"a": ("uid-a", True), "b": ("uid-b", True)}
    harness.crs = {p: worker_cr(p, f"uid-{p}") for p in ("a", "b")}
    harness.feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", harness.pods)])
    assert reader.messages.empty(), "nothing may be sent while only one source is synced"
    harness.feed.replace(WORKER_METADATA, list(harness.crs.values()))
    first = reader.next()
    assert first.WhichOneof("kind") == "snapshot"
    assert first.snapshot.reason == pb.SNAPSHOT_REASON_INITIAL
    assert {p.name for p in first.snapshot.peers} == {"a", "b"}, "an empty first snapshot would mean 'none'"
    assert first.history_id == harness.hub.history_id


def test_deltas_follow_in_order_with_increasing_revisions(harness: Harness) -> None:
    harness.sync()
    reader = Reader(harness.stub.WatchPeers(pb.WatchPeersRequest()))
    view = PeerSetView()
    view.apply(reader.next())
    harness.add("a")
    harness.add("b", labels={"role": "decode"})
    harness.remove("a")
    reader.until(view, lambda v: names(v) == {"b"})
    assert view.revision == harness.hub.head_revision()
    seen = []
    h2 = Reader(
        harness.stub.WatchPeers(pb.WatchPeersRequest(resume_history_id=harness.hub.history_id, resume_revision=0))
    )
    first = h2.next()
    assert first.WhichOneof("kind") == "resumed"
    v2 = PeerSetView()
    v2.apply(first)
    while v2.revision < harness.hub.head_revision():
        message = h2.next()
        seen.append(message.revision)
        v2.apply(message)
    assert seen == sorted(set(seen)), "revisions strictly increase"
    assert names(v2) == {"b"}


def test_streams_written_as_bytes_receive_the_messages_grpc_would_serialize(harness: Harness) -> None:
    """WatchPeers messages are serialized by the service and written as bytes (``add_to_server``), one shared
    batch for every stream: two streams see the same messages, and each peer equals what ListPeers (a message
    serialized by gRPC itself) returns, groups and data included."""
    harness.add("a", labels={"role": "prefill"}, data={"model": "m", "nested": [1, {"x": "y"}]})
    harness.sync()
    request = pb.WatchPeersRequest(filter=make_filter(groups={"prefill": "role=prefill"}))
    readers = [Reader(harness.stub.WatchPeers(request)) for _ in range(2)]
    views = [PeerSetView(), PeerSetView()]
    snapshots = [reader.next() for reader in readers]
    assert snapshots[0] == snapshots[1] and snapshots[0].WhichOneof("kind") == "snapshot"
    harness.add("b", labels={"role": "prefill"}, data={"model": "m2"})
    harness.remove("a")
    for reader, view, snapshot in zip(readers, views, snapshots, strict=True):
        view.apply(snapshot)
        reader.until(view, lambda v: names(v) == {"b"})
        assert view.revision == harness.hub.head_revision()
    listed = harness.stub.ListPeers(pb.ListPeersRequest(filter=request.filter), timeout=10)
    assert list(views[0].peers.values()) == list(views[1].peers.values()) == list(listed.peers)
    assert list(listed.peers[0].groups) == ["prefill"]


class _RecordingServer:
    """Stands in for ``grpc.aio.Server`` where ``add_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler[object, object]]] = {}
        self.generic: list[object] = []

    def add_generic_rpc_handlers(self, handlers: tuple[object, ...]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[object, object]]
    ) -> None:
        self.registered[service] = handlers


def test_add_to_server_registers_every_method_of_the_proto_service() -> None:
    """``add_to_server`` lists the service's methods by hand (WatchPeers without a response serializer): an RPC
    added to the proto but not there would be UNIMPLEMENTED, so the list must equal the proto's."""
    server = _RecordingServer()
    add_to_server(DiscoveryService.__new__(DiscoveryService), server)  # type: ignore[arg-type]
    service = pb.DESCRIPTOR.services_by_name["Discovery"]
    (handlers,) = server.registered.values()
    assert list(server.registered) == [service.full_name] and len(server.generic) == 1
    assert set(handlers) == {method.name for method in service.methods}
    for method in service.methods:
        handler = handlers[method.name]
        assert handler.response_streaming == method.server_streaming
        assert handler.request_streaming == method.client_streaming
        if method.name == "WatchPeers":
            assert handler.response_serializer is None  # written as the bytes the service serialized
        else:
            assert handler.response_serializer is not None


def test_resume_gets_exactly_what_was_missed(harness: Harness) -> None:
    harness.add("a")
    harness.add("b")
    harness.sync()
    call = harness.stub.WatchPeers(pb.WatchPeersRequest())
    reader = Reader(call)
    view = PeerSetView()
    view.apply(reader.next())
    assert names(view) == {"a", "b"}
    call.cancel()
    harness.remove("a")
    harness.add("c")
    reader2 = Reader(harness.stub.WatchPeers(view.resume_request(pb.PeerFilter())))
    resumed = reader2.next()
    assert resumed.WhichOneof("kind") == "resumed"
    updates = []
    while view.revision < harness.hub.head_revision():
        updates.append(view.apply(reader2.next()))
    assert names(view) == {"b", "c"}
    added = [p.name for u in updates for p in u.added]
    removed = [p.name for u in updates for p in u.removed]
    assert added == ["c"] and removed == ["a"], "only the missed changes, no replay of b"
    assert not any(u.reset for u in updates)


def test_resume_from_another_history_or_evicted_history_gets_flagged_snapshot() -> None:
    h = Harness(history=3)
    try:
        h.sync()
        other = Reader(h.stub.WatchPeers(pb.WatchPeersRequest(resume_history_id="another-process", resume_revision=1)))
        message = other.next()
        assert message.snapshot.reason == pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE
        for i in range(6):
            h.add(f"p{i}")
        evicted = Reader(h.stub.WatchPeers(pb.WatchPeersRequest(resume_history_id=h.hub.history_id, resume_revision=1)))
        message = evicted.next()
        assert message.WhichOneof("kind") == "snapshot"
        assert message.snapshot.reason == pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE
        assert {p.name for p in message.snapshot.peers} == {f"p{i}" for i in range(6)}
    finally:
        h.close()


def test_slow_client_is_reset_with_a_snapshot_not_buffered() -> None:
    h = Harness(history=4)
    try:
        h.sync()
        call = h.stub.WatchPeers(pb.WatchPeersRequest())
        iterator = iter(call)
        view = PeerSetView()
        view.apply(next(iterator))
        big = {"blob": "x" * 200_000}  # a few of these fill HTTP/2 flow-control windows: the server blocks
        for i in range(40):
            h.add(f"p{i % 8}", data={**big, "i": i})
        resets = complete = 0
        while view.revision < h.hub.head_revision():
            message = next(iterator)
            if message.WhichOneof("kind") == "snapshot":
                assert message.snapshot.reason == pb.SNAPSHOT_REASON_CLIENT_TOO_SLOW
                resets += 1
                complete += 0 if message.partial else 1  # a large snapshot comes in parts: one reset
            view.apply(message)
        assert resets >= 1, "a client that fell out of the history must get a fresh snapshot"
        counted = h.metrics.registry.get_sample_value("discovery_stream_slow_client_resets_total")
        assert counted == complete, "each reset is counted (the chart's DiscoverySidecarSlowClients alert reads it)"
        truth = {f"p{i}" for i in range(8)}
        assert names(view) == truth
        last_i = {p.name: json.loads(p.data_json)["i"] for p in view.peers.values()}
        assert last_i == {f"p{k}": max(i for i in range(40) if i % 8 == k) for k in range(8)}
        call.cancel()
    finally:
        h.close()


def test_filters_selector_groups_and_label_moves(harness: Harness) -> None:
    harness.add("pre-0", labels={"role": "prefill"})
    harness.add("dec-0", labels={"role": "decode"})
    harness.add("fe-0", labels={"role": "frontend"})
    harness.sync()
    request = pb.WatchPeersRequest(
        filter=make_filter("role in (prefill,decode)", {"prefill": "role=prefill", "decode": "role=decode"})
    )
    reader = Reader(harness.stub.WatchPeers(request))
    view = PeerSetView()
    view.apply(reader.next())
    assert {p.name: list(p.groups) for p in view.peers.values()} == {"pre-0": ["prefill"], "dec-0": ["decode"]}
    harness.crs["pre-0"] = worker_cr("pre-0", "uid-pre-0", {"role": "frontend"})
    harness.feed.upsert(WORKER_METADATA, harness.crs["pre-0"])
    update = view.apply(reader.next())
    assert [p.name for p in update.removed] == ["pre-0"], "a label change out of the selector is a removal"
    listed = harness.stub.ListPeers(pb.ListPeersRequest(filter=make_filter("role=decode")), timeout=5)
    assert [p.name for p in listed.peers] == ["dec-0"]


@pytest.mark.parametrize(
    ("selector", "groups", "fragment"),
    [
        ("role in prefill", {}, "filter.selector"),
        ("", {"": "a=b"}, "groups[0].name"),
        ("", {"g": "=b"}, "filter.groups[0] (g).selector"),
    ],
)
def test_invalid_filters_are_invalid_argument(harness: Harness, selector: str, groups: dict, fragment: str) -> None:
    harness.sync()
    with pytest.raises(grpc.RpcError) as err:
        next(iter(harness.stub.WatchPeers(pb.WatchPeersRequest(filter=make_filter(selector, groups)))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    with pytest.raises(grpc.RpcError) as unary:
        harness.stub.ListPeers(pb.ListPeersRequest(filter=make_filter(selector, groups)), timeout=5)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_self_is_excluded_unless_asked(harness: Harness) -> None:
    harness.pods[SELF.name] = (SELF.uid, True)
    harness.crs[SELF.name] = worker_cr(SELF.name, SELF.uid)
    harness.add("peer")
    harness.sync()
    default = harness.stub.ListPeers(pb.ListPeersRequest(), timeout=5)
    assert [p.name for p in default.peers] == ["peer"]
    with_self = harness.stub.ListPeers(pb.ListPeersRequest(filter=pb.PeerFilter(include_self=True)), timeout=5)
    assert sorted(p.name for p in with_self.peers) == ["peer", SELF.name]


def test_status_changes_are_streamed_and_resumed_correctly(harness: Harness) -> None:
    harness.add("a")
    harness.sync()
    call = harness.stub.WatchPeers(pb.WatchPeersRequest())
    reader = Reader(call)
    view = PeerSetView()
    view.apply(reader.next())
    harness.feed.set_health(ENDPOINT_SLICES, False, "connection refused")
    update = view.apply(reader.next())
    assert update.kind == "status" and not update.connected and "connection refused" in update.status_reason
    assert names(view) == {"a"}, "peers are kept (as possibly stale) while degraded"
    call.cancel()
    harness.feed.set_health(ENDPOINT_SLICES, True)
    resumed = Reader(harness.stub.WatchPeers(view.resume_request(pb.PeerFilter())))
    marker = view.apply(resumed.next())
    assert marker.kind == "resumed" and not marker.connected, "the resume point is still in the degraded era"
    recovered = view.apply(resumed.next())
    assert recovered.kind == "status" and recovered.connected


def test_health_and_reflection(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    name = "discovery.v1.Discovery"
    assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == (
        health_pb2.HealthCheckResponse.NOT_SERVING
    )
    harness.server.set_serving(True)
    assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    stub = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {name, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_grpc_listen_refuses_non_loopback() -> None:
    from sidecar.app.config import parse_grpc_listen

    with pytest.raises(ValueError, match="loopback"):
        parse_grpc_listen("0.0.0.0:50051")
    assert parse_grpc_listen("unix:///run/d.sock").unix_path == "/run/d.sock"


def test_unix_socket_listener_and_cli_client(socket_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a socket whose path is as long as the kernel allows (the setting refuses longer ones): the server
    binds it and the CLI reaches it."""
    from sidecar.app.cli import main as cli_main

    socket_path = socket_dir / ("s" * (UNIX_PATH_MAX - len(str(socket_dir)) - 1))
    assert len(str(socket_path)) == UNIX_PATH_MAX
    hub = new_hub(100, SELF.uid)
    feed = SourceFeed(hub)
    server = GrpcServer(DiscoveryService(hub, None, SELF, Metrics()), ListenAddress(unix_path=str(socket_path)))
    server.start()
    try:
        feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", {"w-0": ("uid-w-0", True)})])
        feed.replace(WORKER_METADATA, [worker_cr("w-0", "uid-w-0", {"role": "decode"}, {"seq": 7})])
        assert socket_path.exists()
        assert cli_main(["peers", "--target", f"unix://{socket_path}", "-o", "json"]) == 0
        listing = json.loads(capsys.readouterr().out)
        assert [(p["name"], p["state"], p["data"]) for p in listing["peers"]] == [("w-0", "ready", {"seq": 7})]
        assert cli_main(["peers", "--target", f"unix://{socket_path}", "-l", "role in (", "-o", "json"]) == 1
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
    finally:
        hub.close()
        server.stop(0.5)


def test_large_snapshots_and_deltas_arrive_in_parts_under_the_message_limit() -> None:
    """10,000 peers with metadata are far above gRPC's 4 MiB default message limit when sent whole."""
    h = Harness(history=20000)
    try:
        big = {"model_cards": {"m": {"blob": "x" * 800}}}
        h.pods = {f"p{i}": (f"uid-p{i}", True) for i in range(10000)}
        h.crs = {p: worker_cr(p, uid, {"i": str(n)}, big) for n, (p, (uid, _)) in enumerate(h.pods.items())}
        h.sync()
        call = h.stub.WatchPeers(pb.WatchPeersRequest())
        iterator = iter(call)
        view = PeerSetView()
        parts = []
        update = None
        while update is None:
            message = next(iterator)
            assert message.ByteSize() < 4 * 2**20
            parts.append(message)
            update = view.apply(message)
        assert len(parts) > 1 and all(m.partial for m in parts[:-1]) and not parts[-1].partial
        assert {m.revision for m in parts} == {parts[-1].revision}
        assert update.kind == "snapshot" and len(update.peers) == 10000
        # One slice change that removes every peer: big deltas arrive in parts too, each applied as a unit.
        h.feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", {p: (uid, False) for p, (uid, _) in h.pods.items()})])
        removed, partial_messages = 0, 0
        while view.peers:
            message = next(iterator)
            assert message.ByteSize() < 4 * 2**20
            partial_messages += message.partial
            update = view.apply(message)
            if update is None:
                assert len(view.peers) == 10000 - removed, "parts are applied only once the last one arrives"
            else:
                assert update.kind == "delta"
                removed += len(update.removed)
        assert removed == 10000 and partial_messages > 0
        call.cancel()
    finally:
        h.close()


def test_list_peers_never_sends_a_reply_the_client_cannot_decode(harness: Harness) -> None:
    """A peer set over gRPC's default 4 MiB is refused with its size (RESOURCE_EXHAUSTED), unless the client
    says it accepts more (max_reply_bytes, as the Python client does); WatchPeers sends it in parts."""
    for i in range(24):  # 24 peers x ~200 KiB of metadata: about 9.5 MiB as Struct + JSON
        harness.add(f"big-{i}", data={"blob": f"{i:03d}" * 70_000})
    harness.sync()
    with pytest.raises(grpc.RpcError) as refused:
        harness.stub.ListPeers(pb.ListPeersRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the 24 peers matching this filter make a" in (refused.value.details() or "")
    assert "use WatchPeers" in (refused.value.details() or "")
    with grpc.insecure_channel(harness.server.target, options=[("grpc.max_receive_message_length", 64 * 2**20)]) as big:
        reply = pb_grpc.DiscoveryStub(big).ListPeers(pb.ListPeersRequest(max_reply_bytes=64 * 2**20), timeout=30)
    assert len(reply.peers) == 24
    small = harness.stub.ListPeers(pb.ListPeersRequest(filter=pb.PeerFilter(selector="nothing=here")), timeout=30)
    assert list(small.peers) == []
