"""Tests for discovery_client.client: the shared reconnect logic alone, then each client against a real gRPC server.

``_ResumableWatch`` decides everything about reconnecting (the request, what a message means, what an
error means), so it is tested without a server. The two client tests then check that the sync and the
asyncio ``watch`` wire it to a real stream: a snapshot, a broken stream, a resumed call, a delta.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncGenerator, Iterable, Iterator
from concurrent import futures
from contextlib import aclosing
from typing import NamedTuple, cast

import grpc
import pytest

from devcluster.faults import FaultProxy
from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from discovery_client.client import (
    PERMANENT_CODES,
    AsyncDiscoveryClient,
    DiscoveryClient,
    PeerSetUpdate,
    PeerSetView,
    _ResumableWatch,
    make_filter,
)

DEADLINE = 10.0
"""Seconds any wait in these tests may take before it fails."""

RETRYABLE_CODES = [
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
]


class FakeRpcError(grpc.RpcError):
    """An RpcError with a status code, as a failed call raises it."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def peer(name: str, **labels: str) -> pb.Peer:
    return pb.Peer(name=name, uid=f"uid-{name}", namespace="ns", labels=labels)


def snapshot(revision: int, history_id: str, *peers: pb.Peer, partial: bool = False) -> pb.WatchPeersResponse:
    return pb.WatchPeersResponse(
        revision=revision,
        history_id=history_id,
        snapshot=pb.Snapshot(peers=peers, reason=pb.SNAPSHOT_REASON_INITIAL),
        partial=partial,
    )


def delta(
    revision: int, history_id: str, *events: tuple[pb.EventType, pb.Peer], partial: bool = False
) -> pb.WatchPeersResponse:
    return pb.WatchPeersResponse(
        revision=revision,
        history_id=history_id,
        delta=pb.Delta(events=[pb.PeerEvent(type=t, peer=p) for t, p in events]),
        partial=partial,
    )


def names(peers: Iterable[pb.Peer]) -> set[str]:
    return {p.name for p in peers}


# --- the shared reconnect logic, without a server -------------------------------------------------


class TestRetryableErrorsWaitWithGrowingBackoff:
    @pytest.mark.parametrize("code", RETRYABLE_CODES, ids=lambda c: c.name)
    def test_delays_stay_within_the_bounds_and_grow_to_the_maximum(self, code: grpc.StatusCode) -> None:
        """Each retryable failure returns a delay in [bound/2, bound] with bound = min(max, 0.1 * 2**n):
        they never shrink while the bound doubles, and never exceed max_backoff."""
        watch = _ResumableWatch(max_backoff=1.6)
        delays = [watch.on_error(FakeRpcError(code)) for _ in range(8)]
        for attempt, delay in enumerate(delays):
            bound = min(1.6, 0.1 * 2**attempt)
            assert bound / 2 <= delay <= bound, (attempt, delay)
        growing = delays[:5]  # bounds 0.1 .. 1.6 doubling: each draw is at least the previous bound
        assert growing == sorted(growing)
        assert all(0.8 <= d <= 1.6 for d in delays[4:]), "capped at max_backoff"

    def test_backoff_runs_from_100ms_to_max_backoff(self) -> None:
        """The delays start at 0.1 s and are bounded by max_backoff; each failure counts one attempt."""
        watch = _ResumableWatch(max_backoff=2.5)
        assert (watch.backoff.initial, watch.backoff.maximum, watch.backoff.attempts) == (0.1, 2.5, 0)
        watch.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
        assert watch.backoff.attempts == 1


class TestPermanentErrorsRaise:
    @pytest.mark.parametrize("code", PERMANENT_CODES, ids=lambda c: c.name)
    def test_permanent_code_is_reraised(self, code: grpc.StatusCode) -> None:
        """A code that retrying cannot fix (bad filter, unimplemented, auth) is raised as it came, unwaited."""
        watch = _ResumableWatch()
        error = FakeRpcError(code)
        with pytest.raises(grpc.RpcError) as raised:
            watch.on_error(error)
        assert raised.value is error
        assert watch.backoff.attempts == 0


class TestCancelledRaises:
    def test_cancelled_is_reraised(self) -> None:
        """CANCELLED is the caller's own doing (channel closed, call cancelled): never a reason to reconnect."""
        watch = _ResumableWatch()
        error = FakeRpcError(grpc.StatusCode.CANCELLED)
        with pytest.raises(grpc.RpcError) as raised:
            watch.on_error(error)
        assert raised.value is error


