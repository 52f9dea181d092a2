"""The local gRPC API: ``discovery.v1.Discovery`` plus standard health checking and reflection.

The server is a ``grpc.aio`` server on one event-loop thread (``GrpcServer``). A ``WatchPeers`` stream
is a coroutine that holds nothing but a cursor (a revision) into the hub's shared event log: no thread.
Streams sleep on one shared wake-up (``Wakeup``) that the hub's writer threads trigger after each
commit. As a safety net (a sync or a closed hub appends nothing, so calls no listener), the service
checks the hub every ``WAKE_INTERVAL`` and triggers it when anything a stream waits for changed. On
waking, a stream reads new entries without blocking, projects them through its filter (coalesced per
peer) and sends them. gRPC's flow control suspends a send to a client that does not read; meanwhile the
log moves on without it, and if the client's position falls out of the bounded history it is sent a
fresh snapshot (``SNAPSHOT_REASON_CLIENT_TOO_SLOW``) instead of a backlog. Memory per stream is thus
bounded by one batch (or one snapshot part), whatever the client does.

Nothing that blocks runs on the loop: ``PublishMetadata`` (network IO) and the wait for the first
sync run in a small pool, snapshots (CPU proportional to the peer set) in another, so health checks
and unary calls are answered while thousands of streams are open or being (re)initialised. Streams
are bounded by ``max_streams``; unary calls and health checks are never refused because of streams.

The service reads the peer set through ``PeerReader`` and publishes through ``MetadataPublisher``
(``sidecar.ports``); it imports no Kubernetes code, and maps the publisher's errors, which carry a
meaning, to status codes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Protocol, TypeVar, runtime_checkable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from sidecar.config import ListenAddress, PodIdentity
from sidecar.core.containers import peer_key
from sidecar.core.eventlog import ApiStatus, LogEntry
from sidecar.core.instance_id import instance_id
from sidecar.core.peer import canonical_json
from sidecar.core.projection import DeltaMessage, PeerFilter, StatusMessage, project, snapshot_peers
from sidecar.metrics import Metrics
from sidecar.ports import (
    Forbidden,
    Invalid,
    MetadataPublisher,
    NotFound,
    NotRegistering,
    NotWatching,
    PeerReader,
    RegistrationError,
    TooLarge,
    Unavailable,
)
from sidecar.wire import API_STATUS, EVENT_TYPE, PeerEncoder, document_from_publish, filter_from_pb, to_struct

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Discovery"].full_name
WAKE_INTERVAL = 0.5
"""How often the service checks the hub for changes no notification reported, waking the streams if any
(seconds): the bound on how long a missed wake-up can delay a stream."""
BATCH_LIMIT = 2000
"""Most log entries folded into one read; bounds the work and memory of one iteration."""
MAX_STREAMS = 2048
"""Default limit of concurrent ``WatchPeers`` streams (``DiscoveryService(max_streams=...)``). A stream
costs no thread but ~35 KiB of RSS (measured; mostly gRPC core's per-call state), so the limit keeps a
client that leaks streams to ~70 MiB, inside a 256 MiB container limit with thousands of peers, and
bounds the per-change fan-out. Unary calls and health checks are not counted and never refused."""
BLOCKING_WORKERS = 4
"""Threads for blocking calls: ``publish`` (serialised by the publisher anyway) and the sync wait."""
ENCODING_WORKERS = 2
"""Threads that build snapshots (CPU under the GIL: more would not encode faster)."""
PENDING_MARGIN = 1024
"""Calls gRPC core may queue for the loop beyond ``max_streams`` before it cancels any (a burst)."""
DEFAULT_CLIENT_RECEIVE_BYTES = 4 * 2**20 - 64 * 1024
"""gRPC's default receive limit, less room for framing: the largest ListPeers reply sent unless asked."""
PART_BYTES = 1 << 20
"""Largest payload of one stream message: gRPC clients refuse messages over 4 MiB by default, so bigger
snapshots and deltas go out in parts (``partial``) that clients apply together."""
SHUTTING_DOWN = "the discovery sidecar is shutting down; reconnect to resume"


def split_by_size(items: list[T], size_of: Callable[[T], int], limit: int = PART_BYTES) -> list[list[T]]:
    """Consecutive groups of ``items`` whose sizes add up to at most ``limit`` (one item may exceed it)."""
    parts: list[list[T]] = [[]]
    size = 0
    for item in items:
        item_size = size_of(item)
        if parts[-1] and size + item_size > limit:
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += item_size
    return parts


PUBLISH_ERROR_CODES: dict[type[RegistrationError], grpc.StatusCode] = {
    Invalid: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    # The target may appear (the CRD gets installed) and the store come back: worth retrying.
    NotFound: grpc.StatusCode.UNAVAILABLE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotRegistering: grpc.StatusCode.FAILED_PRECONDITION,
}


def publish_error_code(exc: RegistrationError) -> grpc.StatusCode:
    for meaning, code in PUBLISH_ERROR_CODES.items():
        if isinstance(exc, meaning):
            return code
    return grpc.StatusCode.UNAVAILABLE


def too_many_streams(limit: int) -> str:
    """The RESOURCE_EXHAUSTED details of a stream over the limit: the limit, and what to do."""
    return (
        f"this sidecar already serves {limit} WatchPeers streams, its limit; close streams you no longer "
        "read, or share one stream per process (filter.groups lets one stream serve several selectors). "
        "Unary calls (ListPeers, GetSelf, PublishMetadata) and health checks are not limited"
    )


@runtime_checkable
class _Notifying(Protocol):
    """A ``PeerReader`` that can call back after each commit (``PeerHub.add_listener``)."""

    def add_listener(self, listener: Callable[[list[LogEntry]], None]) -> None: ...


class Wakeup:
    """Wakes every waiting coroutine at once; ``trigger_threadsafe`` may be called from any thread.

    A waiter takes ``current()`` *before* checking what it waits for, then awaits it: a change made after
    the check triggers an event the waiter already holds, so no wake-up is lost. ``trigger`` swaps in a
    fresh event and sets the old one (an ``asyncio.Condition`` without its lock). Triggers from other
    threads are coalesced: at most one is pending on the loop at a time. ``_pending`` is read and written
    without a lock: a writer that sees it set knows the pending trigger runs after its commit.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def current(self) -> asyncio.Event:
        return self._event

    def trigger(self) -> None:
        """Wake every waiter (on the loop)."""
        self._pending = False
        event, self._event = self._event, asyncio.Event()
        event.set()

    def trigger_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or self._pending:
            return
        self._pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits, and a writer must not fail
            loop.call_soon_threadsafe(self.trigger)


StreamContext = grpc.aio.ServicerContext[pb.WatchPeersRequest, pb.WatchPeersResponse]


class DiscoveryService(pb_grpc.DiscoveryServicer):
    """The ``discovery.v1.Discovery`` servicer, on ``GrpcServer``'s event loop.

    Owns the stream count (changed on the loop only), the wake-up the hub triggers, and two small thread
    pools for work that must not run on the loop; ``GrpcServer`` runs ``run()`` while serving and calls
    ``begin_shutdown()`` and ``close()`` when stopping. Reads ``peers`` without holding its lock across
    IO; ``PeerEncoder`` has its own lock (the pools encode too). Constructed by the daemon (or a test)
    with the hub and the publisher, before the hub's writers start (it registers a listener).
    """

    def __init__(
        self,
        peers: PeerReader,
        publisher: MetadataPublisher | None,
        identity: PodIdentity,
        metrics: Metrics,
        encoder: PeerEncoder | None = None,
        max_streams: int = MAX_STREAMS,
        metadata_name: str = "",
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.peers = peers
        self.publisher = publisher
        self.identity = identity
        # This instance's name: the pod's, or {pod}-{container} in Dynamo's container mode (its instance ID's input).
        self.metadata_name = metadata_name or identity.name
        self.metrics = metrics
        self.encoder = encoder or PeerEncoder()
        self.max_streams = max_streams
        self.streams = 0
        """Open WatchPeers streams (those counted against ``max_streams``)."""
        self._no_streams = asyncio.Event()  # set while no WatchPeers handler runs (on the loop)
        self._no_streams.set()
        # Label children resolved once: .labels() is a dict lookup under a lock, on every message sent.
        self._sent = {kind: metrics.messages_sent.labels(kind) for kind in ("snapshot", "resumed", "delta", "status")}
        self._slow_client_resets = metrics.slow_client_resets
        self.log = structlog.get_logger("sidecar.grpc")
        self._changes = Wakeup()
        self._stopping = False
        self._blocking = concurrent.futures.ThreadPoolExecutor(BLOCKING_WORKERS, thread_name_prefix="grpc-blocking")
        self._encoding = concurrent.futures.ThreadPoolExecutor(ENCODING_WORKERS, thread_name_prefix="grpc-encode")
        if isinstance(peers, _Notifying):
            peers.add_listener(lambda _entries: self._changes.trigger_threadsafe())

    # -- lifecycle (called by GrpcServer) ----------------------------------------------------------------
    async def run(self) -> None:
        """While serving: the safety net under the hub's listener. Every ``WAKE_INTERVAL`` it checks, once
        for all streams, whatever a stream may wait for (new log entries, read from the hub itself; the
        sync; shutdown) and wakes them all if any changed. Idle streams are not woken for nothing."""
        loop = asyncio.get_running_loop()
        self._changes.attach(loop)
        synced = loop.create_task(self._wake_when_synced())
        known_revision, was_synced = 0, False
        try:
            while True:
                await asyncio.sleep(WAKE_INTERVAL)
                entries = self.peers.wait_entries(known_revision, 0, BATCH_LIMIT)
                if entries is None:  # fell out of the history: everything is new
                    known_revision = self.peers.state().revision
                elif entries:
                    known_revision = entries[-1].revision
                is_synced = self.peers.synced
                if entries != [] or is_synced != was_synced or self._ending():
                    self._changes.trigger()
                was_synced = is_synced
        finally:
            synced.cancel()

    async def _wake_when_synced(self) -> None:
        # The sync itself may append nothing (no peers yet), so no listener call: one pooled thread waits.
        while not self._ending():
            if await self._in_thread(self._blocking, functools.partial(self.peers.wait_synced, WAKE_INTERVAL)):
                break
        self._changes.trigger()

    def begin_shutdown(self) -> None:
        """End every stream now, with UNAVAILABLE (on the loop)."""
        self._stopping = True
        self._changes.trigger()

    async def streams_ended(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) until every WatchPeers handler has returned; True when they all have."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), timeout)
        return self._no_streams.is_set()

    def close(self) -> None:
        """Stop the pools' threads (after the loop has stopped); waits for a publish in flight."""
        self._blocking.shutdown(wait=True, cancel_futures=True)
        self._encoding.shutdown(wait=True, cancel_futures=True)

    def _ending(self) -> bool:
        return self._stopping or self.peers.closed

    @staticmethod
    async def _in_thread(executor: concurrent.futures.Executor, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    # -- WatchPeers -------------------------------------------------------------------------------------
    async def WatchPeers(self, request: pb.WatchPeersRequest, context: StreamContext) -> None:
        """Writes the messages of ``_stream`` (an async generator) with ``context.write``, which waits for
        flow control. Not itself a generator: gRPC never closes a handler's generator, so one cancelled
        while a send waits (a client that stopped reading) would be finalised only by the garbage
        collector; here cancellation lands in this frame and the stream is uncounted at once."""
        try:
            peer_filter = filter_from_pb(request.filter)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._demand(context)
        if self.streams >= self.max_streams:
            self.log.warning("refused a WatchPeers stream: at the limit", limit=self.max_streams)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_many_streams(self.max_streams))
        self.streams += 1
        self._no_streams.clear()
        try:
            self.metrics.subscribers.inc()
            try:
                async with contextlib.aclosing(self._stream(request, peer_filter)) as messages:
                    async for message in messages:
                        await context.write(message)
            finally:
                self.metrics.subscribers.dec()
            if self._ending():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            # Counted until the handler has returned, its status included: shutdown waits for that.
            self.streams -= 1
            if self.streams == 0:
                self._no_streams.set()

    async def _demand(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Tell the reader a client wants peers (DISCOVERY_WATCH=auto starts the watches now); a sidecar that
        never watches refuses with FAILED_PRECONDITION naming the setting."""
        try:
            self.peers.demand()
        except NotWatching as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def _wait_synced(self, timeout: float | None) -> bool:
        """``PeerReader.wait_synced`` without a thread: re-checked on every wake-up. False on shutdown."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed = self._changes.current()
            if self.peers.wait_synced(0):
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if self._ending() or (remaining is not None and remaining <= 0):
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return False

    async def _snapshot(
        self, peer_filter: PeerFilter, reason: pb.SnapshotReason
    ) -> AsyncGenerator[pb.WatchPeersResponse, None]:
        """The filtered peer set at one revision, in as many parts as its size needs (all with that revision).

        Filtering, sorting and encoding run in the encoding pool; so does building each part, just before
        it is sent, so a stream holds one part (at most ``PART_BYTES``) beside references to the shared
        encoded peers, however slowly its client reads."""
        revision, status, parts = await self._in_thread(
            self._encoding, functools.partial(self._snapshot_parts, peer_filter)
        )
        for index, part in enumerate(parts):
            yield await self._in_thread(
                self._encoding,
                functools.partial(self._snapshot_message, revision, status, reason, part, index < len(parts) - 1),
            )

    def _snapshot_parts(self, peer_filter: PeerFilter) -> tuple[int, ApiStatus, list[list[pb.Peer]]]:
        revision, peers, status = self._filtered_peers(peer_filter)
        return revision, status, split_by_size(peers, lambda m: m.ByteSize())

    def _snapshot_message(
        self, revision: int, status: ApiStatus, reason: pb.SnapshotReason, part: list[pb.Peer], partial: bool
    ) -> pb.WatchPeersResponse:
        return pb.WatchPeersResponse(
            revision=revision,
            history_id=self.peers.history_id,
            snapshot=pb.Snapshot(peers=part, reason=reason, status=API_STATUS[status]),
            partial=partial,
        )

    def _filtered_peers(self, peer_filter: PeerFilter) -> tuple[int, list[pb.Peer], ApiStatus]:
        """The peers one client sees, encoded, at one revision, with the status at that revision."""
        revision, peers, status = self.peers.state()
        grouped = snapshot_peers(peers, peer_filter, self.peers.self_uid)
        return revision, [self.encoder.encode(g) for g in grouped], status.status

    async def _stream(
        self, request: pb.WatchPeersRequest, peer_filter: PeerFilter
    ) -> AsyncGenerator[pb.WatchPeersResponse, None]:
        if not await self._wait_synced(None):
            return
        history_id = self.peers.history_id
        wants_resume = bool(request.resume_history_id or request.resume_revision)
        resumed_status = (
            self.peers.status_at(request.resume_revision)
            if wants_resume and self.peers.covers(request.resume_history_id, request.resume_revision)
            else None
        )
        if resumed_status is not None:
            cursor = request.resume_revision
            yield pb.WatchPeersResponse(
                revision=cursor, history_id=history_id, resumed=pb.Resumed(status=API_STATUS[resumed_status])
            )
            self._sent["resumed"].inc()
        else:
            reason = pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE if wants_resume else pb.SNAPSHOT_REASON_INITIAL
            async for message in self._snapshot(peer_filter, reason):
                cursor = message.revision
                yield message
            self._sent["snapshot"].inc()
        while not self._ending():
            changed = self._changes.current()  # before reading: a commit after the read triggers it
            entries = self.peers.wait_entries(cursor, 0, BATCH_LIMIT)
            if entries is None:
                self.log.info("client fell behind the history; sending a fresh snapshot", revision=cursor)
                self._slow_client_resets.inc()
                async for message in self._snapshot(peer_filter, pb.SNAPSHOT_REASON_CLIENT_TOO_SLOW):
                    cursor = message.revision
                    yield message
                self._sent["snapshot"].inc()
                continue
            if not entries:
                await changed.wait()
                continue
            # Deltas are encoded on the loop: at most BATCH_LIMIT entries, mostly cache hits in the encoder.
            for projected in project(entries, peer_filter, self.peers.self_uid):
                for message in self._to_pb(projected, history_id):
                    yield message
                if projected.received is not None:
                    self.metrics.propagation_lag.observe(time.monotonic() - projected.received)
            cursor = entries[-1].revision

    def _to_pb(self, message: DeltaMessage | StatusMessage, history_id: str) -> list[pb.WatchPeersResponse]:
        if isinstance(message, StatusMessage):
            self._sent["status"].inc()
            status = pb.StatusChange(status=API_STATUS[message.change.status], reason=message.change.reason)
            return [pb.WatchPeersResponse(revision=message.revision, history_id=history_id, status=status)]
        self._sent["delta"].inc()
        events = [pb.PeerEvent(type=EVENT_TYPE[e.type], peer=self.encoder.encode(e.peer)) for e in message.events]
        parts = split_by_size(events, lambda e: e.ByteSize())
        return [
            pb.WatchPeersResponse(
                revision=message.revision,
                history_id=history_id,
                delta=pb.Delta(events=part),
                partial=index < len(parts) - 1,
            )
            for index, part in enumerate(parts)
        ]

    # -- unary calls ------------------------------------------------------------------------------------
    async def ListPeers(
        self, request: pb.ListPeersRequest, context: grpc.aio.ServicerContext[pb.ListPeersRequest, pb.ListPeersResponse]
    ) -> pb.ListPeersResponse:
        try:
            peer_filter = filter_from_pb(request.filter)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await self._demand(context)
        remaining: float | None = context.time_remaining()
        if not await self._wait_synced(min(remaining, 3600) if remaining is not None else 3600):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar has not synced with the API server yet")
        reply = await self._in_thread(self._encoding, functools.partial(self._list_peers, peer_filter))
        too_large = self._reply_too_large(reply, request.max_reply_bytes)
        if too_large:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)
        return reply

    def _list_peers(self, peer_filter: PeerFilter) -> pb.ListPeersResponse:
        revision, peers, status = self._filtered_peers(peer_filter)
        return pb.ListPeersResponse(
            revision=revision, history_id=self.peers.history_id, peers=peers, status=API_STATUS[status]
        )

    @staticmethod
    def _reply_too_large(reply: pb.ListPeersResponse, max_reply_bytes: int) -> str | None:
        """Why the reply cannot be sent to this client (it would fail to decode it), or None."""
        limit = max_reply_bytes or DEFAULT_CLIENT_RECEIVE_BYTES
        size = reply.ByteSize()
        if size <= limit:
            return None
        return (
            f"the {len(reply.peers)} peers matching this filter make a {size / 2**20:.1f} MiB reply, more than "
            f"this client accepts ({limit / 2**20:.1f} MiB; set max_reply_bytes after raising the client's "
            "receive limit), or use WatchPeers, which sends large sets in parts"
        )

    async def GetSelf(
        self, request: pb.GetSelfRequest, context: grpc.aio.ServicerContext[pb.GetSelfRequest, pb.GetSelfResponse]
    ) -> pb.GetSelfResponse:
        identity = self.identity
        state = self.publisher.registration() if self.publisher is not None else None  # a copy, no IO
        if state is None or state.instance_id is None:  # the Kubernetes backend: the name decides
            own_id = instance_id(self.metadata_name)
            own_uid = peer_key(identity.uid, identity.name, self.metadata_name)
        else:  # the publisher decides (etcd: the lease, and the peer it makes)
            own_id = state.instance_id
            own_uid = state.peer_uid or ""
        response = pb.GetSelfResponse(
            name=self.metadata_name,
            namespace=identity.namespace,
            uid=own_uid,
            instance_id=own_id,
            instance_id_hex=format(own_id, "x"),
        )
        if state is not None:
            response.registered = state.registered
            response.metadata_resource_version = state.resource_version
            response.data.CopyFrom(to_struct(state.data))
            response.data_json = canonical_json(state.data)
            response.labels.update(state.labels)
        return response

    async def PublishMetadata(
        self,
        request: pb.PublishMetadataRequest,
        context: grpc.aio.ServicerContext[pb.PublishMetadataRequest, pb.PublishMetadataResponse],
    ) -> pb.PublishMetadataResponse:
        publisher = self.publisher
        if publisher is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this sidecar does not register the pod")
        try:
            document = document_from_publish(request)
            merge = request.mode == pb.PUBLISH_MODE_MERGE_PATCH
            applied = await self._in_thread(self._blocking, functools.partial(publisher.publish, document, merge))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except RegistrationError as exc:
            await context.abort(publish_error_code(exc), str(exc))
        return pb.PublishMetadataResponse(
            metadata_resource_version=applied.resource_version, data_json=canonical_json(applied.data)
        )


class GrpcServer:
    """The server with Discovery, health and reflection, bound to loopback or a Unix socket.

    Owns a ``grpc.aio`` server and the event-loop thread it runs on (from construction to ``stop``), and
    ends the service's pools when it stops. The listening socket is bound at construction; ``start()``
    returns once the server accepts calls. Every gRPC object is created and used on the loop thread;
    other threads reach it through ``_on_loop`` (``set_serving`` is called from the daemon's threads).
    ``_lock`` guards ``_serving`` and ``_closed``.
    """

    def __init__(self, service: DiscoveryService, listen: ListenAddress) -> None:
        self.listen = listen
        self.service = service
        self.health = health_aio.HealthServicer()
        self.log = structlog.get_logger("sidecar.grpc")
        self._lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._background: asyncio.Task[None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None
        try:
            self._server, self.port = self._on_loop(self._build()).result()
        except BaseException:
            self._end_loop()
            raise

    async def _build(self) -> tuple[grpc.aio.Server, int]:
        # No maximum_concurrent_rpcs: streams are limited by the service, unary calls and health never.
        # gRPC core queues calls that arrive before the loop asks for the next one, and by default cancels
        # some once 1,000 wait (all beyond 3,000): a burst of every allowed stream, plus unary calls, must
        # fit, so that a stream over the limit is told why (RESOURCE_EXHAUSTED) rather than CANCELLED.
        pending = self.service.max_streams + PENDING_MARGIN
        server = grpc.aio.server(
            options=[
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
            ]
        )
        pb_grpc.add_DiscoveryServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        if self.listen.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen.unix_path)  # a socket left by a previous run of this container
        try:
            port = server.add_insecure_port(self.listen.bind_target)
        except RuntimeError as exc:  # grpc's "Failed to bind": in use, or not an address of this host
            raise OSError(f"cannot listen on {self.listen.grpc_target}: {exc}") from None
        if not self.listen.unix_path and port == 0:
            raise OSError(f"cannot listen on {self.listen.grpc_target}")
        await self._apply_health()
        return server, port

    @property
    def target(self) -> str:
        """What a client dials (the real port when 0 was asked for)."""
        if self.listen.unix_path:
            return self.listen.grpc_target
        return ListenAddress(host=self.listen.host, port=self.port).grpc_target

    # -- the loop thread --------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coroutine`` on the loop (from another thread)."""
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop is closed
            coroutine.close()
            raise

    def _end_loop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self.service.close()
        # gRPC's poller thread ends with its last aio object. Every aborted call leaves a reference cycle
        # in gRPC (RPCState -> AbortError -> traceback -> handler frame -> context -> RPCState) that holds
        # the server, so dropping ours is not enough: collect the cycles now rather than at some later GC.
        self._server = None
        gc.collect()

    # -- health -----------------------------------------------------------------------------------------
    def set_serving(self, serving: bool) -> None:
        """Set the health status of "" and the Discovery service; callable from any thread."""
        with self._lock:
            self._serving = serving
            if self._closed:
                return
        if threading.current_thread() is self._thread:
            self._loop.create_task(self._apply_health())
            return
        with contextlib.suppress(RuntimeError):
            # Waited for, so a Check right after this call sees it; bounded, should the loop be stopping.
            concurrent.futures.wait([self._on_loop(self._apply_health())], timeout=5)

    async def _apply_health(self) -> None:
        with self._lock:
            serving = self._serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    # -- start and stop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._on_loop(self._start()).result()

    async def _start(self) -> None:
        assert self._server is not None
        self._background = asyncio.get_running_loop().create_task(self.service.run())
        await self._server.start()

    def stop(self, grace: float) -> None:
        """Tell health watchers NOT_SERVING, end every stream with UNAVAILABLE, give unary calls ``grace``
        seconds, then stop the loop thread and the pools: no thread is left."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            done, _ = concurrent.futures.wait([self._on_loop(self._shutdown(grace))], timeout=grace + 5)
            if not done:
                self.log.warning("the gRPC server did not stop in time; cancelling what is left", grace=grace)
        finally:
            self._end_loop()

    async def _shutdown(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.service.begin_shutdown()
        # The streams end themselves, each with its UNAVAILABLE status, while the server still runs as usual;
        # stopping the server under them raced its GOAWAY and teardown with those statuses, and a client could
        # get "connection reset" instead of the reason (tests/unit/test_grpc_scale.py, intermittently).
        # Within the same grace: what the streams took is not given again to the server's stop.
        started = asyncio.get_running_loop().time()
        await self.service.streams_ended(grace)
        if self._server is not None:
            await self._server.stop(max(0.0, grace - (asyncio.get_running_loop().time() - started)))
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
