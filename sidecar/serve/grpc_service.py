"""The ``discovery.v1.Discovery`` servicer: WatchPeers, ListPeers, GetSelf, PublishMetadata.

It runs on the event loop of ``sidecar.serve.grpc_server.GrpcServer``. A ``WatchPeers`` stream is a
coroutine that holds nothing but a cursor (a revision) into the hub's shared event log: no thread.
Streams sleep on one shared wake-up (``Wakeup``) that the hub's change signal triggers (the service
subscribes to it): new entries, the first sync and the hub closing all wake them, so nothing polls. On
waking, a stream reads new entries without blocking, projects them through its filter (coalesced per
peer) and sends them. gRPC's flow control suspends a send to a client that does not read; meanwhile the
log moves on without it, and if the client's position falls out of the bounded history it is sent a
fresh snapshot (``SNAPSHOT_REASON_CLIENT_TOO_SLOW``) instead of a backlog. Memory per stream is thus
bounded by one batch (or one snapshot part), whatever the client does.

Stream messages are serialized by the service and written as bytes (``add_to_server`` registers
WatchPeers without a response serializer): the streams woken by one change share its projected batch, so
a change is serialized once per filter, not once per stream.

Nothing that blocks runs on the loop: ``PublishMetadata`` (network IO) runs in a small pool, snapshots
(CPU proportional to the peer set) in another, so health checks and unary calls are answered while
thousands of streams are open or being (re)initialised. Streams are bounded by ``max_streams``; unary
calls and health checks are never refused because of streams.

The service reads the peer set through ``PeerReader`` and publishes through ``Publisher``
(``sidecar.peers.ports``); it imports no backend, and maps the publisher's errors, which carry a
meaning, to status codes. ``GetSelf`` reports what the publisher says this instance is (name, peer
key, instance ID): the service has no notion of a backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import structlog

from discovery_client.api.discovery.v1 import discovery_pb2 as pb
from discovery_client.api.discovery.v1 import discovery_pb2_grpc as pb_grpc
from sidecar.core.eventlog import ApiStatus, LogEntry
from sidecar.core.peer import canonical_json
from sidecar.core.projection import DeltaMessage, PeerFilter, StatusMessage, project, snapshot_peers
from sidecar.peers.metrics import Metrics
from sidecar.peers.ports import (
    Access,
    AccessDenied,
    AccessError,
    AccessUnavailable,
    Forbidden,
    Grant,
    Invalid,
    NotFound,
    NotRegistering,
    NotServed,
    NotWatching,
    PeerReader,
    PodIdentity,
    Publisher,
    RegistrationError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from sidecar.serve.wire import API_STATUS, EVENT_TYPE, PeerEncoder, document_from_publish, filter_from_pb, to_struct

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Discovery"].full_name
BATCH_LIMIT = 2000
"""Most log entries folded into one read; bounds the work and memory of one iteration."""
MAX_STREAMS = 2048
"""Default limit of concurrent ``WatchPeers`` streams (``DiscoveryService(max_streams=...)``). A stream
costs no thread but ~35 KiB of RSS (measured; mostly gRPC core's per-call state), so the limit keeps a
client that leaks streams to ~70 MiB, inside a 256 MiB container limit with thousands of peers, and
bounds the per-change fan-out. Unary calls and health checks are not counted and never refused."""
BLOCKING_WORKERS = 4
"""Threads for blocking calls: ``publish`` (serialised by the publisher anyway)."""
ENCODING_WORKERS = 2
"""Threads that build snapshots (CPU under the GIL: more would not encode faster)."""
SNAPSHOTS_AT_ONCE = 16
"""Snapshots being built and written at once; other streams wait their turn. A snapshot held for a client costs
its serialised size until gRPC has sent it (each part is serialised in the encoding pool, which drops the
message: a tenth less peak RSS in a burst than holding both, bench/comparisons/2026-12-07-per-pod-cost.md), so a
burst of clients connecting at once (a relay's followers after a failover: hundreds) would otherwise hold hundreds
of copies (bench/relay_fanout.py: 333 followers of 1,000 peers, peak RSS 400 MiB with the bound against 524-630
without). The encoding pool is CPU-bound under the GIL, so the burst takes no longer."""
SHARED_BATCHES = 64
"""Projected batches kept for other streams at the same position with the same filter (most recent first out)."""
SHARED_BATCH_ENTRIES = 64
"""Batches of more entries (a slow client catching up, alone at its position) are built for their stream only:
with ``SHARED_BATCHES`` this bounds what is kept to a few MiB."""
PENDING_MARGIN = 1024
"""Calls gRPC core may queue for the loop beyond ``max_streams`` before it cancels any (a burst)."""
DEFAULT_CLIENT_RECEIVE_BYTES = 4 * 2**20 - 64 * 1024
"""gRPC's default receive limit, less room for framing: the largest ListPeers reply sent unless asked."""
PART_BYTES = 1 << 20
"""Largest payload of one stream message: gRPC clients refuse messages over 4 MiB by default, so bigger
snapshots and deltas go out in parts (``partial``) that clients apply together."""
SHUTTING_DOWN = "the discovery sidecar is shutting down; reconnect to resume"
RELAY_SHUTTING_DOWN = "this discovery relay replica is shutting down; follow another replica"
NAMESPACES_METADATA = "discovery-namespaces"
"""The request metadata in which a relay's client names the namespaces it wants (comma-separated; ``*``:
all). Absent: every namespace the relay watches. Carried as metadata, not in the filter, because it is
the scope the relay authorises, not a filter a main container chooses."""
RELAY_ONLY_PEERS = (
    "this is a discovery relay: it serves WatchPeers and ListPeers to sidecars; GetSelf and PublishMetadata are "
    "served by the sidecar in each pod"
)
ACCESS_ERROR_CODES: dict[type[AccessError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    AccessDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotServed: grpc.StatusCode.FAILED_PRECONDITION,
    AccessUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def access_error_code(exc: AccessError) -> grpc.StatusCode:
    for meaning, code in ACCESS_ERROR_CODES.items():
        if isinstance(exc, meaning):
            return code
    return grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class ProjectedBatch:
    """One projected message of a batch of log entries, serialized (in parts): shared by every stream that reads
    the same entries with the same filter, which all write the same bytes."""

    kind: str  # "delta" or "status" (the messages_sent label)
    received: float | None  # when the change's cause arrived (propagation lag)
    messages: list[bytes]  # serialized ``WatchPeersResponse`` messages


class StreamRevoked(Exception):
    """A stream's grant was checked again and refused: the stream ends with ``code`` and ``str()``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def bearer_token(authorization: str) -> str:
    """The token of an ``authorization: Bearer <token>`` header ("" when there is none)."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def requested_namespaces(metadata: dict[str, str]) -> list[str] | None:
    """The namespaces a relay's client asked for (``NAMESPACES_METADATA``), None for "all it watches"."""
    text = metadata.get(NAMESPACES_METADATA, "").strip()
    if not text:
        return None
    return [n.strip() if n.strip() != "*" else "" for n in text.split(",") if n.strip()]


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


class Wakeup:
    """Wakes every waiting coroutine at once; ``trigger_threadsafe`` may be called from any thread (the
    hub's change signal calls it in the writer's thread).

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


StreamContext = grpc.aio.ServicerContext[pb.WatchPeersRequest, bytes]
"""A WatchPeers call: its messages are written already serialized (``add_to_server``)."""


class DiscoveryService(pb_grpc.DiscoveryServicer):
    """The ``discovery.v1.Discovery`` servicer, on ``GrpcServer``'s event loop.

    Owns the stream count (changed on the loop only), the wake-up the hub's change signal triggers, and
    two small thread pools for work that must not run on the loop; ``GrpcServer`` calls ``attach`` with
    its loop, and ``begin_shutdown()`` and ``close()`` when stopping. Reads ``peers`` without holding its
    lock across IO; ``PeerEncoder`` has its own lock (the pools encode too). Constructed by the daemon (or
    a test) with the hub and the publisher; it subscribes to the hub's change signal at once.
    """

    def __init__(
        self,
        peers: PeerReader,
        publisher: Publisher | None,
        identity: PodIdentity,
        metrics: Metrics,
        encoder: PeerEncoder | None = None,
        max_streams: int = MAX_STREAMS,
        access: Access | None = None,
        snapshots_at_once: int = SNAPSHOTS_AT_ONCE,
        shared_batches: int = SHARED_BATCHES,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.peers = peers
        self.publisher = publisher
        self.identity = identity
        self.metrics = metrics
        self.encoder = encoder or PeerEncoder()
        self.max_streams = max_streams
        # A relay's: each client's token is checked, and its streams see only the namespaces it may list.
        self.access = access
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
        self._snapshot_slots = asyncio.Semaphore(snapshots_at_once)  # on the loop (bound at first use)
        # Projected batches by (filter, self, history, from, to), shared by the streams at that position (loop only).
        self._batches: OrderedDict[tuple[Any, ...], list[ProjectedBatch]] = OrderedDict()
        self._shared_batches = shared_batches  # 0: every stream builds its own (bench.relay_fanout compares)
        peers.subscribe(lambda _change: self._changes.trigger_threadsafe())

    # -- lifecycle (called by GrpcServer) ----------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on ``loop``: from now on the hub's change signal wakes the streams there."""
        self._changes.attach(loop)

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
        grant = await self._admit(context)
        if grant is not None:
            peer_filter = replace(peer_filter, namespaces=grant.namespaces)
        await self._demand(context)
        if self.streams >= self.max_streams:
            self.log.warning("refused a WatchPeers stream: at the limit", limit=self.max_streams)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_many_streams(self.max_streams))
        self.streams += 1
        self._no_streams.clear()
        try:
            self.metrics.subscribers.inc()
            try:
                async with contextlib.aclosing(self._stream(request, peer_filter, grant, context)) as messages:
                    async for message in messages:
                        await context.write(message)  # bytes: gRPC writes them as they are
            except StreamRevoked as exc:
                self.log.info("ended a relayed stream: its client's access was refused", reason=str(exc))
                await context.abort(exc.code, str(exc))
            finally:
                self.metrics.subscribers.dec()
            if self._ending():
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN if self.access is None else RELAY_SHUTTING_DOWN
                )
        finally:
            # Counted until the handler has returned, its status included: shutdown waits for that.
            self.streams -= 1
            if self.streams == 0:
                self._no_streams.set()

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Grant | None:
        """A relay's check of its client (None when this is no relay): the bearer token in the call's
        ``authorization`` metadata, for the namespaces it asks for. Refused calls are aborted with the
        meaning's status code and the reason (naming the namespace refused)."""
        if self.access is None:
            return None
        try:
            return await self._check(context)
        except AccessError as exc:
            await context.abort(access_error_code(exc), str(exc))
        raise AssertionError("abort raises")  # pragma: no cover

    async def _check(self, context: grpc.aio.ServicerContext[Any, Any]) -> Grant:
        """Ask ``access`` (in the blocking pool: it may call the API server) about the call's token and scope."""
        access = self.access
        assert access is not None
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        token = bearer_token(metadata.get("authorization", ""))
        namespaces = requested_namespaces(metadata)
        return await self._in_thread(self._blocking, functools.partial(access.admit, token, namespaces))

    async def _recheck(self, context: grpc.aio.ServicerContext[Any, Any], grant: Grant) -> Grant:
        """The grant of an open stream, checked again now that it expired; ``StreamRevoked`` when refused.
        The scope cannot grow: the stream keeps the namespaces it was admitted for."""
        try:
            renewed = await self._check(context)
        except AccessUnavailable:
            # The API server cannot be asked: the client was allowed a moment ago; ask again soon rather
            # than cutting every stream when the control plane blinks.
            return replace(grant, expires=time.monotonic() + 5.0)
        except AccessError as exc:
            raise StreamRevoked(access_error_code(exc), str(exc)) from None
        return renewed

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
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """The filtered peer set at one revision, in as many parts as its size needs: (that revision, a
        serialized part) for each.

        Filtering, sorting and encoding run in the encoding pool; so does building and serializing each part,
        just before it is sent, so a stream holds one part (at most ``PART_BYTES``) beside references to the
        shared encoded peers, however slowly its client reads."""
        async with self._snapshot_slots:  # released once the last part is written (the generator resumed)
            revision, status, parts = await self._in_thread(
                self._encoding, functools.partial(self._snapshot_parts, peer_filter)
            )
            for index, part in enumerate(parts):
                message = await self._in_thread(
                    self._encoding,
                    functools.partial(self._snapshot_message, revision, status, reason, part, index < len(parts) - 1),
                )
                yield revision, message.SerializeToString()

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
        self,
        request: pb.WatchPeersRequest,
        peer_filter: PeerFilter,
        grant: Grant | None = None,
        context: StreamContext | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The serialized messages of one stream: a snapshot (or ``resumed``), then the log's changes."""
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
            ).SerializeToString()
            self._sent["resumed"].inc()
        else:
            reason = pb.SNAPSHOT_REASON_RESUME_UNAVAILABLE if wants_resume else pb.SNAPSHOT_REASON_INITIAL
            async for revision, message in self._snapshot(peer_filter, reason):
                cursor = revision
                yield message
            self._sent["snapshot"].inc()
        while not self._ending():
            if grant is not None and context is not None and time.monotonic() >= grant.expires:
                grant = await self._recheck(context, grant)
            changed = self._changes.current()  # before reading: a commit after the read triggers it
            entries = self.peers.wait_entries(cursor, 0, BATCH_LIMIT)
            if entries is None:
                self.log.info("client fell behind the history; sending a fresh snapshot", revision=cursor)
                self._slow_client_resets.inc()
                async for revision, message in self._snapshot(peer_filter, pb.SNAPSHOT_REASON_CLIENT_TOO_SLOW):
                    cursor = revision
                    yield message
                self._sent["snapshot"].inc()
                continue
            if not entries:
                if grant is None:
                    await changed.wait()
                else:  # woken at the latest when the grant must be checked again
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), max(0.0, grant.expires - time.monotonic()))
                continue
            for batch in self._projected(entries, cursor, peer_filter, history_id):
                self._sent[batch.kind].inc()
                for message in batch.messages:
                    yield message
                if batch.received is not None:
                    self.metrics.propagation_lag.observe(time.monotonic() - batch.received)
            cursor = entries[-1].revision

    def _projected(
        self, entries: list[LogEntry], cursor: int, peer_filter: PeerFilter, history_id: str
    ) -> list[ProjectedBatch]:
        """The messages of log entries ``cursor+1..`` for one filter, built once for every stream at that position
        with that filter (on the loop: no lock). Streams woken by one change read the same entries, so a relay
        with hundreds of followers projects, encodes and serializes each change once per filter, not once per
        follower (a sidecar's streams usually share one filter: the same holds for its main containers).
        Deltas are encoded on the loop: at most BATCH_LIMIT entries, mostly cache hits in the encoder."""
        self_uid = self.peers.self_uid
        if len(entries) > SHARED_BATCH_ENTRIES or not self._shared_batches:
            return self._build(entries, peer_filter, self_uid, history_id)
        key = (peer_filter, self_uid, history_id, cursor, entries[-1].revision)
        try:
            hit = self._batches.get(key)
        except TypeError:  # a filter that cannot be a key (never, as filters are built): built for this stream
            return self._build(entries, peer_filter, self_uid, history_id)
        if hit is not None:
            self._batches.move_to_end(key)
            return hit
        built = self._build(entries, peer_filter, self_uid, history_id)
        self._batches[key] = built
        while len(self._batches) > self._shared_batches:
            self._batches.popitem(last=False)
        return built

    def _build(
        self, entries: list[LogEntry], peer_filter: PeerFilter, self_uid: str, history_id: str
    ) -> list[ProjectedBatch]:
        return [
            ProjectedBatch(
                "status" if isinstance(projected, StatusMessage) else "delta",
                projected.received,
                self._serialized(projected, history_id),
            )
            for projected in project(entries, peer_filter, self_uid)
        ]

    def _serialized(self, message: DeltaMessage | StatusMessage, history_id: str) -> list[bytes]:
        """One projected message as the serialized ``WatchPeersResponse`` messages (parts) that carry it."""
        if isinstance(message, StatusMessage):
            status = pb.StatusChange(status=API_STATUS[message.change.status], reason=message.change.reason)
            response = pb.WatchPeersResponse(revision=message.revision, history_id=history_id, status=status)
            return [response.SerializeToString()]
        events = [pb.PeerEvent(type=EVENT_TYPE[e.type], peer=self.encoder.encode(e.peer)) for e in message.events]
        parts = split_by_size(events, lambda e: e.ByteSize())
        return [
            pb.WatchPeersResponse(
                revision=message.revision,
                history_id=history_id,
                delta=pb.Delta(events=part),
                partial=index < len(parts) - 1,
            ).SerializeToString()
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
        grant = await self._admit(context)
        if grant is not None:
            peer_filter = replace(peer_filter, namespaces=grant.namespaces)
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
        if self.access is not None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, RELAY_ONLY_PEERS)
        # What the publisher says this instance is (no IO: a copy); without one, only the pod is known.
        state = self.publisher.registration() if self.publisher is not None else None
        if state is None:
            return pb.GetSelfResponse(
                name=self.identity.name, namespace=self.identity.namespace, uid=self.identity.uid, instance_id_hex="0"
            )
        response = pb.GetSelfResponse(
            name=state.name,
            namespace=self.identity.namespace,
            uid=state.peer_uid,
            instance_id=state.instance_id,
            instance_id_hex=format(state.instance_id, "x"),
            registered=state.registered,
            metadata_resource_version=state.resource_version,
            data_json=canonical_json(state.data),
        )
        response.data.CopyFrom(to_struct(state.data))
        response.labels.update(state.labels)
        return response

    async def PublishMetadata(
        self,
        request: pb.PublishMetadataRequest,
        context: grpc.aio.ServicerContext[pb.PublishMetadataRequest, pb.PublishMetadataResponse],
    ) -> pb.PublishMetadataResponse:
        if self.access is not None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, RELAY_ONLY_PEERS)
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


PRESERIALIZED = frozenset({"WatchPeers"})
"""Methods whose handlers write messages already serialized (bytes): gRPC must not serialize them again."""

_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""The handler factory for a method, by (client streaming, server streaming)."""


def add_to_server(service: DiscoveryService, server: grpc.aio.Server) -> None:
    """Register ``service``'s methods on ``server``, as the generated ``add_DiscoveryServicer_to_server`` does,
    except that the ``PRESERIALIZED`` methods (WatchPeers) have no response serializer: their handler writes
    messages the service serialized (a batch once for every stream that shares it), which gRPC then sends as
    they are. The handlers are derived from the proto's service descriptor, so every method it declares is
    registered, with its own request and response types."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in pb.DESCRIPTOR.services_by_name["Discovery"].methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=request.FromString,
            response_serializer=None if method.name in PRESERIALIZED else response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