class TestNoReconnectRaises:
    @pytest.mark.parametrize("code", RETRYABLE_CODES, ids=lambda c: c.name)
    def test_retryable_code_is_reraised_when_reconnect_is_off(self, code: grpc.StatusCode) -> None:
        """With reconnect=False every failure ends the watch, even one that would otherwise be retried."""
        watch = _ResumableWatch(reconnect=False)
        error = FakeRpcError(code)
        with pytest.raises(grpc.RpcError) as raised:
            watch.on_error(error)
        assert raised.value is error


class TestMessageResetsBackoff:
    def test_a_message_after_failures_restarts_the_backoff(self) -> None:
        """Once the stream delivers again, the next failure waits the initial delay, not the grown one."""
        watch = _ResumableWatch(max_backoff=5.0)
        for _ in range(5):
            watch.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
        assert watch.backoff.attempts == 5
        watch.on_message(snapshot(1, "h", peer("a")))
        assert watch.backoff.attempts == 0
        assert 0.05 <= watch.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE)) <= 0.1

    def test_a_partial_message_also_resets_the_backoff(self) -> None:
        """Any message shows the stream is healthy, even the first part of a change."""
        watch = _ResumableWatch()
        watch.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
        watch.on_message(snapshot(1, "h", peer("a"), partial=True))
        assert watch.backoff.attempts == 0


class TestPartialMessages:
    def test_parts_return_none_and_the_last_part_the_whole_change(self) -> None:
        """The parts of one change are gathered: None for each partial part, one update for all of them."""
        watch = _ResumableWatch()
        assert watch.on_message(snapshot(4, "h", peer("a"), partial=True)) is None
        assert watch.on_message(snapshot(4, "h", peer("b"), partial=True)) is None
        assert watch.view.peers == {}, "nothing is applied before the change is complete"
        update = watch.on_message(snapshot(4, "h", peer("c")))
        assert update is not None
        assert (update.kind, update.revision, update.reset) == ("snapshot", 4, True)
        assert names(update.peers.values()) == {"a", "b", "c"}
        assert names(update.added) == {"a", "b", "c"}


class TestResumeRequest:
    def test_first_request_carries_the_filter_and_no_position(self) -> None:
        """Before any message the request asks for a fresh stream with the caller's filter."""
        watch = _ResumableWatch(make_filter("role=decode", {"prefill": "role=prefill"}, ready_only=True))
        request = watch.request()
        assert (request.resume_history_id, request.resume_revision) == ("", 0)
        assert request.filter.selector == "role=decode"
        assert request.filter.ready_only
        assert [(g.name, g.selector) for g in request.filter.groups] == [("prefill", "role=prefill")]

    def test_resume_from_the_last_complete_change(self) -> None:
        """After a snapshot and the first part of a delta, the request resumes at the snapshot's revision
        and history; the dropped part is not mixed into the change resent after reconnecting."""
        watch = _ResumableWatch(make_filter("role=decode"))
        watch.on_message(snapshot(7, "hist-1", peer("a"), peer("b")))
        watch.on_message(delta(9, "hist-1", (pb.EVENT_TYPE_REMOVED, peer("a")), partial=True))
        request = watch.request()
        assert (request.resume_history_id, request.resume_revision) == ("hist-1", 7)
        assert request.filter.selector == "role=decode"
        update = watch.on_message(delta(9, "hist-1", (pb.EVENT_TYPE_ADDED, peer("c"))))
        assert update is not None
        assert names(update.removed) == set(), "the part sent before the break was dropped"
        assert names(watch.view.peers.values()) == {"a", "b", "c"}
        assert (watch.request().resume_history_id, watch.request().resume_revision) == ("hist-1", 9)

    def test_a_given_view_is_used_and_resumed_from(self) -> None:
        """A caller's view (the sync client's ``view=``) is the one applied to and resumed from."""
        view = PeerSetView()
        view.apply(snapshot(3, "hist-0", peer("a")))
        watch = _ResumableWatch(view=view)
        assert watch.view is view
        assert (watch.request().resume_history_id, watch.request().resume_revision) == ("hist-0", 3)


# --- each client against a real in-process gRPC server --------------------------------------------

HISTORY = "hist-42"
FIRST = snapshot(3, HISTORY, peer("a", role="decode"), peer("b", role="decode"))
SECOND = delta(
    5,
    HISTORY,
    (pb.EVENT_TYPE_REMOVED, peer("b", role="decode")),
    (pb.EVENT_TYPE_ADDED, peer("c", role="decode")),
    (pb.EVENT_TYPE_UPDATED, peer("a", role="decode", zone="z1")),
)


