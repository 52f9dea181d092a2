"""The aio server under many streams: unary calls and health are never starved, streams are bounded.

A pod-local API must answer health checks and PublishMetadata whatever its watchers do. These open
many WatchPeers streams (each actually receiving its snapshot) and check that the unary calls and
health still answer, that the stream limit refuses with a message that says what to do, that the
server's thread count does not grow with streams, and that shutdown ends open streams with UNAVAILABLE
and leaves no thread behind. Nothing here sleeps to synchronise: every wait has a condition and a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devcluster.waiting import wait_for
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import PeerSetView
from sidecar.core.eventlog import ApiStatus, LogEntry
from sidecar.kube.sources import ENDPOINT_SLICES, WORKER_METADATA
from sidecar.peers.hub import PeerHub
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import Forbidden, ListenAddress, PeerSetState, Registration, Subscriber, Unavailable
from sidecar.serve.grpc_server import GrpcServer
from sidecar.serve.grpc_service import BLOCKING_WORKERS, ENCODING_WORKERS, SERVICE_NAME, DiscoveryService
from tests.unit.feeding import SourceFeed, new_hub
from tests.unit.test_grpc_stream import (
    SELF,
    Harness,
    Reader,
    endpoint_slice,
    worker_cr,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
LOOPBACK = ListenAddress(host="127.0.0.1", port=0)


def rss_bytes() -> int:
    """This process's resident set size after a collection and a heap trim (Linux; 0 where unavailable).

    Trimming returns what earlier tests freed, so the difference of two readings is what was retained."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def subscribers(h: Harness) -> float | None:
    """The ``discovery_stream_subscribers`` gauge."""
    return h.metrics.registry.get_sample_value("discovery_stream_subscribers")