class ScriptedDiscovery(pb_grpc.DiscoveryServicer):
    """WatchPeers in two acts: the first call gets a snapshot and then UNAVAILABLE; the second must resume
    from that snapshot (or is refused with a permanent code), gets a delta and stays open until cancelled."""

    def __init__(self) -> None:
        self.requests: queue.Queue[pb.WatchPeersRequest] = queue.Queue()
        self._calls = 0
        self._lock = threading.Lock()

    def WatchPeers(  # noqa: N802 (the generated servicer's name)
        self, request: pb.WatchPeersRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchPeersResponse]:
        self.requests.put(request)
        with self._lock:
            self._calls += 1
            call = self._calls
        if call == 1:
            yield FIRST
            context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar restarting")
        if call > 2:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected call {call}")
        if (request.resume_history_id, request.resume_revision) != (HISTORY, FIRST.revision):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"did not resume: {request}")
        ended = threading.Event()
        context.add_callback(ended.set)
        yield SECOND
        ended.wait(DEADLINE)  # hold the stream open until the client cancels it (or the server stops)


@pytest.fixture
def server() -> Iterator[tuple[ScriptedDiscovery, str]]:
    servicer = ScriptedDiscovery()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DiscoveryServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer, f"127.0.0.1:{port}"
    assert grpc_server.stop(grace=0).wait(DEADLINE)


Seen = tuple[PeerSetUpdate, set[str]]
"""An update and the peer names it held when it was yielded (``peers`` moves on with later messages)."""


def check_resumed_stream(servicer: ScriptedDiscovery, updates: list[Seen]) -> None:
    """The assertions shared by both clients' tests."""
    requests = [servicer.requests.get(timeout=DEADLINE) for _ in range(2)]
    assert servicer.requests.empty(), "exactly one reconnect"
    assert (requests[0].resume_history_id, requests[0].resume_revision) == ("", 0)
    assert (requests[1].resume_history_id, requests[1].resume_revision) == (HISTORY, 3)
    assert [r.filter.selector for r in requests] == ["role=decode", "role=decode"]

    (first, first_names), (second, second_names) = updates
    assert (first.kind, first.revision, first.history_id, first.reset) == ("snapshot", 3, HISTORY, True)
    assert first_names == {"a", "b"}
    assert (second.kind, second.revision, second.reset) == ("delta", 5, False)
    assert (names(second.added), names(second.updated), names(second.removed)) == ({"c"}, {"a"}, {"b"})
    assert second_names == {"a", "c"}
    assert second.peers["uid-a"].labels["zone"] == "z1"


class TestSyncClientResumesAfterBrokenStream:
    def test_snapshot_then_unavailable_then_resumed_delta(self, server: tuple[ScriptedDiscovery, str]) -> None:
        """DiscoveryClient.watch yields the snapshot, reconnects after UNAVAILABLE resuming from it, then
        yields the delta; the caller's view holds the resulting peer set."""
        servicer, target = server
        view = PeerSetView()
        seen: queue.Queue[Seen | BaseException] = queue.Queue()

        def follow() -> None:
            try:
                for update in client.watch(make_filter("role=decode"), max_backoff=0.2, view=view):
                    seen.put((update, names(update.peers.values())))
                    if update.kind == "delta":
                        break  # closing the generator cancels the call
            except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
                seen.put(exc)

        with DiscoveryClient(target) as client:
            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            updates: list[Seen] = []
            for _ in range(2):
                item = seen.get(timeout=DEADLINE)
                if isinstance(item, BaseException):
                    raise item
                updates.append(item)
            reader.join(DEADLINE)
            assert not reader.is_alive()
        check_resumed_stream(servicer, updates)
        assert names(view.peers.values()) == {"a", "c"}
        assert (view.history_id, view.revision) == (HISTORY, 5)


class TestAsyncClientResumesAfterBrokenStream:
    def test_snapshot_then_unavailable_then_resumed_delta(self, server: tuple[ScriptedDiscovery, str]) -> None:
        """AsyncDiscoveryClient.watch yields the snapshot, reconnects after UNAVAILABLE resuming from it,
        then yields the delta."""
        servicer, target = server

        async def follow() -> list[Seen]:
            client = AsyncDiscoveryClient(target)
            peer_filter = make_filter("role=decode")
            updates: list[Seen] = []
            try:
                watch = cast(AsyncGenerator[PeerSetUpdate, None], client.watch(peer_filter, max_backoff=0.2))
                async with aclosing(watch) as stream:  # closing it cancels the call
                    async for update in stream:
                        updates.append((update, names(update.peers.values())))
                        if update.kind == "delta":
                            break
            finally:
                await client.close()
            return updates

        updates = asyncio.run(asyncio.wait_for(follow(), DEADLINE))
        check_resumed_stream(servicer, updates)


# --- metadata survives a restart of the sidecar ------------------------------------------------------
class SidecarProcessStandIn(pb_grpc.DiscoveryServicer):
    """One sidecar process's registration: starts from ``initial`` (DISCOVERY_METADATA) and records publishes."""

    def __init__(self, initial: dict[str, object], refuse: grpc.StatusCode | None = None) -> None:
        self.data = dict(initial)
        self.refuse = refuse
        self.publishes: queue.Queue[dict[str, object]] = queue.Queue()

    def GetSelf(self, request: pb.GetSelfRequest, context: grpc.ServicerContext) -> pb.GetSelfResponse:  # noqa: N802
        return pb.GetSelfResponse(name="worker-0", data_json=json.dumps(self.data), registered=True)

    def PublishMetadata(  # noqa: N802
        self, request: pb.PublishMetadataRequest, context: grpc.ServicerContext
    ) -> pb.PublishMetadataResponse:
        if self.refuse is not None:
            context.abort(self.refuse, "watch-only: managed by 'dynamo-worker'")
        document = json.loads(request.data_json)
        self.data = document if request.mode != pb.PUBLISH_MODE_MERGE_PATCH else {**self.data, **document}
        self.publishes.put(dict(self.data))
        return pb.PublishMetadataResponse(data_json=json.dumps(self.data), metadata_resource_version="1")


def serve(servicer: pb_grpc.DiscoveryServicer, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DiscoveryServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


class TestRepublishAfterSidecarRestart:
    INITIAL: dict[str, object] = {"endpoints": {}}

    def test_a_restarted_sidecar_gets_the_last_applied_metadata_again(self) -> None:
        first = SidecarProcessStandIn(self.INITIAL)
        server, port = serve(first)
        client = DiscoveryClient(f"127.0.0.1:{port}")
        second_server = None
        try:
            client.publish_metadata({"custom": {"warm": True}}, merge=True)
            expected = {"endpoints": {}, "custom": {"warm": True}}
            assert first.publishes.get(timeout=DEADLINE) == expected

            assert server.stop(grace=0).wait(DEADLINE)
            second = SidecarProcessStandIn(self.INITIAL)  # a new process: back to DISCOVERY_METADATA
            second_server, _ = serve(second, port)
            assert second.publishes.get(timeout=DEADLINE) == expected, "the whole document as last applied"
            assert second.data == expected
        finally:
            client.close()
            server.stop(grace=0)
            if second_server is not None:
                second_server.stop(grace=0)

    def test_nothing_is_sent_when_the_sidecar_holds_it_already(self, stand_in: StandInServer) -> None:
        with DiscoveryClient(stand_in.target) as client:
            client.publish_metadata({"a": 1})
            stand_in.servicer.publishes.get(timeout=DEADLINE)
            assert client.ensure_published() is True
            assert stand_in.servicer.publishes.empty()

    def test_a_refusal_for_good_stops_trying(self, stand_in: StandInServer) -> None:
        with DiscoveryClient(stand_in.target) as client:
            client.publish_metadata({"a": 1})
            stand_in.servicer.publishes.get(timeout=DEADLINE)
            stand_in.servicer.data = {}  # a restarted sidecar that went watch-only
            stand_in.servicer.refuse = grpc.StatusCode.FAILED_PRECONDITION
            assert client.ensure_published() is False

    def test_a_client_that_never_published_sends_nothing(self, stand_in: StandInServer) -> None:
        with DiscoveryClient(stand_in.target) as client:
            assert client.ensure_published() is True
            assert stand_in.servicer.publishes.empty()


class StandInServer(NamedTuple):
    servicer: SidecarProcessStandIn
    target: str


@pytest.fixture
def stand_in() -> Iterator[StandInServer]:
    servicer = SidecarProcessStandIn(TestRepublishAfterSidecarRestart.INITIAL)
    server, port = serve(servicer)
    yield StandInServer(servicer, f"127.0.0.1:{port}")
    server.stop(grace=0)


class TestASidecarSlowToAnswerIsWaitedFor:
    """A connection attempt gets gRPC's own 20 s. The client once set ``grpc.min_reconnect_backoff_ms`` to 100 ms
    for quick reconnections, which gRPC core also takes as each attempt's deadline: a sidecar that took longer
    than about a second (the backoff's cap) to answer a new connection was never reached."""

    def test_a_call_reaches_a_sidecar_that_answers_connections_after_a_pause(self, stand_in: StandInServer) -> None:
        slow = FaultProxy(int(stand_in.target.rsplit(":", 1)[1]))
        slow.answer_after(1.5)
        try:
            with DiscoveryClient(f"127.0.0.1:{slow.port}") as client:
                assert client.get_self(timeout=DEADLINE).name == "worker-0"
        finally:
            slow.close()