class FakePublisher:
    """A ``Publisher`` whose publish blocks until the test releases it (like a slow API server)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.version = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail_with: Exception | None = None
        self._lock = threading.Lock()

    def registration(self) -> Registration:
        with self._lock:
            return Registration(
                True, str(self.version), dict(self.data), {"app": "w"}, name=SELF.name, peer_uid=SELF.uid, instance_id=1
            )

    def publish(self, document: Mapping[str, Any], merge: bool) -> Registration:
        self.entered.set()
        if not self.release.wait(30):
            raise Unavailable("the test never released this publish")
        if self.fail_with is not None:
            raise self.fail_with
        with self._lock:
            self.data = {**self.data, **document} if merge else dict(document)
            self.version += 1
        return self.registration()

    def problems(self) -> list[str]:
        return []


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


def synced_harness(peers: int = 5, **kwargs: Any) -> Harness:
    h = Harness(**kwargs)
    for i in range(peers):
        h.add(f"p{i}", labels={"role": "decode"})
    h.sync()
    h.server.set_serving(True)
    return h


async def open_streams(stub: pb_grpc.DiscoveryStub, count: int) -> list[Any]:
    """``count`` WatchPeers calls on one channel, each past its first message (which must be a snapshot)."""
    calls = [stub.WatchPeers(pb.WatchPeersRequest()) for _ in range(count)]
    firsts = await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), 60)
    kinds = [message.WhichOneof("kind") for message in firsts]
    assert kinds == ["snapshot"] * count, "every stream receives its snapshot"
    assert all(len(message.snapshot.peers) > 0 for message in firsts)
    return calls


def test_unary_calls_and_health_answer_with_200_streams_open(publisher: FakePublisher) -> None:
    """The old server refused everything with RESOURCE_EXHAUSTED once 64 streams were open."""
    h = synced_harness(publisher=publisher)
    try:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(h.server.target) as channel:
                stub = pb_grpc.DiscoveryStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                calls = await open_streams(stub, 200)
                assert h.service.streams == 200
                assert subscribers(h) == 200
                # A publish stuck in network IO holds a pool thread, never the loop:
                publisher.release.clear()
                publish = asyncio.ensure_future(
                    stub.PublishMetadata(pb.PublishMetadataRequest(data_json='{"seq": 1}'), timeout=20)
                )
                assert await asyncio.to_thread(publisher.entered.wait, 10), "the publish reached the publisher"
                check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                assert check.status == SERVING
                listed = await stub.ListPeers(pb.ListPeersRequest(), timeout=5)
                assert sorted(p.name for p in listed.peers) == [f"p{i}" for i in range(5)]
                me = await stub.GetSelf(pb.GetSelfRequest(), timeout=5)
                assert me.name == "self-0" and me.registered and me.metadata_resource_version == "0"
                assert not publish.done()
                publisher.release.set()
                reply = await publish
                assert reply.metadata_resource_version == "1" and reply.data_json == '{"seq":1}'
                me = await stub.GetSelf(pb.GetSelfRequest(), timeout=5)
                assert me.data_json == '{"seq":1}'
                # Publish errors keep their meaning (PUBLISH_ERROR_CODES) and their text.
                publisher.fail_with = Forbidden("the admission policy forbids this label")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.PublishMetadata(pb.PublishMetadataRequest(data_json="{}"), timeout=5)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert refused.value.details() == "the admission policy forbids this label"
                with pytest.raises(grpc.aio.AioRpcError) as invalid:
                    await stub.PublishMetadata(pb.PublishMetadataRequest(data_json="[1]"), timeout=5)
                assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert invalid.value.details() == "the metadata must be a JSON object, got list"
                # And the 200 streams still stream.
                h.add("late", labels={"role": "decode"})
                for call in calls:
                    while True:
                        message = await asyncio.wait_for(call.read(), 10)
                        if any(e.peer.name == "late" for e in message.delta.events):
                            break
                for call in calls:
                    call.cancel()

        asyncio.run(scenario())
        wait_for(lambda: h.service.streams == 0, what="cancelled streams to be uncounted")
        assert subscribers(h) == 0
    finally:
        h.close()


def test_publish_without_a_publisher_is_failed_precondition() -> None:
    h = synced_harness()
    try:
        with pytest.raises(grpc.RpcError) as err:
            h.stub.PublishMetadata(pb.PublishMetadataRequest(data_json="{}"), timeout=5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        h.close()


def test_stream_over_the_limit_is_resource_exhausted_and_says_what_to_do() -> None:
    h = synced_harness(max_streams=3)
    try:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(h.server.target) as channel:
                stub = pb_grpc.DiscoveryStub(channel)
                calls = await open_streams(stub, 3)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.WatchPeers(pb.WatchPeersRequest()).read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = refused.value.details() or ""
                assert "3 WatchPeers streams" in details and "close streams" in details
                assert "filter.groups" in details
                # Unary calls and health are never refused because of streams.
                assert (await stub.ListPeers(pb.ListPeersRequest(), timeout=5)).peers
                assert (await stub.GetSelf(pb.GetSelfRequest(), timeout=5)).name == "self-0"
                health = health_pb2_grpc.HealthStub(channel)
                assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING
                # A stream that ends frees its place.
                calls[0].cancel()
                await asyncio.to_thread(wait_for, lambda: h.service.streams == 2, 10, "the cancelled stream")
                replacement = await open_streams(stub, 1)
                assert h.service.streams == 3
                for call in calls[1:] + replacement:
                    call.cancel()

        asyncio.run(scenario())
        wait_for(lambda: h.service.streams == 0, what="every stream to be uncounted")
    finally:
        h.close()


def _watch_many(target: str, count: int, newcomer: str, connection: Any) -> None:
    """In a separate process: ``count`` WatchPeers streams on one channel; report the snapshots, then
    the delta that adds ``newcomer`` on every stream; hold the streams until told to finish."""

    async def main() -> None:
        # One connection multiplexes every stream: the server sets no HTTP/2 concurrent-stream limit.
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DiscoveryStub(channel)
            calls = [stub.WatchPeers(pb.WatchPeersRequest()) for _ in range(count)]
            firsts = await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), 120)
            connection.send(
                ("snapshots", sum(m.WhichOneof("kind") == "snapshot" and bool(m.snapshot.peers) for m in firsts))
            )

            async def sees_newcomer(call: Any) -> bool:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return False
                    if any(e.peer.name == newcomer for e in message.delta.events):
                        return True

            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(None, connection.recv) != "go":
                return
            seen = await asyncio.wait_for(asyncio.gather(*(sees_newcomer(call) for call in calls)), 120)
            connection.send(("deltas", sum(seen)))
            await loop.run_in_executor(None, connection.recv)  # "finish"
            for call in calls:
                call.cancel()

    asyncio.run(main())


def test_1000_streams_from_one_client_process_without_a_thread_each(
    record_property: Callable[[str, object], None],
) -> None:
    streams = 1000
    h = synced_harness(peers=20)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    client = context.Process(target=_watch_many, args=(h.server.target, streams, "newcomer", theirs), daemon=True)
    try:
        # Warm up what every server allocates once (a first stream and snapshot), then measure.
        warm = h.stub.WatchPeers(pb.WatchPeersRequest())
        assert next(iter(warm)).WhichOneof("kind") == "snapshot"
        warm.cancel()
        wait_for(lambda: h.service.streams == 0, what="the warm-up stream to end")
        threads_before = threading.active_count()
        rss_before = rss_bytes()
        client.start()
        assert ours.poll(180), "the client process reports its snapshots"
        assert ours.recv() == ("snapshots", streams), "every stream received a non-empty snapshot"
        wait_for(lambda: h.service.streams == streams, what=f"{streams} streams counted")
        rss_after = rss_bytes()
        threads_with_streams = threading.active_count()
        health = health_pb2_grpc.HealthStub(h.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        assert len(h.stub.ListPeers(pb.ListPeersRequest(), timeout=5).peers) == 20
        h.add("newcomer")
        ours.send("go")
        assert ours.poll(180), "the client process reports the deltas"
        assert ours.recv() == ("deltas", streams), "every stream received the delta"
        assert subscribers(h) == streams
        per_stream = (rss_after - rss_before) / streams
        figures = {
            "streams": streams,
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "rss_per_stream_kib": round(per_stream / 1024, 1),
            "threads_before": threads_before,
            "threads_with_streams": threads_with_streams,
        }
        print(f"\nserver with {streams} WatchPeers streams: {figures}")
        for name, value in figures.items():
            record_property(name, value)
        # No thread per stream: at most the pools' threads appear, whatever the number of streams.
        assert threads_with_streams < 50
        assert threads_with_streams <= threads_before + BLOCKING_WORKERS + ENCODING_WORKERS
        ours.send("finish")
        client.join(60)
        assert client.exitcode == 0
        wait_for(lambda: h.service.streams == 0, what="the client's streams to be uncounted")
    finally:
        if client.is_alive():
            client.kill()
        h.close()


@pytest.fixture
def threads_before() -> Iterator[set[int | None]]:
    yield {t.ident for t in threading.enumerate()}


def assert_no_new_threads(before: set[int | None]) -> None:
    def leftover() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]

    try:
        wait_for(lambda: not leftover(), 10, "threads to end")
    except AssertionError:
        raise AssertionError(f"threads left behind: {leftover()}") from None


@pytest.mark.parametrize("hub_closed_first", [True, False], ids=["daemon-order", "server-only"])
def test_shutdown_ends_open_streams_with_unavailable_and_leaves_no_threads(
    threads_before: set[int | None], hub_closed_first: bool
) -> None:
    h = synced_harness()
    grace = 20.0

    async def scenario() -> float:
        async with grpc.aio.insecure_channel(h.server.target) as channel:
            stub = pb_grpc.DiscoveryStub(channel)
            calls = await open_streams(stub, 50)
            pending = [asyncio.ensure_future(call.read()) for call in calls]
            started = time.monotonic()
            if hub_closed_first:
                h.hub.close()  # what the daemon does before stopping the server
            stopping = asyncio.ensure_future(asyncio.to_thread(h.server.stop, grace))
            errors = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 15)
            for error in errors:
                assert isinstance(error, grpc.aio.AioRpcError), error
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert error.details() == "the discovery sidecar is shutting down; reconnect to resume"
            await asyncio.wait_for(stopping, 15)
            return time.monotonic() - started

    try:
        elapsed = asyncio.run(scenario())
        # The streams ended by themselves, promptly: stop() did not have to wait out its grace and cancel.
        assert elapsed < grace / 2
        assert h.service.streams == 0
        assert subscribers(h) == 0
    finally:
        h.channel.close()
        h.hub.close()
        h.server.stop(0.5)  # a second stop is a no-op
    assert_no_new_threads(threads_before)


def test_set_serving_from_many_threads_ends_in_the_last_state() -> None:
    h = Harness()
    try:
        health = health_pb2_grpc.HealthStub(h.channel)
        barrier = threading.Barrier(8)

        def flip(index: int) -> None:
            barrier.wait(5)
            for _ in range(20):
                h.server.set_serving(index % 2 == 0)

        workers = [threading.Thread(target=flip, args=(i,)) for i in range(8)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        for serving in (True, False, True):
            h.server.set_serving(serving)
            expected = SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", SERVICE_NAME):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == expected
    finally:
        h.close()


class WrappedReader:
    """The hub behind another ``PeerReader``: the service knows it only through the protocol, and is woken
    only through its one change signal (``subscribe``)."""

    def __init__(self, hub: PeerHub) -> None:
        self._hub = hub

    def subscribe(self, subscriber: Subscriber) -> None:
        self._hub.subscribe(subscriber)

    def demand(self) -> bool:
        return self._hub.demand()

    @property
    def history_id(self) -> str:
        return self._hub.history_id

    @property
    def self_uid(self) -> str:
        return self._hub.self_uid

    @property
    def closed(self) -> bool:
        return self._hub.closed

    @property
    def synced(self) -> bool:
        return self._hub.synced

    def wait_synced(self, timeout: float | None) -> bool:
        return self._hub.wait_synced(timeout)

    def state(self) -> PeerSetState:
        return self._hub.state()

    def covers(self, history_id: str, revision: int) -> bool:
        return self._hub.covers(history_id, revision)

    def status_at(self, revision: int) -> ApiStatus | None:
        return self._hub.status_at(revision)

    def wait_entries(self, after: int, timeout: float, limit: int) -> list[LogEntry] | None:
        return self._hub.wait_entries(after, timeout, limit)

    def source_health(self) -> dict[str, str]:
        return self._hub.source_health()


def test_any_reader_is_served_every_change_through_its_change_signal() -> None:
    hub = new_hub(100, SELF.uid)
    feed = SourceFeed(hub)
    server = GrpcServer(DiscoveryService(WrappedReader(hub), None, SELF, Metrics()), LOOPBACK)
    server.start()
    try:
        feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", {"a": ("uid-a", True)})])
        feed.replace(WORKER_METADATA, [worker_cr("a", "uid-a")])
        with grpc.insecure_channel(server.target) as channel:
            reader = Reader(pb_grpc.DiscoveryStub(channel).WatchPeers(pb.WatchPeersRequest()))
            view = PeerSetView()
            view.apply(reader.next())
            assert {p.name for p in view.peers.values()} == {"a"}
            feed.replace(ENDPOINT_SLICES, [endpoint_slice("s1", {"a": ("uid-a", True), "b": ("uid-b", True)})])
            feed.upsert(WORKER_METADATA, worker_cr("b", "uid-b"))
            reader.until(view, lambda v: {p.name for p in v.peers.values()} == {"a", "b"})
            reader.call.cancel()
    finally:
        hub.close()
        server.stop(0.5)


def test_a_sync_that_appends_nothing_still_releases_the_first_snapshot() -> None:
    h = Harness()
    try:
        reader = Reader(h.stub.WatchPeers(pb.WatchPeersRequest()))
        h.sync()  # no peers at all: the sync appends no log entry, yet the change signal says it synced
        first = reader.next()
        assert first.WhichOneof("kind") == "snapshot" and not first.snapshot.peers
        assert first.snapshot.reason == pb.SNAPSHOT_REASON_INITIAL
        listed = h.stub.ListPeers(pb.ListPeersRequest(), timeout=10)
        assert not listed.peers and listed.revision == first.revision
    finally:
        h.close()


def test_closing_the_hub_alone_ends_streams_with_unavailable() -> None:
    h = synced_harness()
    try:
        readers = [Reader(h.stub.WatchPeers(pb.WatchPeersRequest())) for _ in range(5)]
        for reader in readers:
            assert reader.next().WhichOneof("kind") == "snapshot"
        h.hub.close()  # no log entry and no server stop: the change signal alone says the hub closed
        for reader in readers:
            with pytest.raises(grpc.RpcError) as ended:
                reader.next()
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (ended.value.details() or "")
        health = health_pb2_grpc.HealthStub(h.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING, "the server still runs"
    finally:
        h.close()


def test_a_port_in_use_is_an_os_error_and_leaves_no_threads(threads_before: set[int | None]) -> None:
    """The CLI reports an OSError from the constructor as "cannot start" (gRPC itself raises RuntimeError)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            GrpcServer(DiscoveryService(new_hub(10, SELF.uid), None, SELF, Metrics()), ListenAddress("127.0.0.1", port))
    assert_no_new_threads(threads_before)


def test_a_port_another_sidecar_serves_is_refused_not_shared(threads_before: set[int | None]) -> None:
    """gRPC's default SO_REUSEPORT would let the second server bind as well, each then getting some of the
    clients: two sidecars on one port must fail loudly instead."""
    first = GrpcServer(DiscoveryService(new_hub(10, SELF.uid), None, SELF, Metrics()), ListenAddress("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            GrpcServer(
                DiscoveryService(new_hub(10, SELF.uid), None, SELF, Metrics()), ListenAddress("127.0.0.1", first.port)
            )
    finally:
        first.stop(0)
    assert_no_new_threads(threads_before)
